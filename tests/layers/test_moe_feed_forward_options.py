"""MoEFeedForward's options for the published models' blocks, beyond the
NumPy-reference cases of test_moe_feed_forward.py: the router's own
normalised input, jitter, the shared expert under a mask, `gelu_tanh`, fused
weights, the router's `router_dtype` (also on DenseMoE)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import MoEFeedForward
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import SharedExpert
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy
from tests.layers.test_moe_feed_forward import D
from tests.layers.test_moe_feed_forward import E
from tests.layers.test_moe_feed_forward import M
from tests.layers.test_moe_feed_forward import np_gelu
from tests.layers.test_moe_feed_forward import np_gelu_tanh
from tests.layers.test_moe_feed_forward import randomize
from tests.layers.test_moe_feed_forward import reference
from tests.layers.test_moe_feed_forward import relative_path


def test_router_inputs_and_their_normalisation():
    # Gemma 4 routes the hidden states and runs the experts on their norm.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 5, D)).astype("float32")
    hidden = rng.normal(size=(2, 5, D)).astype("float32") * 3.0
    layer = MoEFeedForward(
        experts=FeedForwardExperts(M, E, gated=True),
        router=TopKRouter(E, input_norm=True, norm_epsilon=1e-3),
    )
    layer.build(x.shape)
    randomize(layer)
    np.testing.assert_allclose(
        to_numpy(layer(x, router_inputs=hidden)),
        reference(layer, x, np_gelu, router_x=hidden),
        rtol=1e-4,
        atol=1e-4,
    )


def test_router_jitter_noise_in_training_only():
    x = np.random.default_rng(12).normal(size=(3, 4, D)).astype("float32")
    layer = MoEFeedForward(M, E, router_jitter_noise=0.2, seed=5)
    layer.build(x.shape)
    randomize(layer)
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference(layer, x, np_gelu), rtol=1e-4, atol=1e-4
    )
    y = to_numpy(layer(x, training=True))
    # The layer's first draw: a fresh generator of the same seed.
    noise = keras.random.uniform(
        (12, D), minval=0.8, maxval=1.2, seed=keras.random.SeedGenerator(5)
    )
    noisy = x * to_numpy(noise).reshape(x.shape)
    assert np.all(np.abs(to_numpy(noise) - 1.0) <= 0.2 + 1e-6)
    np.testing.assert_allclose(
        y, reference(layer, noisy, np_gelu), rtol=1e-4, atol=1e-4
    )
    assert not np.allclose(y, to_numpy(layer(x, training=True)))  # fresh noise


def test_masked_tokens_get_no_shared_expert_either():
    x = np.random.default_rng(13).normal(size=(2, 3, D)).astype("float32")
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    layer = MoEFeedForward(M, E, shared_expert=SharedExpert(5, output_gate=True))
    y = to_numpy(layer(x, mask=mask))
    assert np.all(y[~mask] == 0.0)
    np.testing.assert_allclose(y[mask], to_numpy(layer(x))[mask], rtol=1e-5, atol=1e-6)


def test_gelu_tanh_serialises():
    layer = MoEFeedForward(M, E, activation="gelu_tanh")
    restored = MoEFeedForward.from_config(layer.get_config())
    z = np.linspace(-3, 3, 7).astype("float32")
    np.testing.assert_allclose(
        to_numpy(restored.experts.activation(z)),
        np_gelu_tanh(z),
        rtol=1e-5,
        atol=1e-6,
    )
    assert restored.get_config() == layer.get_config()


def test_fused_weight_names_and_expert_axes():
    layer = MoEFeedForward(
        experts=FeedForwardExperts(
            M,
            E,
            gated=True,
            gate_up_layout="concatenated",
            output_scale=True,
            name="experts",
        ),
        router=TopKRouter(E, input_norm=True, name="router"),
        shared_expert=SharedExpert(
            5, gated=True, output_gate=True, name="shared_expert"
        ),
    )
    layer.build((None, D))
    shapes = {relative_path(v): tuple(v.shape) for v in layer.trainable_weights}
    assert shapes == {
        "router/kernel": (D, E),
        "experts/gate_up_kernel": (E, D, 2 * M),
        "experts/down_kernel": (E, M, D),
        "experts/gate_up_bias": (E, 2 * M),
        "experts/down_bias": (E, D),
        "experts/scale": (E,),
        "router/input_scale": (D,),
        "shared_expert/up/kernel": (D, 5),
        "shared_expert/up/bias": (5,),
        "shared_expert/gate/kernel": (D, 5),
        "shared_expert/gate/bias": (5,),
        "shared_expert/down/kernel": (5, D),
        "shared_expert/down/bias": (D,),
        "shared_expert/output_gate_dense/kernel": (D, 1),
    }
    expert_weights = {
        "gate_up_kernel",
        "down_kernel",
        "gate_up_bias",
        "down_bias",
        "scale",
    }
    assert layer.experts.expert_weight_axes() == {name: 0 for name in expert_weights}


def called_in_bfloat16(seed, n_tokens, **router_options):
    """A top-2 `MoEFeedForward` (softmax before the top-k) under
    `mixed_bfloat16`, called in training on random tokens: returns the
    tokens, the layer, its output and its losses (taken before any later
    call of its router clears them)."""
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = np.random.default_rng(seed).normal(size=(n_tokens, D)).astype("float32")
    router = TopKRouter(E, top_k=2, softmax_before_top_k=True, **router_options)
    layer = MoEFeedForward(experts=FeedForwardExperts(M, E), router=router)
    y = layer(x, training=True)
    return x, layer, y, layer.losses


def test_router_dtype_compute_routes_in_the_compute_dtype():
    x, layer, y, losses = called_in_bfloat16(
        14,
        64,
        router_dtype="compute",
        load_balance_weight=0.01,
        router_z_loss_weight=1.0,
    )
    router = layer.router
    tokens = ops.cast(x, "bfloat16")
    logits = router.logits(tokens)
    weights, experts = router(tokens)
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(weights.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    # What a bfloat16 model computes: a bfloat16 matmul, softmax, top-k.
    expected_logits = ops.matmul(tokens, ops.cast(router.kernel, "bfloat16"))
    probs = ops.softmax(expected_logits)
    top, chosen = ops.top_k(probs, 2)
    np.testing.assert_array_equal(to_numpy(logits), to_numpy(expected_logits))
    np.testing.assert_array_equal(to_numpy(experts), to_numpy(chosen))
    np.testing.assert_array_equal(
        to_numpy(weights), to_numpy(top / ops.sum(top, axis=-1, keepdims=True))
    )
    assert len(losses) == 2
    for loss in losses:
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"


def test_router_dtype_float32_is_the_default_and_float32():
    x, layer, _, losses = called_in_bfloat16(15, 16, load_balance_weight=0.01)
    assert layer.router.router_dtype == "float32"
    tokens = ops.cast(x, "bfloat16")
    logits = layer.router.logits(tokens)
    weights, _ = layer.router(tokens)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    expected = to_numpy(tokens).astype("float64") @ to_numpy(layer.router.kernel)
    np.testing.assert_allclose(to_numpy(logits), expected, rtol=1e-5, atol=1e-5)
    assert len(losses) == 1
    for loss in losses:
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"


def test_dense_moe_passes_router_dtype_to_its_router():
    from keras_moe import DenseMoE

    layer = DenseMoE(4, E, top_k=2, router_dtype="compute", dtype="mixed_bfloat16")
    layer.build((None, D))
    assert layer.router.router_dtype == "compute"
    assert DenseMoE.from_config(layer.get_config()).router_dtype == "compute"
    with pytest.raises(ValueError, match="`router_dtype` applies only to sparse"):
        DenseMoE(4, E, router_dtype="compute")
