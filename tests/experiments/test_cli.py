import subprocess
import sys

import pytest

from keras_moe import cli


def test_every_subcommand_is_a_module_with_the_three_names():
    import importlib

    assert {"cifar10", "jacobian", "mnist1d"} <= set(cli.SUBCOMMANDS)
    for module_name in cli.SUBCOMMANDS.values():
        module = importlib.import_module(module_name)
        assert module.DESCRIPTION.strip()
        assert callable(module.add_arguments) and callable(module.run)


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
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


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
