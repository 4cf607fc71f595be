"""SharedExpert: Keras's layer harness and a NumPy reference."""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe.layers.shared_expert import SharedExpert
from tests.conftest import to_numpy
from tests.harness import run_harness


class SharedExpertLayerTest(testing.TestCase):
    def test_layer_harness(self):
        # up, gate, down kernels and biases, the output gate's kernel.
        run_harness(
            self,
            SharedExpert,
            {"intermediate_dim": 5, "gated": True, "output_gate": True},
            ((2, 3, 4), (2, 3, 4)),
            (7, 0, None, 0),
        )


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("gated", [False, True])
def test_matches_numpy(gated):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4)).astype("float32")
    layer = SharedExpert(
        6, activation="relu", gated=gated, output_gate=True, use_bias=True
    )
    layer.build(x.shape)
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    w = {v.path.split("/", 1)[1]: to_numpy(v).astype("float64") for v in layer.weights}
    x64 = x.astype("float64")
    h = x64 @ w["up/kernel"] + w["up/bias"]
    if gated:
        h = np.maximum(x64 @ w["gate/kernel"] + w["gate/bias"], 0) * h
    else:
        h = np.maximum(h, 0)
    y = (h @ w["down/kernel"] + w["down/bias"]) * np_sigmoid(
        x64 @ w["output_gate_dense/kernel"]
    )
    np.testing.assert_allclose(to_numpy(layer(x)), y, rtol=1e-5, atol=1e-5)


def test_swiglu_limit_needs_gated():
    with pytest.raises(ValueError, match="`swiglu_limit` applies to gated"):
        SharedExpert(4, swiglu_limit=7.0)


def test_a_frozen_shared_expert_has_no_trainable_weights():
    """Its `Dense` sublayers, made in `build`, were trainable in a layer
    frozen before."""
    layer = SharedExpert(5, gated=True, output_gate=True, trainable=False)
    model = keras.Sequential([keras.Input((3, 4)), layer])
    assert model.trainable_weights == []
    assert len(layer.non_trainable_weights) == 7
    layer.trainable = True
    assert len(model.trainable_weights) == 7
