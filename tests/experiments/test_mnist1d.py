import json

from keras_moe import cli
from keras_moe.experiments import common
from keras_moe.experiments import mnist1d


def test_the_paper_cnn_has_its_parameter_count():
    # conv 1*25*5+25, 2 x (25*25*3+25), linear 125*10+10 (Greydanus 2020's ConvBase).
    assert common.count_params(mnist1d.build_model("cnn")) == 5210


def test_quick_run_writes_results_plot_and_summary(tmp_path):
    out = tmp_path / "m"
    argv = ["mnist1d", "--quick", "--models", "moe", "--epochs", "1", "--verbose", "0"]
    cli.main([*argv, "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "mnist1d"
    assert results["data"]["train_sequences"] == 4000
    assert results["paper_test_accuracy"]["CNN"] == 0.94
    assert list(results["models"]) == ["moe"]
    moe = results["models"]["moe"]
    assert 0.0 <= moe["test_accuracy"] <= 1.0
    assert moe["history"][0]["val_accuracy"] == [moe["test_accuracy"]]
    assert moe["params"] > 5210
    assert (out / "mnist1d_test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "GRU (paper)" in (out / "summary.md").read_text()
