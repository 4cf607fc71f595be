"""MoEFeedForward: Keras's layer harness, a NumPy reference (every option: the
router's order of operations and dtype, jitter, the router's own normalised
input, fused and clamped gated experts, biases, output scales, the shared
expert), KerasHub's Mixtral block, losses, masking, gradients, mixed precision,
fit under jit_compile, save/load and bad arguments."""

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


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_top_k(logits, layer):
    """The chosen experts and their weights, as the layer's options say."""
    k = layer.top_k
    if layer.softmax_before_top_k:
        probs = np_softmax(logits)
        experts = np.argsort(-probs, kind="stable")[:k]
        gates = probs[experts]
        return experts, gates / gates.sum() if layer.normalize_top_k else gates
    experts = np.argsort(-logits, kind="stable")[:k]
    if layer.normalize_top_k:
        return experts, np_softmax(logits[experts])
    return experts, np_softmax(logits)[experts]


def reference(layer, x, activation, router_x=None):
    """Loop over tokens and their top-k experts (float64)."""
    w = {relative_path(v): to_numpy(v).astype("float64") for v in layer.weights}
    m = layer.intermediate_dim
    tokens = x.reshape(-1, x.shape[-1]).astype("float64")
    r = tokens if router_x is None else router_x.reshape(tokens.shape)
    if layer.router_input_norm:
        rms = np.sqrt(np.mean(r**2, axis=-1, keepdims=True) + layer.router_norm_epsilon)
        r = r / rms / np.sqrt(r.shape[-1]) * w["router_input_scale"]
    logits = r @ w["router/kernel"]
    if "router/bias" in w:
        logits = logits + w["router/bias"]

    def glu(gate, up):
        if layer.swiglu_limit is not None:
            limit, alpha = layer.swiglu_limit, layer.swiglu_alpha
            gate = np.minimum(gate, limit)
            up = np.clip(up, -limit, limit)
            return (up + 1) * gate * np_sigmoid(alpha * gate)
        return activation(gate) * up

    out = np.zeros_like(tokens)
    for t, z in enumerate(logits):
        experts, gates = np_top_k(z, layer)
        for g, e in zip(gates, experts):
            if layer.gate_up_layout == "separate":
                h = tokens[t] @ w["expert_up_kernel"][e]
                if layer.use_bias:
                    h = h + w["expert_up_bias"][e]
                if layer.gated:
                    gate = tokens[t] @ w["expert_gate_kernel"][e]
                    if layer.gate_bias:
                        gate = gate + w["expert_gate_bias"][e]
                    h = glu(gate, h)
                else:
                    h = activation(h)
            else:
                h = tokens[t] @ w["expert_gate_up_kernel"][e]
                if layer.use_bias:
                    h = h + w["expert_gate_up_bias"][e]
                if layer.gate_up_layout == "concatenated":
                    h = glu(h[:m], h[m:])
                else:
                    h = glu(h[::2], h[1::2])
            y = h @ w["expert_down_kernel"][e]
            if layer.use_bias:
                y = y + w["expert_down_bias"][e]
            if layer.expert_output_scale:
                y = y * w["expert_scale"][e]
            out[t] += g * y
    if layer.shared_intermediate_dim is not None:

        def dense(name, inputs):
            y = inputs @ w[f"{name}/kernel"]
            return y + w[f"{name}/bias"] if f"{name}/bias" in w else y

        h = dense("shared_expert/up", tokens)
        h = (
            glu(dense("shared_expert/gate", tokens), h)
            if layer.gated
            else activation(h)
        )
        y = dense("shared_expert/down", h)
        if layer.shared_expert_gate:
            y = y * np_sigmoid(dense("shared_expert/output_gate_dense", tokens))
        out += y
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

    def test_layer_harness_model_options(self):
        # Every option of the published models' blocks at once: fused gated
        # experts, output scales, the router's own normalised input in the
        # compute dtype, jitter and a gated shared expert.
        self.run_layer_test(
            MoEFeedForward,
            init_kwargs={
                "intermediate_dim": 6,
                "n_experts": 3,
                "top_k": 2,
                "gated": True,
                "gate_up_layout": "interleaved",
                "swiglu_limit": 7.0,
                "router_bias": True,
                "router_dtype": "compute",
                "softmax_before_top_k": True,
                "router_jitter_noise": 0.1,
                "router_input_norm": True,
                "activation_dtype": "float32",
                "expert_output_scale": True,
                "shared_intermediate_dim": 5,
                "shared_expert_gate": True,
                "seed": 2,
            },
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 4),
            # router kernel and bias, gate/up and down kernels and biases,
            # the scales, shared up/gate/down kernels and biases, its gate.
            expected_num_trainable_weights=15,
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
        # Mixtral's block: softmax, top-k, renormalised; SiLU in float32.
        (
            {
                "gated": True,
                "activation": "silu",
                "use_bias": False,
                "softmax_before_top_k": True,
                "activation_dtype": "float32",
            },
            np_silu,
        ),
        # Qwen MoE's: concatenated gate|up, top-k of the softmax without
        # renormalising, a shared expert behind a sigmoid gate.
        (
            {
                "top_k": 3,
                "gated": True,
                "activation": "silu",
                "use_bias": False,
                "gate_up_layout": "concatenated",
                "softmax_before_top_k": True,
                "normalize_top_k": False,
                "shared_intermediate_dim": 7,
                "shared_expert_gate": True,
            },
            np_silu,
        ),
        # GPT-OSS's: interleaved gate/up with biases, a router bias, the
        # clamped SwiGLU (a small limit, so that the clamps act).
        (
            {
                "gated": True,
                "gate_up_layout": "interleaved",
                "router_bias": True,
                "swiglu_limit": 0.5,
                "swiglu_alpha": 1.702,
            },
            None,
        ),
        # Gemma 4's experts: tanh-GELU in float32, per-expert output scales;
        # the router's own normalised input (here the layer's input).
        (
            {
                "gated": True,
                "use_bias": False,
                "activation": "gelu_tanh",
                "activation_dtype": "float32",
                "expert_output_scale": True,
                "router_input_norm": True,
                "softmax_before_top_k": True,
            },
            np_gelu_tanh,
        ),
        # A gate bias with separate kernels; an ungated shared expert.
        (
            {"gated": True, "gate_bias": True, "shared_intermediate_dim": 5},
            np_gelu,
        ),
        ({"shared_intermediate_dim": 5}, np_gelu),
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
        ({"router_dtype": "float16"}, ValueError, "`router_dtype` must be one of"),
        ({"softmax_before_top_k": 1}, TypeError, "`softmax_before_top_k` must be"),
        ({"router_jitter_noise": 1.5}, ValueError, "`router_jitter_noise`.*0 to 1"),
        ({"router_norm_epsilon": 0.0}, ValueError, "`router_norm_epsilon`"),
        ({"gate_up_layout": "fused"}, ValueError, "`gate_up_layout` must be one"),
        (
            {"gate_up_layout": "interleaved"},
            ValueError,
            "`gate_up_layout` applies to gated experts only.*gated=False",
        ),
        ({"swiglu_limit": 7.0}, ValueError, "`swiglu_limit` applies to gated"),
        ({"gated": True, "swiglu_limit": -1.0}, ValueError, "`swiglu_limit`"),
        (
            {"gated": True, "gate_up_layout": "concatenated", "gate_bias": True},
            ValueError,
            "`gate_bias`.*Received: gate_bias=True",
        ),
        ({"activation_dtype": "bfloat16"}, ValueError, "`activation_dtype` must"),
        ({"shared_intermediate_dim": 0}, ValueError, "`shared_intermediate_dim`"),
        (
            {"shared_expert_gate": True},
            ValueError,
            "`shared_expert_gate`.*shared_intermediate_dim=None",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"intermediate_dim": M, "n_experts": E, **kwargs}
    with pytest.raises(error, match=match):
        MoEFeedForward(**arguments)
