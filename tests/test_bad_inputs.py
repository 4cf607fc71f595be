"""Inputs a careless or unlucky user gives: integer tensors, a new spatial size
after build, every token masked, an empty batch, methods of the wrong mode and
weights that do not fit. Each gets the right result or a clear error, never a
silently wrong answer, on every backend."""

import re

import keras
import numpy as np
import pytest

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe import blocks
from keras_moe import compat
from keras_moe.callbacks import ExpertUsage
from tests.conftest import to_numpy

# name -> (make the layer, input shape without the batch)
LAYERS = {
    "dense_soft": (lambda: DenseMoE(3, 4, gating_activation="softmax"), (6,)),
    "dense_top_k": (lambda: DenseMoE(3, 4, top_k=2), (6,)),
    "dense_top_k_capacity": (
        lambda: DenseMoE(3, 4, top_k=2, capacity_factor=1.0),
        (5, 6),
    ),
    "feed_forward": (lambda: MoEFeedForward(5, 4, top_k=2), (3, 6)),
    "feed_forward_capacity": (
        lambda: MoEFeedForward(5, 4, top_k=1, capacity_factor=0.5),
        (3, 6),
    ),
    "feed_forward_expert_choice": (
        lambda: MoEFeedForward(
            5, 4, top_k=2, routing="expert_choice", capacity_factor=1.0
        ),
        (3, 6),
    ),
    "feed_forward_qwen_moe": (
        lambda: blocks.qwen_moe(5, 4, top_k=2, shared_intermediate_dim=3),
        (3, 6),
    ),
    "soft_moe": (lambda: SoftMoE(5, 4, slots_per_expert=2), (3, 6)),
    "conv1d_flatten": (lambda: Conv1DMoE(3, 2, 3, padding="causal"), (7, 2)),
    "conv2d_pooled": (lambda: Conv2DMoE(3, 2, 3, gating_input="pooled"), (5, 5, 2)),
    "conv2d_pooled_mixed_kernel": (
        lambda: Conv2DMoE(2, 8, 3, gating_input="pooled", padding="same"),
        (5, 5, 2),
    ),
    "conv3d_local": (lambda: Conv3DMoE(2, 2, 2, gating_input="local"), (4, 4, 4, 1)),
}


def sparse_losses(layer):
    return [float(to_numpy(loss)) for loss in layer.losses]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_integer_inputs_give_the_float_result(name):
    make, shape = LAYERS[name]
    layer = make()
    x = np.random.default_rng(0).integers(-3, 4, size=(2,) + shape).astype("int32")
    from_float = to_numpy(layer(x.astype("float32")))
    from_int = to_numpy(layer(x))
    assert from_int.dtype == np.float32
    np.testing.assert_allclose(from_int, from_float, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_an_empty_batch_gives_an_empty_output_and_zero_losses(name):
    make, shape = LAYERS[name]
    layer = make()
    layer(np.ones((2,) + shape, "float32"))  # built on a real batch first
    y = layer(np.zeros((0,) + shape, "float32"), training=True)
    assert tuple(y.shape) == tuple(layer.compute_output_shape((0,) + shape))
    for loss in sparse_losses(layer):
        assert loss == 0.0
    router = getattr(layer, "router", None)
    if router is not None:
        stats = router.routing_stats
        assert stats["dropped_fraction"] == 0.0
        np.testing.assert_array_equal(stats["expert_load"], 0.0)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_empty_batch_losses_are_zero_not_nan(capacity_factor):
    layer = MoEFeedForward(
        5,
        4,
        top_k=2,
        capacity_factor=capacity_factor,
        load_balance_weight=1.0,
        router_z_loss_weight=1.0,
    )
    y = layer(np.zeros((0, 3, 6), "float32"), training=True)
    assert tuple(y.shape) == (0, 3, 6)
    assert sparse_losses(layer) == [0.0, 0.0]
    assert layer.routing_stats["router_entropy"] == 0.0


@pytest.mark.parametrize("layer_kind", ["dense", "feed_forward"])
def test_every_token_masked_drops_nothing(layer_kind):
    if layer_kind == "dense":
        layer = DenseMoE(3, 4, top_k=2, capacity_factor=1.0)
    else:
        layer = MoEFeedForward(5, 4, top_k=2, capacity_factor=1.0)
    x = np.random.default_rng(1).normal(size=(2, 5, 6)).astype("float32")
    mask = np.zeros((2, 5), bool)
    y = to_numpy(layer(x, mask=mask, training=True))
    np.testing.assert_array_equal(y, 0.0)
    assert layer.routing_stats["dropped_fraction"] == 0.0
    assert layer.routing_stats_mean()["dropped_fraction"] == 0.0


def test_expert_usage_epoch_means_are_zero_when_every_token_is_masked():
    inputs = keras.Input((4, 6))
    masked = keras.layers.Masking(0.0)(inputs)
    outputs = MoEFeedForward(5, 4, top_k=2, capacity_factor=1.0, name="ffn")(masked)
    model = keras.Model(inputs, outputs)
    model.compile("sgd", "mse")
    usage = ExpertUsage()
    history = model.fit(
        np.zeros((8, 4, 6), "float32"),
        np.zeros((8, 4, 6), "float32"),
        epochs=1,
        verbose=0,
        callbacks=[usage],
    )
    assert history.history["ffn_dropped_fraction"] == [0.0]


@pytest.mark.parametrize(
    "layer, built_on, called_on",
    [
        (lambda: Conv2DMoE(3, 2, 3), (5, 5, 3), (10, 5, 3)),
        (lambda: Conv2DMoE(3, 2, 3), (5, 5, 3), (5, 6, 3)),
        (lambda: Conv1DMoE(3, 2, 3, padding="same"), (8, 2), (16, 2)),
        (lambda: Conv3DMoE(2, 2, 2), (4, 4, 4, 1), (4, 4, 8, 1)),
        (
            lambda: Conv2DMoE(3, 2, 3, data_format="channels_first"),
            (3, 5, 5),
            (3, 10, 5),
        ),
    ],
)
def test_flatten_gating_refuses_another_input_size(layer, built_on, called_on):
    """A whole-sample gate fits only the size it was built for: a new size
    must not be folded into other samples (a batch of 2 out of 1)."""
    layer = layer()
    layer(np.ones((1,) + built_on, "float32"))
    with pytest.raises(ValueError) as error:
        layer(np.ones((1,) + called_on, "float32"))
    message = str(error.value)
    assert str(built_on[-1]) in message and "expected" in message.lower()
    assert str((1,) + called_on) in message or str(called_on[0]) in message


def test_routing_stats_of_a_soft_dense_moe_is_a_clear_error():
    layer = DenseMoE(3, 4)
    layer(np.ones((2, 6), "float32"))
    for call in (
        lambda: layer.routing_stats,
        layer.routing_stats_mean,
        layer.reset_routing_stats,
    ):
        with pytest.raises(ValueError, match="only for sparse routing.*top_k=None"):
            call()


def test_a_failed_seed_load_leaves_an_unbuilt_layer_unbuilt():
    layer = DenseMoE(3, 2)
    rng = np.random.default_rng(2)
    good = [
        rng.normal(size=(6, 3, 2)),
        rng.normal(size=(6, 2)),
        rng.normal(size=(3, 2)),
        rng.normal(size=(2,)),
    ]
    wrong_gates = list(good)
    wrong_gates[1] = rng.normal(size=(5, 2))  # input dimension 5, not 6
    with pytest.raises(ValueError, match="gating_kernel"):
        compat.load_seed_weights(layer, wrong_gates)
    assert not layer.built
    compat.load_seed_weights(layer, good)  # and the right weights still load
    assert layer.built
    np.testing.assert_allclose(to_numpy(layer.gating_kernel), good[1], rtol=1e-6)


def test_a_failed_seed_load_leaves_a_built_layer_unchanged():
    layer = Conv1DMoE(3, 2, 3)
    layer.build((None, 8, 2))
    before = [to_numpy(v).copy() for v in layer.weights]
    rng = np.random.default_rng(3)
    arrays = [
        rng.normal(size=(3, 2, 6)),
        rng.normal(size=(9, 2, 3, 2)),  # built for length 8, not 9
        rng.normal(size=(1, 3, 2)),
        rng.normal(size=(3, 2)),
    ]
    with pytest.raises(ValueError, match="gating_kernel"):
        compat.load_seed_weights(layer, arrays)
    for old, variable in zip(before, layer.weights):
        np.testing.assert_array_equal(to_numpy(variable), old)


@pytest.mark.parametrize("router_shape", [(2, 10, 4), (10, 8), (5, 2, 8), (2, 5, 4)])
def test_router_inputs_of_another_shape_are_refused(router_shape):
    """`(2, 10, 4)` for inputs `(2, 5, 8)` has the same size: it was reshaped
    into rows that are no token's."""
    layer = MoEFeedForward(5, 4, top_k=2)
    x = np.ones((2, 5, 8), "float32")
    router_inputs = np.ones(router_shape, "float32")
    match = (
        r"`router_inputs` must have the shape of the inputs, \(2, 5, 8\).*"
        rf"Received: router_inputs.shape={re.escape(str(router_shape))}"
    )
    with pytest.raises(ValueError, match=match):
        layer(x, router_inputs=router_inputs)
    # In a functional model: refused when the model runs.
    inputs = keras.Input((5, 8))
    router = keras.Input(router_shape[1:])
    model = keras.Model([inputs, router], layer(inputs, router_inputs=router))
    with pytest.raises(ValueError, match="`router_inputs` must have the shape"):
        model([x, router_inputs])
    same = to_numpy(layer(x, router_inputs=x * 2))
    assert same.shape == x.shape
