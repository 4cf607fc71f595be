import json

import keras
import numpy as np
import pytest

from keras_moe import cli
from keras_moe.experiments import jacobian


def test_spectrum_summary_of_a_known_spectrum():
    summary = jacobian.spectrum_summary([4.0, 2.0, 2.0, 0.0])
    assert summary["numerical_rank"] == 3
    assert summary["largest_over_smallest"] == float("inf")
    assert summary["largest_over_median"] == pytest.approx(2.0)
    p = np.array([0.5, 0.25, 0.25])
    assert summary["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_command_writes_results_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "jac"
    argv = ["jacobian", "--dim", "8", "--units", "6", "--samples", "5"]
    cli.main([*argv, "--experts", "1", "3", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "jacobian"
    assert results["backend"] == keras.backend.backend()
    assert results["command"].startswith("keras-moe jacobian --dim 8")
    assert list(results["models"]) == ["Dense relu", "DenseMoE K=1", "DenseMoE K=3"]
    dense = results["models"]["Dense relu"]
    assert dense["params"] == 8 * 6 + 6
    spectrum = np.array(dense["mean_singular_values"])
    assert spectrum.shape == (6,)
    assert np.all(np.diff(spectrum) <= 1e-6)  # sorted, decreasing
    assert 1.0 <= dense["effective_rank"] <= 6.0
    assert (out / "jacobian_spectra.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "DenseMoE K=3" in summary and "effective rank" in summary
    assert str(out / "results.json") in capsys.readouterr().out
