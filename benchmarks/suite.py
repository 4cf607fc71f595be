"""Runs the cases on the current backend (one process) and on all backends
(one subprocess each, merged), and writes JSON, markdown and the plot."""

import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import keras

from benchmarks import cases as cases_module
from benchmarks import harness
from benchmarks import report

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_REPEATS = {"jax": 5, "torch": 3, "tensorflow": 3}


def run_backend(names=None, tiny=False, repeats=None, modes=None, log=None):
    """All (or the named) cases on the current backend: `{case: result}`.

    `modes` limits every case to those modes (the tests use it to compile
    less); train-step cases always run their one mode.
    """
    size = cases_module.TINY if tiny else cases_module.FULL
    backend = keras.backend.backend()
    if repeats is None:
        repeats = 2 if tiny else DEFAULT_REPEATS[backend]
    out = {}
    for name in names or list(cases_module.CASES):
        case = cases_module.CASES[name](size)
        case_modes = case.get("modes", harness.MODES)
        if modes is not None:
            case_modes = tuple(m for m in case_modes if m in modes) or case_modes
        summary = {"title": case["title"], "targets": case.get("targets", [])}
        if log:
            log(f"[{backend}] {name}: {case['title']}")
        keras.backend.clear_session()
        start = time.perf_counter()
        result = harness.compare(
            case["variants"],
            case["baseline"],
            modes=case_modes,
            repeats=repeats,
            warmup=1,
            min_sample_s=0.0 if tiny else 0.02,
            log=log,
        )
        if any(v.train_step for v in case["variants"]):
            case_modes = ("train_step",)
        result.update(
            summary, modes=list(case_modes), seconds=time.perf_counter() - start
        )
        result["checked_targets"] = cases_module.check_targets(result, backend)
        out[name] = result
    return out


def versions():
    import numpy

    found = [f"keras {keras.__version__}", f"numpy {numpy.__version__}"]
    for module in ("jax", "torch", "tensorflow"):
        try:
            found.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return ", ".join(found)


def run_all(
    backends,
    names,
    tiny,
    out_dir,
    command,
    torch_mode="eager",
    repeats=None,
    log=print,
):
    """One subprocess per backend, merged into `out_dir`; returns the dict."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = {"cases": {}, "seconds": {}}
    for backend in backends:
        part = out_dir / f".partial_{backend}.json"
        args = [sys.executable, "-m", "benchmarks", "--worker", str(part)]
        args += ["--cases", ",".join(names)] if names else []
        args += ["--tiny"] if tiny else []
        args += ["--repeats", str(repeats)] if repeats else []
        env = {**os.environ, "KERAS_BACKEND": backend}
        env["KERAS_MOE_BENCH_TORCH"] = torch_mode
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        start = time.perf_counter()
        log(f"== {backend}")
        done = subprocess.run(args, env=env, cwd=REPO)
        merged["seconds"][backend] = time.perf_counter() - start
        if done.returncode != 0 or not part.exists():
            log(f"!! {backend} failed with exit code {done.returncode}")
            continue
        data = json.loads(part.read_text())
        part.unlink()
        merged.setdefault("torch_mode", data.get("torch_mode"))
        for name, result in data["cases"].items():
            merged["cases"].setdefault(name, {})[backend] = result
    merged["meta"] = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
        "versions": versions(),
        "repeats": repeats or (DEFAULT_REPEATS if not tiny else 2),
        "torch_mode": torch_mode,
        "tiny": tiny,
    }
    (out_dir / "benchmarks.json").write_text(json.dumps(merged, indent=1) + "\n")
    (out_dir / "benchmarks.md").write_text(report.markdown(merged))
    report.plot_sweep(merged, out_dir / "expert_sweep.png")
    return merged
