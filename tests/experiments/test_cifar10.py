import json

import numpy as np
import pytest

from keras_moe import cli
from keras_moe.experiments import cifar10
from keras_moe.experiments import common
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
    image_folder = write_image_folder(tmp_path / "images", size=12)
    out = tmp_path / "c"
    argv = ["cifar10", "--quick", "--data", str(image_folder), "--out", str(out)]
    cli.main([*argv, "--models", "cnn", "moe", "--verbose", "0"])
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "cifar10"
    assert results["command"].startswith("keras-moe cifar10 --quick")
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


def _part(folder, models, **changes):
    folder.mkdir()
    results = {
        "experiment": "cifar10",
        "command": f"keras-moe cifar10 --models {' '.join(models)}",
        "backend": "jax",
        "date": "2026-01-01T00:00:00+00:00",
        "data": {"source": "x", "train_images": 4, "test_images": 2},
        "protocol": "p",
        "settings": {"epochs": 2, "repeats": 2, "models": models, **changes},
        "models": {
            name: {
                "label": cifar10.LABELS[name],
                "params": 10,
                "gating_params": 0,
                "test_accuracy": 0.5,
                "test_accuracy_se": 0.1,
                "best_epoch_test_accuracy": 0.5,
                "val_accuracy_mean": [0.4, 0.5],
                "val_accuracy_se": [0.1, 0.1],
                "step_seconds_median": 0.01,
            }
            for name in models
        },
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_merge_combines_disjoint_runs_in_model_order(tmp_path):
    a = _part(tmp_path / "a", ["moe"])
    b = _part(tmp_path / "b", ["cnn"])
    out = tmp_path / "merged"
    cli.main(["cifar10", "--merge", str(a), str(b), "--out", str(out)])
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["models"]) == ["cnn", "moe"]
    assert [p["command"] for p in merged["parts"]] == [
        "keras-moe cifar10 --models moe",
        "keras-moe cifar10 --models cnn",
    ]
    np.testing.assert_allclose(merged["models"]["cnn"]["val_accuracy_mean"], [0.4, 0.5])
    assert "keras-moe cifar10 --models cnn" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    "second, message",
    [
        ({"models": ["cnn"]}, "disjoint"),
        ({"models": ["moe"], "epochs": 3}, "one protocol"),
    ],
)
def test_merge_refuses_mixed_protocols_and_duplicates(tmp_path, second, message):
    a = _part(tmp_path / "a", ["cnn"])
    models = second.pop("models")
    b = _part(tmp_path / "b", models, **second)
    with pytest.raises(ValueError, match=message):
        cli.main(["cifar10", "--merge", str(a), str(b), "--out", str(tmp_path / "m")])
