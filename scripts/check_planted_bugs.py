"""Checks that the test suite catches bugs planted one at a time.

Copies the repository's tracked files (as they are in the working tree) to a
temporary folder, plants each bug of `BUGS` there (a one-line replacement in
one source file), runs that bug's test paths on the chosen backends with the
copy's `src` first on `PYTHONPATH`, and reports which tests failed. The copy
is first run without any bug: its failures would be no evidence.

    python scripts/check_planted_bugs.py                  # every bug, JAX
    python scripts/check_planted_bugs.py --backend jax torch tensorflow
    python scripts/check_planted_bugs.py --bug block_count_rounded_down
    python scripts/check_planted_bugs.py --plant-only     # only plants each bug
    python scripts/check_planted_bugs.py -- -n 2          # extra pytest args

Run it with the Python of the development environment (`.venv/bin/python`).
Exit status: 0 when every bug fails at least one test on every backend; 1
when one is caught by no test, cannot be planted (its line changed: update
`BUGS`), or the copy fails without a bug.
"""

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "torch", "tensorflow")

# name: (file, the line as it is, the line with the bug, test paths, what it is).
# Lines are compared without their indentation, which the bug keeps.
BUGS = {
    "gemma4_per_dim_scale_dropped": (
        "src/keras_moe/kerashub/_blocks.py",
        "normed = normed * full_precision(self.per_dim_scale)",
        "normed = normed",
        [
            "tests/kerashub/test_router_values.py",
            "tests/kerashub/test_quantized_router.py",
            "tests/test_router_precision.py",
        ],
        "SparseGemma4Router.call (router_dtype='float32') drops per_dim_scale",
    ),
    "gemma4_divides_by_d": (
        "src/keras_moe/kerashub/_blocks.py",
        "normed = normed * self._scalar_root_size",
        "normed = normed * self._scalar_root_size**2",
        [
            "tests/kerashub/test_router_values.py",
            "tests/kerashub/test_quantized_router.py",
            "tests/test_router_precision.py",
        ],
        "SparseGemma4Router.call (router_dtype='float32') divides by d, not sqrt(d)",
    ),
    "float32_router_bias_dropped": (
        "src/keras_moe/kerashub/_float32_dense.py",
        'compute_dtype = "float32"',
        'compute_dtype = "float32"; bias = None',
        [
            "tests/kerashub/test_router_values.py",
            "tests/kerashub/test_quantized_router.py",
            "tests/test_router_precision.py",
        ],
        "the float32 router (_Float32View) drops the router bias (GPT-OSS)",
    ),
    "block_count_rounded_down": (
        "src/keras_moe/routing/layouts.py",
        "n_blocks = -(-a.total // block) + e - 1",
        "n_blocks = a.total // block + e - 1",
        ["tests/routing/test_dispatch.py", "tests/routing/test_dispatch_groups.py"],
        "BlockLayout rounds its number of blocks down: the last partial "
        "blocks are lost",
    ),
    "compute_router_in_float32": (
        "src/keras_moe/routing/gates.py",
        "logits = ops.matmul(ops.cast(inputs, dtype), ops.cast(kernel, dtype))",
        'logits = ops.cast(ops.matmul(ops.cast(inputs, "float32"), '
        'ops.cast(kernel, "float32")), dtype)',
        [
            "tests/routing/test_router.py",
            "tests/routing/test_router_dtype_values.py",
            "tests/test_router_precision.py",
        ],
        "router_dtype='compute' computes the logits in float32 and casts them "
        "to the compute dtype",
    ),
}


def copy_tracked_files(destination):
    """The tracked files of the working tree, copied under `destination`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def plant(root, name):
    """Plants bug `name` in the copy at `root`; returns the original text."""
    path, line, buggy = BUGS[name][:3]
    source = (root / path).read_text()
    lines = source.splitlines(keepends=True)
    found = [i for i, text in enumerate(lines) if text.strip() == line]
    if len(found) != 1:
        raise LookupError(
            f"{path} has {len(found)} lines `{line}` (expected exactly one): "
            f"update BUGS[{name!r}]"
        )
    i = found[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + buggy + "\n"
    (root / path).write_text("".join(lines))
    return source, i + 1


def run_tests(root, backend, paths, pytest_args):
    """`(exit status, failed test ids, output)` of pytest in the copy."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(root / "src"), str(root)] + env.get("PYTHONPATH", "").split(os.pathsep)
    ).rstrip(os.pathsep)
    # The copy's ../shared is the repository's.
    env.setdefault("KERAS_MOE_SHARED", str(REPO.parent / "shared"))
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command + list(pytest_args) + list(paths),
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    output = result.stdout + result.stderr
    failed = sorted(
        set(re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE))
    )
    return result.returncode, failed, output


def check_imports_the_copy(root):
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    found = subprocess.run(
        [sys.executable, "-c", "import keras_moe; print(keras_moe.__file__)"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not found.startswith(str(root)):
        raise RuntimeError(f"keras_moe imports from {found!r}, not from the copy")


def last_lines(text, n=15):
    return "\n".join("      " + line for line in text.rstrip().splitlines()[-n:])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", nargs="+", choices=BACKENDS, default=["jax"])
    parser.add_argument("--bug", nargs="+", choices=sorted(BUGS), default=list(BUGS))
    parser.add_argument(
        "--plant-only",
        action="store_true",
        help="only check that every bug can be planted (no test runs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the copy")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest arguments")
    args = parser.parse_args(argv)

    root = pathlib.Path(tempfile.mkdtemp(prefix="keras-moe-planted-"))
    problems = []
    try:
        copy_tracked_files(root)
        print(f"copy of {REPO} in {root}")
        bugs = []
        for name in args.bug:
            try:
                original, _ = plant(root, name)
            except LookupError as error:
                problems.append(f"{name}: cannot be planted: {error}")
                continue
            (root / BUGS[name][0]).write_text(original)
            bugs.append(name)
        if args.plant_only:
            print("\n".join(problems) if problems else "every bug plants")
            return 1 if problems else 0
        check_imports_the_copy(root)
        for backend in args.backend:
            paths = sorted({path for name in bugs for path in BUGS[name][3]})
            status, failed, output = run_tests(root, backend, paths, args.pytest_args)
            if status != 0:
                problems.append(f"[{backend}] the copy without a bug fails: {failed}")
                print(f"\n[{backend}] WITHOUT A BUG, {' '.join(paths)} FAILS:")
                print(last_lines(output))
                continue
            print(f"\n[{backend}] without a bug: {' '.join(paths)} pass")
            for name in bugs:
                path, line, buggy, tests, what = BUGS[name]
                original, line_no = plant(root, name)
                try:
                    status, failed, output = run_tests(
                        root, backend, tests, args.pytest_args
                    )
                finally:
                    (root / path).write_text(original)
                print(f"\n[{backend}] {name}: {what}")
                print(f"  {path}:{line_no}\n  - {line}\n  + {buggy}")
                if failed:
                    print(f"  caught: {len(failed)} failed in {' '.join(tests)}")
                    print("\n".join(f"    {test}" for test in failed))
                else:
                    problems.append(f"[{backend}] {name}: caught by no test")
                    print(f"  NOT CAUGHT by {' '.join(tests)} (exit {status})")
                    if status not in (0, 1):
                        print(last_lines(output))
    finally:
        if args.keep:
            print(f"\nthe copy stays in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + ("\n".join(problems) if problems else "every planted bug is caught"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
