"""SoftMoE: Keras's layer harness, a NumPy reference (both `normalize`
settings, masks, slots), statistics, masking, gradients, mixed precision,
fit under jit_compile, save/load, expert parallel axes and bad arguments."""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe import SoftMoE
from keras_moe.callbacks import ExpertUsage
from tests.conftest import assert_keras_masking_reaches
from tests.conftest import reloaded_with_same_outputs
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.layers.test_moe_feed_forward import bank_weights
from tests.layers.test_moe_feed_forward import np_expert
from tests.layers.test_moe_feed_forward import np_gelu
from tests.layers.test_moe_feed_forward import np_gelu_tanh
from tests.layers.test_moe_feed_forward import np_silu
from tests.layers.test_moe_feed_forward import np_softmax
from tests.layers.test_moe_feed_forward import randomize
from tests.layers.test_moe_feed_forward import relative_path

D, M, E = 6, 7, 3


def np_l2_normalize(x, axis):
    return x / np.sqrt(np.sum(x**2, axis=axis, keepdims=True) + 1e-6)


def reference(layer, x, activation, mask=None):
    """Per sequence, in float64: logits, dispatch over the unmasked tokens,
    combine over the slots, slot `i` through expert `i // S`, and the
    combine; plus the statistics `(loads, 0, entropy)`."""
    w = {relative_path(v): to_numpy(v).astype("float64") for v in layer.weights}
    bank = bank_weights(layer.experts)
    x = x.astype("float64")
    slots = layer.slots_per_expert
    out = np.zeros_like(x)
    shares, valid_all = [], []
    for b, sequence in enumerate(x):
        valid = np.ones(len(sequence), bool) if mask is None else mask[b]
        phi = w["router_kernel"]
        if layer.normalize:
            logits = np_l2_normalize(sequence, 1) @ (
                w["router_scale"] * np_l2_normalize(phi, 0)
            )
        else:
            logits = sequence @ phi
        dispatch = np.zeros_like(logits)
        if valid.any():
            dispatch[valid] = np_softmax(logits[valid], axis=0)
        combine = np_softmax(logits, axis=1)
        slot_inputs = dispatch.T @ sequence
        slot_outputs = [
            np_expert(bank, layer.experts, activation, i // slots, slot_input)
            for i, slot_input in enumerate(slot_inputs)
        ]
        out[b] = combine @ np.array(slot_outputs)
        out[b][~valid] = 0.0
        shares.append(combine.reshape(len(sequence), -1, slots).sum(-1))
        valid_all.append(valid)
    shares = np.concatenate(shares)[np.concatenate(valid_all)]
    load = shares.mean(0) if len(shares) else np.zeros(layer.n_experts)
    entropy = -(shares * np.log(shares)).sum(-1).mean() if len(shares) else 0.0
    return out, (load, 0.0, entropy)


class SoftMoELayerTest(testing.TestCase):
    def test_layer_harness(self):
        # The statistics: last values, their sums, the steps.
        kwargs = {"intermediate_dim": 6, "n_experts": 3, "slots_per_expert": 2}
        run_harness(self, SoftMoE, kwargs, ((2, 5, 4), (2, 5, 4)), (6, 7, 0, 0))

    def test_layer_harness_gated_unnormalized(self):
        kwargs = {
            "intermediate_dim": 6,
            "n_experts": 2,
            "gated": True,
            "use_bias": False,
            "normalize": False,
            "activation": "silu",
        }
        run_harness(self, SoftMoE, kwargs, ((2, 3, 4), (2, 3, 4)), (4, 7, 0, 0))


@pytest.mark.parametrize(
    "kwargs, activation",
    [
        ({}, np_gelu),
        ({"normalize": False, "slots_per_expert": 3}, np_gelu),
        ({"gated": True, "activation": "silu", "use_bias": False}, np_silu),
        (
            {"normalize": False, "gated": True, "activation": "silu", "n_experts": 1},
            np_silu,
        ),
        # keras-moe's activations too (the expert bank is MoEFeedForward's).
        ({"gated": True, "activation": "gelu_tanh"}, np_gelu_tanh),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy_reference(kwargs, activation, masked):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, D)).astype("float32")
    mask = None
    if masked:
        # A full, a partly and an entirely masked sequence.
        mask = np.array([[1] * 5, [1, 0, 1, 1, 0], [0] * 5], bool)
    arguments = {"intermediate_dim": M, "n_experts": E, "slots_per_expert": 2}
    layer = SoftMoE(**{**arguments, **kwargs})
    layer.build(x.shape)
    randomize(layer)
    if layer.normalize:
        layer.router_scale.assign(1.7)
    y = to_numpy(layer(x, mask=mask))
    expected, (load, dropped, entropy) = reference(layer, x, activation, mask)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    stats = layer.routing_stats
    np.testing.assert_allclose(stats["expert_load"], load, rtol=1e-5, atol=1e-6)
    assert stats["dropped_fraction"] == dropped
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-4, abs=1e-6)


def test_masked_tokens_change_nothing_for_the_others():
    # Soft MoE works per sequence: a masked token is as good as absent.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, D)).astype("float32")
    mask = np.array([[1, 0, 1, 1, 0, 1]], bool)
    layer = SoftMoE(M, E, slots_per_expert=2)
    x_masked = x.copy()
    x_masked[~mask] = 1e4  # whatever a masked token holds
    y = to_numpy(layer(x_masked, mask=mask))
    shorter = to_numpy(layer(x[mask][None]))
    np.testing.assert_allclose(y[mask], shorter[0], rtol=1e-5, atol=1e-6)
    assert np.all(y[~mask] == 0.0)


@pytest.mark.parametrize("shape", [(0, 4, D), (2, 0, D)])
@pytest.mark.parametrize("training", [False, True])
def test_an_empty_batch_or_sequence_with_a_mask(shape, training):
    """With a mask, an empty batch or empty sequences crashed ("zero-size
    array to reduction operation min"); they give an empty output, as
    without a mask."""
    layer = SoftMoE(M, E, slots_per_expert=2)
    layer.build((None, 4, D))
    x = np.ones(shape, "float32")
    unmasked = to_numpy(layer(x, training=training))
    y = to_numpy(layer(x, mask=np.ones(shape[:2], bool), training=training))
    assert y.shape == unmasked.shape == shape
    assert np.isfinite(layer.routing_stats["router_entropy"])
    # A batch whose every token is masked: zero outputs, finite statistics.
    x = np.ones((2, 4, D), "float32")
    y = to_numpy(layer(x, mask=np.zeros((2, 4), bool), training=training))
    assert np.all(y == 0.0)
    assert np.isfinite(layer.routing_stats["expert_load"]).all()


def test_keras_masking_reaches_the_layer():
    x = np.random.default_rng(3).normal(size=(2, 4, D))
    assert_keras_masking_reaches(SoftMoE(M, E), x)


def test_weight_names_shapes_and_expert_axes():
    layer = SoftMoE(M, E, slots_per_expert=4, gated=True)
    layer.build((None, 5, D))
    shapes = {relative_path(v): tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "router_kernel": (D, E * 4),
        "router_scale": (),
        "experts/up_kernel": (E, D, M),
        "experts/gate_kernel": (E, D, M),
        "experts/down_kernel": (E, M, D),
        "experts/up_bias": (E, M),
        "experts/down_bias": (E, D),
        "statistics/expert_load": (E,),
        "statistics/dropped_fraction": (),
        "statistics/router_entropy": (),
        "statistics/expert_load_sum": (E,),
        "statistics/dropped_fraction_sum": (),
        "statistics/router_entropy_sum": (),
        "statistics/steps": (),
    }
    axes = layer.experts.expert_weight_axes()
    assert axes == {
        name.split("/")[1]: 0 for name in shapes if name.startswith("experts/")
    }


def test_gradients_reach_router_scale_and_experts():
    x = np.random.default_rng(4).normal(size=(8, 5, D)).astype("float32")
    y = np.random.default_rng(5).normal(size=(8, 5, D)).astype("float32")
    layer = SoftMoE(M, E, gated=True)
    model = keras.Sequential([keras.Input((5, D)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = {v.path: to_numpy(v).copy() for v in layer.trainable_weights}
    model.train_on_batch(x, y)
    for v in layer.trainable_weights:
        assert not np.allclose(to_numpy(v), before[v.path]), v.path


@pytest.mark.parametrize("policy", ["mixed_float16"])
def test_mixed_precision_keeps_the_router_in_float32(policy):
    keras.config.set_dtype_policy(policy)
    x = np.random.default_rng(6).normal(size=(2, 5, D)).astype("float32")
    layer = SoftMoE(M, E, slots_per_expert=2)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert layer.router_kernel.dtype == "float32"
    assert layer.experts.up_kernel.dtype == "float32"
    assert np.isfinite(to_numpy(y).astype("float32")).all()
    assert sum(layer.routing_stats["expert_load"]) == pytest.approx(1.0, rel=1e-5)


def test_fit_jit_compile_statistics_and_save_load(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 4, D)).astype("float32")
    y = rng.normal(size=(32, 4, D)).astype("float32")
    layer = SoftMoE(M, E, slots_per_expert=2)
    model = keras.Sequential([keras.Input((4, D)), layer])
    model.compile("adam", "mse", jit_compile=True)
    usage = ExpertUsage()
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[usage])
    assert np.isfinite(history.history["loss"]).all()
    # ExpertUsage finds the layer and logs what it recorded.
    (logged,) = history.history[f"{layer.name}_max_load"]
    assert usage.loads[layer.name].shape == (1, E)
    mean = layer.routing_stats_mean()
    assert logged == pytest.approx(mean["expert_load"].max() * E, rel=1e-5)
    assert mean["steps"] == 4
    assert mean["expert_load"].sum() == pytest.approx(1.0, rel=1e-5)
    assert mean["dropped_fraction"] == 0.0
    assert 0.0 < mean["router_entropy"] <= np.log(E) + 1e-6
    layer.reset_routing_stats()
    assert layer.routing_stats_mean() is None

    restored = reloaded_with_same_outputs(model, tmp_path / "soft.keras", x)
    assert restored.layers[0].get_config() == layer.get_config()


@pytest.mark.parametrize("frozen_by", ["constructor", "attribute"])
def test_a_frozen_layer_neither_trains_nor_moves_its_statistics(frozen_by):
    """`SoftMoE(..., trainable=False)` froze only the layer's own weights:
    its experts trained and its statistics moved."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 4, D)).astype("float32")
    layer = SoftMoE(M, E, trainable=frozen_by == "attribute")
    if frozen_by == "attribute":
        layer.trainable = False
    model = keras.Sequential([keras.Input((4, D)), layer])
    assert model.trainable_weights == []
    model.compile(keras.optimizers.SGD(0.5), "mse")
    before = [to_numpy(v).copy() for v in layer.weights]
    model.fit(x, rng.normal(size=x.shape), batch_size=4, verbose=0)
    for value, variable in zip(before, layer.weights):
        if variable.name in ("expert_load", "router_entropy", "dropped_fraction"):
            continue  # the last call's values still report
        np.testing.assert_array_equal(to_numpy(variable), value, variable.path)
    assert layer.routing_stats_mean() is None


def test_config_round_trip():
    layer = SoftMoE(
        M,
        E,
        slots_per_expert=3,
        activation="silu",
        gated=True,
        use_bias=False,
        normalize=False,
        kernel_initializer="zeros",
        router_initializer="glorot_uniform",
        kernel_regularizer="l2",
    )
    clone = SoftMoE.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"intermediate_dim": 0}, ValueError, "`intermediate_dim`.*Received"),
        ({"n_experts": 2.0}, TypeError, "`n_experts`.*Received"),
        ({"slots_per_expert": 0}, ValueError, "`slots_per_expert`.*Received"),
        ({"normalize": 1}, TypeError, "`normalize` must be a bool"),
        ({"gated": "no"}, TypeError, "`gated` must be a bool"),
        ({"activation": "nope"}, ValueError, "`activation`.*Received"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"intermediate_dim": M, "n_experts": E, **kwargs}
    with pytest.raises(error, match=match):
        SoftMoE(**arguments)


def test_a_rank_2_input_is_a_clear_error():
    with pytest.raises(ValueError, match="rank 3"):
        SoftMoE(M, E).build((4, D))


def test_statistics_before_build_are_a_clear_error():
    with pytest.raises(ValueError, match="before it is built"):
        _ = SoftMoE(M, E).routing_stats
