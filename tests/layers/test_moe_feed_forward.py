"""MoEFeedForward: Keras's layer harness, a NumPy reference, KerasHub's Mixtral
block, losses, masking, gradients, mixed precision, fit under jit_compile,
save/load and bad arguments."""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe import MoEFeedForward
from tests.conftest import skip_or_fail
from tests.conftest import to_numpy

D, M, E = 8, 12, 4


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_gelu(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def relative_path(variable):
    """A variable's path inside its layer: `expert_up_kernel`, `router/kernel`."""
    return variable.path.split("/", 1)[1]


def reference(layer, x, activation):
    """Loop over tokens and their top-k experts (float64)."""
    w = {relative_path(v): to_numpy(v).astype("float64") for v in layer.weights}
    tokens = x.reshape(-1, x.shape[-1]).astype("float64")
    logits = tokens @ w["router/kernel"]
    if "router/bias" in w:
        logits = logits + w["router/bias"]
    out = np.zeros_like(tokens)
    for t, z in enumerate(logits):
        experts = np.argsort(-z, kind="stable")[: layer.top_k]
        if layer.normalize_top_k:
            gates = np_softmax(z[experts])
        else:
            gates = np_softmax(z)[experts]
        for g, e in zip(gates, experts):
            h = tokens[t] @ w["expert_up_kernel"][e]
            if layer.use_bias:
                h = h + w["expert_up_bias"][e]
            if layer.gated:
                h = activation(tokens[t] @ w["expert_gate_kernel"][e]) * h
            else:
                h = activation(h)
            y = h @ w["expert_down_kernel"][e]
            if layer.use_bias:
                y = y + w["expert_down_bias"][e]
            out[t] += g * y
    return out.reshape(x.shape)


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)


class MoEFeedForwardLayerTest(testing.TestCase):
    def test_layer_harness(self):
        self.run_layer_test(
            MoEFeedForward,
            init_kwargs={"intermediate_dim": 6, "n_experts": 3, "top_k": 2},
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=5,
            expected_num_non_trainable_weights=2,
            expected_num_seed_generators=0,
            expected_num_losses=0,  # losses only in training
            supports_masking=True,
        )

    def test_layer_harness_gated_noisy_capacity(self):
        self.run_layer_test(
            MoEFeedForward,
            init_kwargs={
                "intermediate_dim": 6,
                "n_experts": 3,
                "top_k": 1,
                "gated": True,
                "use_bias": False,
                "router_bias": True,
                "noisy_gating": True,
                "capacity_factor": 1.0,
                "router_z_loss_weight": 1e-3,
                "seed": 3,
            },
            input_shape=(4, 4),
            expected_output_shape=(4, 4),
            expected_num_trainable_weights=6,
            expected_num_non_trainable_weights=2,
            expected_num_seed_generators=1,
            expected_num_losses=0,
            supports_masking=True,
        )


@pytest.mark.parametrize(
    "kwargs, activation",
    [
        ({"top_k": 2}, np_gelu),
        ({"top_k": 1, "normalize_top_k": False, "router_bias": True}, np_gelu),
        ({"top_k": 3, "gated": True, "activation": "silu"}, np_silu),
        ({"top_k": E, "use_bias": False, "activation": "silu"}, np_silu),
    ],
)
def test_matches_numpy_reference(kwargs, activation):
    x = np.random.default_rng(1).normal(size=(3, 5, D)).astype("float32")
    layer = MoEFeedForward(M, E, **kwargs)
    layer.build(x.shape)
    randomize(layer)
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference(layer, x, activation), rtol=1e-4, atol=1e-4
    )


def test_equals_keras_hub_mixtral_block():
    try:
        from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
    except ImportError as error:
        skip_or_fail(f"keras_hub is not importable ({error})")
    x = np.random.default_rng(2).normal(size=(2, 7, D)).astype("float32")
    mixtral = MixtralSparseMoeBlock(D, M, E, top_k=2)
    expected, _ = mixtral(x)
    layer = MoEFeedForward(M, E, top_k=2, activation="silu", gated=True, use_bias=False)
    layer.build(x.shape)
    bank = mixtral.expert_bank
    layer.router.kernel.assign(mixtral._sparse_feedforward_gate_dense.kernel)
    layer.expert_gate_kernel.assign(bank._expert_feedforward_gate_dense)
    layer.expert_up_kernel.assign(bank._expert_feedforward_intermediate_dense)
    layer.expert_down_kernel.assign(bank._expert_feedforward_output_dense)
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(expected), rtol=1e-5, atol=1e-6
    )


def test_weight_names_and_shapes():
    layer = MoEFeedForward(M, E, gated=True, router_bias=True, noisy_gating=True)
    layer.build((None, D))
    shapes = {relative_path(v): tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "router/kernel": (D, E),
        "router/bias": (E,),
        "expert_up_kernel": (E, D, M),
        "expert_gate_kernel": (E, D, M),
        "expert_down_kernel": (E, M, D),
        "expert_up_bias": (E, M),
        "expert_down_bias": (E, D),
        "router/noise_kernel": (D, E),
        "router/routing_stats_last": (E + 2,),
        "router/routing_stats_sum": (E + 3,),
    }
    assert layer.expert_weight_axes()["expert_gate_kernel"] == 0


def test_losses_only_in_training_and_match_numpy():
    x = np.random.default_rng(3).normal(size=(16, D)).astype("float32")
    layer = MoEFeedForward(
        M, E, top_k=2, load_balance_weight=0.5, router_z_loss_weight=0.25
    )
    layer(x)
    assert layer.losses == []
    layer(x, training=True)
    balance, z_loss = (float(to_numpy(v)) for v in layer.losses)
    logits = x.astype("float64") @ to_numpy(layer.router.kernel)
    probs = np_softmax(logits)
    chosen = np.argsort(-logits, axis=-1)[:, :2]
    f = np.bincount(chosen.ravel(), minlength=E) / chosen.size
    assert balance == pytest.approx(0.5 * E * np.sum(f * probs.mean(0)), rel=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    assert z_loss == pytest.approx(0.25 * np.mean(lse**2), rel=1e-5)


def test_masked_tokens_ignored():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, D)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    layer = MoEFeedForward(M, E, top_k=2, router_z_loss_weight=1.0)
    y = to_numpy(layer(x, mask=mask, training=True))
    losses = [float(to_numpy(v)) for v in layer.losses]
    stats = layer.routing_stats
    assert np.all(y[~mask] == 0.0)
    kept = x[mask][None]
    y_kept = to_numpy(layer(kept, training=True))
    np.testing.assert_allclose(y[mask], y_kept[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [float(to_numpy(v)) for v in layer.losses], losses, rtol=1e-5
    )
    np.testing.assert_allclose(layer.routing_stats["expert_load"], stats["expert_load"])


def test_keras_masking_reaches_the_layer():
    x = np.random.default_rng(5).normal(size=(2, 4, D)).astype("float32")
    x[1, 2:] = 0.0
    inputs = keras.Input((4, D))
    outputs = MoEFeedForward(M, E)(keras.layers.Masking(0.0)(inputs))
    y = to_numpy(keras.Model(inputs, outputs)(x))
    assert np.all(y[1, 2:] == 0.0) and np.all(y[0] != 0.0)


def test_gradients_reach_router_and_experts():
    x = np.random.default_rng(6).normal(size=(32, D)).astype("float32")
    y = np.random.default_rng(7).normal(size=(32, D)).astype("float32")
    layer = MoEFeedForward(M, E, top_k=2, gated=True, load_balance_weight=0.0)
    model = keras.Sequential([keras.Input((D,)), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = {v.path: to_numpy(v).copy() for v in layer.trainable_weights}
    model.train_on_batch(x, y)
    for v in layer.trainable_weights:
        assert not np.allclose(to_numpy(v), before[v.path]), v.path


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_router_in_float32(policy):
    keras.config.set_dtype_policy(policy)
    x = np.random.default_rng(8).normal(size=(2, 5, D)).astype("float32")
    layer = MoEFeedForward(M, E, top_k=2, noisy_gating=True, router_z_loss_weight=1.0)
    y = layer(x, training=True)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert layer.router.kernel.dtype == "float32"
    assert layer.expert_up_kernel.dtype == "float32"
    for loss in layer.losses:
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    assert np.isfinite(to_numpy(y).astype("float32")).all()
    assert sum(layer.routing_stats["expert_load"]) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_fit_jit_compile_statistics_and_save_load(tmp_path, capacity_factor):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(64, 3, D)).astype("float32")
    y = rng.normal(size=(64, 3, D)).astype("float32")
    layer = MoEFeedForward(
        M, E, top_k=2, capacity_factor=capacity_factor, noisy_gating=True, seed=1
    )
    model = keras.Sequential([keras.Input((3, D)), layer])
    model.compile("adam", "mse", jit_compile=True)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    mean = layer.routing_stats_mean()
    assert mean["steps"] == 4
    assert mean["expert_load"].sum() == pytest.approx(1.0, rel=1e-5)
    if capacity_factor is None:
        assert mean["dropped_fraction"] == 0.0
    else:
        assert mean["dropped_fraction"] > 0.0
    assert 0.0 < mean["router_entropy"] <= np.log(E) + 1e-6
    layer.reset_routing_stats()
    assert layer.routing_stats_mean() is None

    path = tmp_path / "moe.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        to_numpy(restored.predict(x, verbose=0)),
        to_numpy(model.predict(x, verbose=0)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert restored.layers[0].get_config() == layer.get_config()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"intermediate_dim": 0}, ValueError, "`intermediate_dim`.*Received"),
        ({"n_experts": 2.0}, TypeError, "`n_experts`.*Received"),
        ({"top_k": 5}, ValueError, "`top_k` must be an integer from 1 to `n_experts`"),
        ({"top_k": None}, TypeError, "`top_k`.*Received: top_k=None"),
        ({"capacity_factor": 0.0}, ValueError, "`capacity_factor`.*Received"),
        ({"load_balance_weight": -1.0}, ValueError, "`load_balance_weight`"),
        ({"gated": 1}, TypeError, "`gated` must be a bool"),
        ({"activation": "nope"}, ValueError, "`activation`.*Received"),
        ({"seed": -1}, ValueError, "`seed`.*Received"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"intermediate_dim": M, "n_experts": E, **kwargs}
    with pytest.raises(error, match=match):
        MoEFeedForward(**arguments)
