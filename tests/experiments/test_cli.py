import pathlib
import subprocess
import sys

import pytest

from keras_moe import cli
from tests.experiments.conftest import usage_error


def test_every_subcommand_is_a_module_with_the_four_names():
    import importlib

    assert {"cifar10", "jacobian", "mnist1d"} <= set(cli.SUBCOMMANDS)
    for module_name in cli.SUBCOMMANDS.values():
        module = importlib.import_module(module_name)
        assert module.DESCRIPTION.strip()
        assert callable(module.add_arguments) and callable(module.run)
        assert callable(module.prepare)


@pytest.mark.parametrize(
    "subcommand, options",
    [
        ("cifar10", ["--data", "--models", "--epochs", "--repeats", "--train-size"]),
        ("jacobian", ["--dim", "--units", "--samples", "--experts"]),
        ("mnist1d", ["--models", "--epochs", "--repeats"]),
    ],
)
def test_help_documents_the_options(capsys, subcommand, options):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([subcommand, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ["--out", "--quick", *options]:
        assert option in text


def test_help_shows_defaults_only_where_they_mean_something(capsys):
    """`--no-augmentation` must not read "(default: True)"; valued options
    keep their defaults."""
    with pytest.raises(SystemExit):
        cli.main(["cifar10", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "train without random shifts and flips (default" not in text
    assert "(default: None)" not in text
    assert "(default: 1e-06)" in text


def test_unknown_subcommand_is_an_error(capsys):
    assert "invalid choice" in usage_error(capsys, ["nope"])


def test_python_dash_m_runs_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "keras_moe", "--help"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    for subcommand in ("cifar10", "jacobian", "mnist1d"):
        assert subcommand in result.stdout


def test_out_defaults(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "keras_moe.experiments.jacobian.run", lambda args: seen.update(out=args.out)
    )
    cli.main(["jacobian"])
    assert seen["out"] == "results/jacobian"
    cli.main(["jacobian", "--quick"])
    assert seen["out"].startswith(cli.QUICK_OUT)


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Replaces every data loader and model builder of the experiments by one
    that records its call and fails; yields the list of calls."""
    from keras_moe.experiments import cifar10
    from keras_moe.experiments import data
    from keras_moe.experiments import jacobian
    from keras_moe.experiments import mnist1d
    from keras_moe.experiments import routing
    from keras_moe.experiments import upcycling

    calls = []
    targets = [
        (data, "load_cifar10"),
        (data, "load_image_folder"),
        (data, "load_mnist1d"),
        (upcycling, "load_stdlib_bytes"),
        (cifar10, "build_model"),
        (routing, "build_model"),
        (mnist1d, "build_model"),
        (upcycling, "build_dense"),
        (jacobian, "build_layers"),
        (cifar10, "merge"),
    ]
    for module, name in targets:

        def record(*args, name=f"{module.__name__}.{name}", **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        monkeypatch.setattr(module, name, record)
    return calls


# `{tmp}`: a temporary folder; `{file}`: a file in it; `{cifar10_out}`: an
# output folder of `keras-moe cifar10` (holding data.json). Every command line
# without `--out` gets `--out {tmp}/never`.
BAD_COMMAND_LINES = [
    # cifar10
    ("cifar10 --epochs 0", r"argument --epochs: must be > 0\. Received: '0'"),
    ("cifar10 --repeats x", r"argument --repeats: must be an integer\. Received: 'x'"),
    ("cifar10 --learning-rate inf", r"argument --learning-rate: must be finite"),
    ("cifar10 --decay nan", r"argument --decay: must be finite\. Received: 'nan'"),
    ("cifar10 --decay -1", r"argument --decay: must be >= 0\. Received: '-1'"),
    ("cifar10 --verbose 3", r"argument --verbose: invalid choice: 3"),
    ("cifar10 --models cnn nope", r"argument --models: invalid choice: 'nope'"),
    ("cifar10 --bogus", r"unrecognized arguments: --bogus"),
    (
        "cifar10 --data {tmp}/nowhere",
        r"argument --data: must be an existing folder or tar archive\. "
        r"Received: --data \S+/nowhere$",
    ),
    ("cifar10 --data ''", r"argument --data: must be an existing .* --data ''$"),
    (
        "cifar10 --seed 4294968",
        r"argument --seed: must be such that every seed is at most 2\*\*32 - 1 "
        r"\(epoch e of run r is seeded with \(--seed \+ r\) \* 1000 \+ e; here "
        r"--seed 4294967 at most\)\. Received: --seed 4294968, --repeats 1, "
        r"--epochs 16$",
    ),
    (
        "cifar10 --epochs 5000000000",
        r"argument --seed: .*no --seed is, with these settings\)\. Received: "
        r"--seed 0, --repeats 1, --epochs 5000000000$",
    ),
    (
        "cifar10 --merge {cifar10_out} {tmp}/nowhere",
        r"argument --merge: must be output folders of `keras-moe cifar10` "
        r"\(with data\.json and runs/\), which '\S+/nowhere' is not\. "
        r"Received: --merge \S+/cifar10_out \S+/nowhere$",
    ),
    (
        "cifar10 --merge {cifar10_out} --resume",
        r"argument --merge: must be given without --resume \(it trains nothing\)",
    ),
    # routing
    (
        "routing --top-k 3 --n-experts 2",
        r"argument --top-k: must be at most --n-experts\. "
        r"Received: --top-k 3, --n-experts 2$",
    ),
    (
        "routing --dim 2",
        r"argument --dim: must be a multiple of 4 \(the width of 4 attention "
        r"heads\)\. Received: --dim 2$",
    ),
    ("routing --dim 6", r"argument --dim: must be a multiple of 4 .*--dim 6$"),
    ("routing --quick --dim 6", r"argument --dim: must be a multiple of 4"),
    (
        "routing --depth 1",
        r"argument --depth: must be at least 2 \(the odd blocks hold the "
        r"mixtures\)\. Received: --depth 1$",
    ),
    ("routing --data {tmp}/nowhere", r"argument --data: must be an existing folder"),
    (
        "routing --seed 4294967294",
        r"argument --seed: .*\(run r is seeded with --seed \+ r; here --seed "
        r"4294967293 at most\)\. Received: --seed 4294967294, --repeats 3$",
    ),
    ("routing --balance-bias-rate 0", r"argument --balance-bias-rate: must be > 0"),
    (
        "routing --load-balance-weight -1",
        r"argument --load-balance-weight: must be >= 0",
    ),
    ("routing --models soft", r"argument --models: invalid choice: 'soft'"),
    # upcycling
    (
        "upcycling --top-k 3 --experts 2",
        r"argument --top-k: must be at most --experts\. "
        r"Received: --top-k 3, --experts 2$",
    ),
    (
        "upcycling --hidden-dim 4",
        r"argument --hidden-dim: must be a multiple of 8 \(4 attention heads of "
        r"an even size for the rotary embedding\)\. Received: --hidden-dim 4$",
    ),
    ("upcycling --hidden-dim 12", r"argument --hidden-dim: must be a multiple of 8"),
    (
        "upcycling --sequence-length 1000000",
        r"argument --sequence-length: must be at most \d+ \(a window and its "
        r"next byte must fit the standard library's validation bytes\)\. "
        r"Received: --sequence-length 1000000$",
    ),
    ("upcycling --sequence-length 100000000", r"argument --sequence-length: must"),
    ("upcycling --expert-noise -0.1", r"argument --expert-noise: must be >= 0"),
    ("upcycling --eval-every 0", r"argument --eval-every: must be > 0"),
    (
        "upcycling --seed 4294967296",
        r"argument --seed: .*here --seed 4294967295 at most\)\. "
        r"Received: --seed 4294967296, --repeats 1$",
    ),
    # jacobian
    ("jacobian --experts 2 0", r"argument --experts: must be > 0\. Received: '0'"),
    ("jacobian --experts", r"argument --experts: expected at least one argument"),
    ("jacobian --dim 1.5", r"argument --dim: must be an integer\. Received: '1\.5'"),
    (
        "jacobian --seed 4294967296",
        r"argument --seed: .*\(the one seed of the run; here --seed 4294967295 "
        r"at most\)\. Received: --seed 4294967296$",
    ),
    # mnist1d
    ("mnist1d --epochs -1", r"argument --epochs: must be > 0\. Received: '-1'"),
    ("mnist1d --models cnn moe-soft", r"argument --models: invalid choice"),
    (
        "mnist1d --seed 4294967295 --repeats 2",
        r"argument --seed: .*here --seed 4294967294 at most\)",
    ),
    # the output folder, of every command
    *[
        (
            f"{command} --out {{file}}",
            r"argument --out: must be a folder, not a file\. Received: --out \S+$",
        )
        for command in ("cifar10", "routing", "upcycling", "jacobian", "mnist1d")
    ],
    *[
        (
            f"{command} --out {{file}}/results",
            r"argument --out: must be a folder that can be created and written "
            r"\(Not a directory: '\S+'\)\. Received: --out \S+/results$",
        )
        for command in ("cifar10", "routing", "upcycling", "jacobian", "mnist1d")
    ],
    (
        "cifar10 --out ''",
        r"argument --out: must be a folder path\. Received: --out ''$",
    ),
    (
        "cifar10 --merge {cifar10_out} --out {file}",
        r"argument --out: must be a folder,",
    ),
]


@pytest.mark.parametrize("command_line, message", BAD_COMMAND_LINES)
def test_bad_arguments_are_one_line_before_any_work(
    tmp_path, capsys, nothing_loaded, command_line, message
):
    """Every command checks every argument before it loads data or builds a
    model: one line naming the option and the value received, exit status 2."""
    import re
    import shlex

    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "cifar10_out").mkdir()
    (tmp_path / "cifar10_out" / "data.json").write_text("{}")
    places = {
        "tmp": str(tmp_path),
        "file": str(tmp_path / "file"),
        "cifar10_out": str(tmp_path / "cifar10_out"),
    }
    argv = [part.format(**places) for part in shlex.split(command_line)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "never")]
    err = usage_error(capsys, argv)
    assert len(err.splitlines()) == 1, err
    # argparse reports unknown options from the top-level parser.
    command = "keras-moe" if "unrecognized" in message else f"keras-moe {argv[0]}"
    assert err.startswith(f"{command}: error: "), err
    assert re.search(message, err.rstrip("\n")), err
    assert nothing_loaded == []
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10_out", "file"]


def test_a_run_that_fails_before_writing_leaves_no_output_folder(tmp_path, monkeypatch):
    from keras_moe.experiments import common
    from keras_moe.experiments import jacobian

    def fail(args):
        raise common.ExperimentError("no can do")

    monkeypatch.setattr(jacobian, "run", fail)
    out = tmp_path / "a" / "b"
    with pytest.raises(SystemExit):
        cli.main(["jacobian", "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_out_is_made_before_the_run(tmp_path, monkeypatch):
    from keras_moe.experiments import jacobian

    seen = {}

    def run(args):
        seen["is_dir"] = pathlib.Path(args.out).is_dir()
        (pathlib.Path(args.out) / "results.json").write_text("{}")

    monkeypatch.setattr(jacobian, "run", run)
    cli.main(["jacobian", "--out", str(tmp_path / "a" / "b")])
    assert seen == {"is_dir": True}
    assert (tmp_path / "a" / "b" / "results.json").exists()
