"""ExpertUsage: per-epoch routing statistics in the fit logs, a CSV and a PNG."""

import csv

import keras
import numpy as np
import pytest

from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe.callbacks import ExpertUsage
from keras_moe.routing import TopKRouter


def test_expert_usage_logs_csv_and_heatmap(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3, 6)).astype("float32")
    y = rng.normal(size=(32, 3, 6)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((3, 6)),
            MoEFeedForward(8, 4, top_k=1, capacity_factor=0.5, name="ffn"),
            DenseMoE(6, 3, top_k=2, name="dense"),
            DenseMoE(6, 2, name="soft"),  # not sparse: not recorded
        ]
    )
    model.compile("adam", "mse", jit_compile=True)
    usage = ExpertUsage(tmp_path / "usage.csv", tmp_path / "usage.png")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[usage])

    logs = history.history
    assert len(logs["ffn_max_load"]) == 2
    assert all(1.0 <= v <= 4.0 for v in logs["ffn_max_load"])
    assert all(v > 0.0 for v in logs["ffn_dropped_fraction"])  # capacity 0.5
    assert logs["dense_dropped_fraction"] == [0.0, 0.0]  # dropless
    assert all(0.0 < v <= np.log(3) + 1e-6 for v in logs["dense_router_entropy"])
    assert not any(key.startswith("soft_") for key in logs)

    assert usage.loads["ffn"].shape == (2, 4)
    np.testing.assert_allclose(usage.loads["dense"].sum(axis=1), 1.0, rtol=1e-5)

    with open(tmp_path / "usage.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["layer"]) for r in rows] == [
        ("0", "ffn"),
        ("0", "dense"),
        ("1", "ffn"),
        ("1", "dense"),
    ]
    assert all(r["steps"] == "4" for r in rows)  # reset every epoch
    assert float(rows[2]["max_load"]) == pytest.approx(logs["ffn_max_load"][1])
    loads = [float(rows[0][f"load_{i}"]) for i in range(4)]
    assert sum(loads) == pytest.approx(1.0, rel=1e-5)

    png = (tmp_path / "usage.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_collapsed_router_shows_in_the_logs():
    # A router biased hard towards expert 0 sends every token there.
    layer = MoEFeedForward(
        4, 4, router=TopKRouter(4, top_k=1, use_bias=True), name="ffn"
    )
    model = keras.Sequential([keras.Input((5,)), layer])
    layer.router.bias.assign(np.array([100.0, 0.0, 0.0, 0.0], "float32"))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.default_rng(1).normal(size=(16, 5)).astype("float32")
    usage = ExpertUsage()
    history = model.fit(x, x, batch_size=8, epochs=1, verbose=0, callbacks=[usage])
    assert history.history["ffn_max_load"] == [pytest.approx(4.0)]
    np.testing.assert_allclose(usage.loads["ffn"][0], [1.0, 0.0, 0.0, 0.0])


def _sub_model(name, n_experts, collapse):
    inputs = keras.Input((5,))
    router = TopKRouter(n_experts, top_k=1, use_bias=True)
    layer = MoEFeedForward(4, n_experts, router=router, name="moe")
    model = keras.Model(inputs, layer(inputs), name=name)
    if collapse:
        bias = np.zeros(n_experts, "float32")
        bias[0] = 100.0
        layer.router.bias.assign(bias)
    return model


def test_layers_of_one_name_in_two_sub_models_are_reported_apart(tmp_path):
    """Two sub-models, each with an `MoEFeedForward(name="moe")`: two reports,
    keyed by each layer's path in the model."""
    encoder = _sub_model("encoder", 4, collapse=True)
    decoder = _sub_model("decoder", 2, collapse=False)
    inputs = keras.Input((5,))
    model = keras.Model(inputs, decoder(encoder(inputs)))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.default_rng(2).normal(size=(16, 5)).astype("float32")
    usage = ExpertUsage(tmp_path / "usage.csv")
    history = model.fit(x, x, batch_size=8, epochs=1, verbose=0, callbacks=[usage])

    assert list(usage.loads) == ["encoder/moe", "decoder/moe"]
    assert usage.loads["encoder/moe"].shape == (1, 4)
    assert usage.loads["decoder/moe"].shape == (1, 2)
    np.testing.assert_allclose(usage.loads["encoder/moe"][0], [1.0, 0.0, 0.0, 0.0])
    assert history.history["encoder/moe_max_load"] == [pytest.approx(4.0)]
    assert history.history["decoder/moe_max_load"][0] < 2.0
    assert not any(key.startswith("moe_") for key in history.history)
    with open(tmp_path / "usage.csv") as f:
        assert [r["layer"] for r in csv.DictReader(f)] == ["encoder/moe", "decoder/moe"]


class _TwoOfOneName(keras.layers.Layer):
    """Two sibling sublayers that their author gave one name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.first = MoEFeedForward(4, 2, top_k=1, name="moe")
        self.second = MoEFeedForward(4, 3, top_k=1, name="moe")

    def build(self, input_shape):
        self.first.build(input_shape)
        self.second.build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, x):
        return self.second(self.first(x))


def test_sibling_layers_of_one_name_get_apart_keys():
    model = keras.Sequential([keras.Input((5,)), _TwoOfOneName(name="block")])
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.default_rng(3).normal(size=(8, 5)).astype("float32")
    usage = ExpertUsage()
    model.fit(x, x, batch_size=8, epochs=1, verbose=0, callbacks=[usage])
    assert {key: load.shape for key, load in usage.loads.items()} == {
        "block/moe": (1, 2),
        "block/moe_2": (1, 3),
    }
