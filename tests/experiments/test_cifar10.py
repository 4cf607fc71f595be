import json

import keras
import numpy as np
import pytest

from keras_moe import cli
from keras_moe.experiments import cifar10
from keras_moe.experiments import common
from keras_moe.experiments import runs
from tests.experiments.conftest import quick_results
from tests.experiments.conftest import small_images_error
from tests.experiments.conftest import usage_error
from tests.experiments.conftest import write_image_folder


def test_faithful_models_have_the_original_parameter_counts():
    assert common.count_params(cifar10.build_model("cnn")) == 1_250_858
    assert common.count_params(cifar10.build_model("moe")) == 7_560_140


def test_cnn_params_counts_like_keras():
    model = cifar10.build_model("cnn", (20, 18, 3), 7, False, width=1.5)
    assert cifar10.cnn_params((20, 18, 3), 7, 1.5, 1.5) == common.count_params(model)


@pytest.mark.parametrize("name", ["cnn-wide", "cnn-wide-dense"])
def test_widened_cnns_match_the_moe_parameters(name):
    moe = common.count_params(cifar10.build_model("moe", augmentation=False))
    factor = cifar10.wide_cnn_factor(name=name)
    conv_width = 1.0 if name == "cnn-wide-dense" else factor
    wide = cifar10.cnn_params((32, 32, 3), 10, conv_width, factor)
    assert abs(wide - moe) / moe < 0.01


def test_quick_run_on_an_image_folder(tmp_path, capsys):
    # 12x12 is about the smallest input the original stack's pooling accepts.
    options = ["--models", "cnn", "moe", "--verbose", "0"]
    out, results = quick_results(tmp_path, "cifar10", 12, options)
    assert results["data"]["train_images"] == 12 and results["data"]["test_images"] == 6
    assert results["data"]["classes"] == ["cat", "dog", "frog"]
    assert list(results["models"]) == ["cnn", "moe"]
    for model in results["models"].values():
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert len(model["val_accuracy_mean"]) == 1
        assert model["history"][0]["val_accuracy"][-1] == model["test_accuracy"]
        assert model["step_seconds_median"] > 0
    assert results["models"]["moe"]["gating_params"] > 0
    assert results["models"]["cnn"]["gating_params"] == 0
    assert (out / "cifar10_val_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "| `moe` MoE (original) |" in summary
    assert "wrote" in capsys.readouterr().out


def _finished_run(out, name, repeat, accuracies, settings=None):
    """A folder as `keras-moe cifar10` leaves it, with one finished run."""
    head = {
        "experiment": "cifar10",
        "command": f"keras-moe cifar10 --models {name}",
        "backend": "jax",
        "date": "2026-01-01T00:00:00+00:00",
        "data": {"source": "x", "train_images": 4, "test_images": 2},
        "protocol": "p",
        "settings": {"epochs": len(accuracies), "seed": 0, **(settings or {})},
        "models": {},
    }
    out.mkdir(exist_ok=True)
    common.write_json(out, head, "data.json")
    folder = runs.run_dir(out, name, repeat)
    folder.mkdir(parents=True)
    runs.finish(
        folder,
        {
            "model": name,
            "repeat": repeat,
            "seed": repeat,
            "label": cifar10.LABELS[name],
            "params": 10,
            "gating_params": 0,
            "width_factor": None,
            "history": {"val_accuracy": accuracies, "loss": [1.0] * len(accuracies)},
            "step_seconds_median": 0.01,
            "fit_seconds": 1.0,
        },
    )
    return out


def test_merge_combines_disjoint_runs_in_model_order(tmp_path):
    a = _finished_run(tmp_path / "a", "moe", 0, [0.4, 0.6])
    _finished_run(a, "moe", 1, [0.4, 0.7])
    b = _finished_run(tmp_path / "b", "cnn", 0, [0.3, 0.5])
    _finished_run(b, "cnn", 1, [0.3, 0.4])
    out = tmp_path / "merged"
    cli.main(["cifar10", "--merge", str(a), str(b), "--out", str(out)])
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["models"]) == ["cnn", "moe"]
    assert [p["command"] for p in merged["parts"]] == [
        "keras-moe cifar10 --models moe",
        "keras-moe cifar10 --models cnn",
    ]
    np.testing.assert_allclose(
        merged["models"]["cnn"]["val_accuracy_mean"], [0.3, 0.45]
    )
    np.testing.assert_allclose(
        merged["models"]["moe"]["test_accuracy_runs"], [0.6, 0.7]
    )
    assert merged["models"]["moe"]["runs"] == 2
    (comparison,) = merged["comparisons"]
    assert (comparison["a"], comparison["b"]) == ("moe", "cnn")
    np.testing.assert_allclose(comparison["difference"], 0.2)
    summary = (out / "summary.md").read_text()
    assert "keras-moe cifar10 --models cnn" in summary
    assert "| `moe` − `cnn` | +20.00 |" in summary
    # The merged folder holds the runs themselves, so it can be merged again.
    assert runs.is_finished(runs.run_dir(out, "moe", 1))


def test_merge_refuses_the_same_run_twice(tmp_path):
    a = _finished_run(tmp_path / "a", "cnn", 0, [0.5])
    b = _finished_run(tmp_path / "b", "cnn", 0, [0.6])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cifar10", "--merge", str(a), str(b), "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "second, message",
    [
        ({"epochs": 3}, "one protocol"),
        ({"seed": 1}, "one protocol"),
    ],
)
def test_merge_refuses_mixed_protocols(tmp_path, capsys, second, message):
    a = _finished_run(tmp_path / "a", "cnn", 0, [0.5])
    b = _finished_run(tmp_path / "b", "moe", 0, [0.6], settings=second)
    assert message in usage_error(
        capsys, ["cifar10", "--merge", str(a), str(b), "--out", str(tmp_path / "m")]
    )


def test_welch_matches_a_hand_computation():
    a, b = [0.70, 0.72, 0.74, 0.73], [0.69, 0.70, 0.72, 0.71]
    result = common.welch(a, b, "moe", "cnn")
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 4
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 3)
    from scipy import stats

    np.testing.assert_allclose(result["difference"], np.mean(a) - np.mean(b))
    np.testing.assert_allclose(result["p_value"], 2 * stats.t.sf(abs(t), df))
    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    np.testing.assert_allclose(
        result["ci95"], [result["difference"] - half, result["difference"] + half]
    )
    assert common.welch([0.5], b, "moe", "cnn")["p_value"] is None


class _Killed(Exception):
    pass


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    image_folder = write_image_folder(tmp_path / "images", size=12)
    argv = ["cifar10", "--data", str(image_folder), "--epochs", "2", "--models", "moe"]
    argv += ["--batch-size", "4", "--verbose", "0"]
    cli.main([*argv, "--out", str(tmp_path / "whole")])

    save_state = runs.save_state

    def save_then_die(folder, model, state):
        save_state(folder, model, state)
        raise _Killed  # the process dies right after epoch 1's checkpoint

    monkeypatch.setattr(runs, "save_state", save_then_die)
    with pytest.raises(_Killed):
        cli.main([*argv, "--out", str(tmp_path / "split")])
    monkeypatch.setattr(runs, "save_state", save_state)
    folder = runs.run_dir(tmp_path / "split", "moe", 0)
    assert json.loads((folder / runs.STATE).read_text())["epochs_done"] == 1
    assert not runs.is_finished(folder)
    with pytest.raises(SystemExit):  # a second start must say --resume
        cli.main([*argv, "--out", str(tmp_path / "split")])
    cli.main([*argv, "--out", str(tmp_path / "split"), "--resume"])

    whole = runs.read_record(runs.run_dir(tmp_path / "whole", "moe", 0))
    split = runs.read_record(folder)
    assert set(whole["history"]) == set(split["history"])
    for key, values in whole["history"].items():
        assert len(values) == 2
        np.testing.assert_allclose(split["history"][key], values, rtol=1e-6)
    weights = {}
    for name in ("whole", "split"):
        model = cifar10.build_model("moe", (12, 12, 3), 3)
        cifar10.compile_model(model, cli.build_parser().parse_args(argv))
        model.optimizer.build(model.trainable_variables)
        model.load_weights(runs.run_dir(tmp_path / name, "moe", 0) / "final.weights.h5")
        weights[name] = [
            keras.ops.convert_to_numpy(v)
            for v in model.weights + model.optimizer.variables
            if v.name != "seed_generator_state"  # not saved: set per epoch
        ]
    assert len(weights["whole"]) > 40
    for a, b in zip(weights["whole"], weights["split"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_refuses_another_protocol(tmp_path, capsys):
    out = _finished_run(tmp_path / "out", "cnn", 0, [0.5])
    runs.write_protocol(out, {"epochs": 1})
    argv = ["cifar10", "--data", str(tmp_path), "--out", str(out), "--resume"]
    assert "same protocol" in usage_error(capsys, [*argv, "--epochs", "2"])


def test_claims_keep_processes_apart(tmp_path):
    folder = tmp_path / "run"
    assert runs.claim(folder)
    assert not runs.claim(folder)  # held by this live process
    runs.release(folder)
    (folder / runs.CLAIM).write_text(
        json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname()})
    )
    assert runs.claim(folder)  # its holder is dead: taken over


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--epochs", "0", "must be > 0"),
        ("--repeats", "0", "must be > 0"),
        ("--train-size", "-1", "must be > 0"),
        ("--train-size", "0", "must be > 0"),
        ("--test-size", "0", "must be > 0"),
        ("--batch-size", "0", "must be > 0"),
        ("--batch-size", "x", "must be an integer"),
        ("--learning-rate", "-1", "must be > 0"),
        ("--decay", "nan", "must be finite"),
        ("--seed", "-3", "must be >= 0"),
    ],
)
def test_counts_are_checked_before_anything_happens(
    tmp_path, capsys, option, value, message
):
    out = tmp_path / "never"
    err = usage_error(
        capsys, ["cifar10", "--data", "nowhere", "--out", str(out), option, value]
    )
    assert f"argument {option}: {message}" in err
    assert not out.exists()


def test_no_network_is_one_line_pointing_at_data(tmp_path, capsys, monkeypatch):
    import keras

    def offline():
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    out = tmp_path / "never"
    err = usage_error(capsys, ["cifar10", "--quick", "--out", str(out)])
    assert "could not be downloaded" in err and "--data PATH" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not out.exists()


def test_unreadable_data_is_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    err = usage_error(
        capsys, ["cifar10", "--data", str(tmp_path / "nowhere"), "--out", str(out)]
    )
    assert "must be an existing folder or tar archive" in err
    assert not out.exists()


def test_images_too_small_for_the_networks_are_one_line(tmp_path, capsys):
    err = small_images_error(tmp_path, capsys, "cifar10", size=9)
    assert "must hold images of at least 10 x 10 pixels" in err


@pytest.mark.parametrize("name", ["cnn", "moe", "moe-pooled"])
def test_the_smallest_images_are_the_smallest_the_networks_take(name):
    side = cifar10.MIN_IMAGE_SIZE
    model = cifar10.build_model(name, (side, side, 3), 3, augmentation=False)
    assert model.output_shape == (None, 3)
    with pytest.raises(ValueError):
        cifar10.build_model(name, (side - 1, side - 1, 3), 3, augmentation=False)


def test_progress_numbers_epochs_out_of_the_run(tmp_path, capsys):
    # fit runs once per epoch; the log must still read 1/2, 2/2 (not "2/2" alone).
    image_folder = write_image_folder(tmp_path / "images", size=12)
    argv = ["cifar10", "--data", str(image_folder), "--epochs", "2", "--models", "cnn"]
    cli.main(
        [*argv, "--batch-size", "6", "--verbose", "2", "--out", str(tmp_path / "o")]
    )
    lines = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("Epoch")
    ]
    assert lines == ["Epoch 1/2", "Epoch 2/2"]
