"""MoEFeedForward: Keras's layer harness, a NumPy reference (every option of
its sublayers: the router's order of operations and dtype, its own normalised
input, fused and clamped gated experts, biases, output scales, the shared
expert; the published models' blocks of `keras_moe.blocks`), KerasHub's
Mixtral block, losses, masking, gradients, mixed precision, fit under
jit_compile, save/load and bad arguments."""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe import MoEFeedForward
from keras_moe import blocks
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import SharedExpert
from keras_moe.layers.feed_forward_experts import WEIGHTS
from keras_moe.routing import TopKRouter
from tests.conftest import assert_a_training_step_moves_every_weight
from tests.conftest import assert_keras_masking_reaches
from tests.conftest import reloaded_with_same_outputs
from tests.conftest import skip_or_fail
from tests.conftest import to_numpy
from tests.harness import run_harness

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
    """A variable's path inside its layer: `experts/up_kernel`, `router/kernel`."""
    return variable.path.split("/", 1)[1]


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bank_weights(bank):
    """A `FeedForwardExperts`'s weights by name (`up_kernel`, ...), float64."""
    return {
        name: to_numpy(getattr(bank, name)).astype("float64")
        for name, _ in WEIGHTS
        if getattr(bank, name) is not None
    }


def np_glu(gate, up, activation, unit):
    """`act(gate) * up`, or the clamped SwiGLU of `unit`'s `swiglu_limit`."""
    if unit.swiglu_limit is not None:
        limit, alpha = unit.swiglu_limit, unit.swiglu_alpha
        gate = np.minimum(gate, limit)
        up = np.clip(up, -limit, limit)
        return (up + 1) * gate * np_sigmoid(alpha * gate)
    return activation(gate) * up


def np_expert(w, bank, activation, e, x):
    """Expert `e` of the bank `bank` (its options; `w` its `bank_weights`) on
    rows `x` `(..., d)`, float64."""
    m = bank.intermediate_dim
    if bank.gate_up_layout == "separate":
        h = x @ w["up_kernel"][e]
        if bank.use_bias:
            h = h + w["up_bias"][e]
        if bank.gated:
            gate = x @ w["gate_kernel"][e]
            if bank.use_gate_bias:
                gate = gate + w["gate_bias"][e]
            h = np_glu(gate, h, activation, bank)
        else:
            h = activation(h)
    else:
        h = x @ w["gate_up_kernel"][e]
        if bank.use_bias:
            h = h + w["gate_up_bias"][e]
        if bank.gate_up_layout == "concatenated":
            h = np_glu(h[..., :m], h[..., m:], activation, bank)
        else:
            h = np_glu(h[..., ::2], h[..., 1::2], activation, bank)
    y = h @ w["down_kernel"][e]
    if bank.use_bias:
        y = y + w["down_bias"][e]
    if bank.output_scale:
        y = y * w["scale"][e]
    return y


def np_shared_expert(shared, activation, x):
    """A `SharedExpert` on `x` `(..., d)`, float64."""

    def dense(layer, inputs):
        y = inputs @ to_numpy(layer.kernel).astype("float64")
        if layer.bias is not None:
            y = y + to_numpy(layer.bias).astype("float64")
        return y

    h = dense(shared.up, x)
    if shared.gated:
        h = np_glu(dense(shared.gate, x), h, activation, shared)
    else:
        h = activation(h)
    y = dense(shared.down, h)
    if shared.output_gate:
        y = y * np_sigmoid(dense(shared.output_gate_dense, x))
    return y


def np_router_logits(router, r):
    """A router's logits of the rows `r` `(n, d)`, float64."""
    if router.input_norm:
        rms = np.sqrt(np.mean(r**2, axis=-1, keepdims=True) + router.norm_epsilon)
        scale = to_numpy(router.input_scale).astype("float64")
        r = r / rms / np.sqrt(r.shape[-1]) * scale
    logits = r @ to_numpy(router.kernel).astype("float64")
    if router.bias is not None:
        logits = logits + to_numpy(router.bias).astype("float64")
    return logits


def np_top_k(logits, router):
    """The chosen experts and their weights, as the router's options say."""
    k = router.top_k
    if router.softmax_before_top_k:
        probs = np_softmax(logits)
        experts = np.argsort(-probs, kind="stable")[:k]
        gates = probs[experts]
        return experts, gates / gates.sum() if router.normalize_top_k else gates
    experts = np.argsort(-logits, kind="stable")[:k]
    if router.normalize_top_k:
        return experts, np_softmax(logits[experts])
    return experts, np_softmax(logits)[experts]


def reference(layer, x, activation, router_x=None):
    """Loop over tokens and their top-k experts (float64)."""
    bank = layer.experts
    w = bank_weights(bank)
    tokens = x.reshape(-1, x.shape[-1]).astype("float64")
    r = tokens if router_x is None else router_x.reshape(tokens.shape)
    logits = np_router_logits(layer.router, r.astype("float64"))
    out = np.zeros_like(tokens)
    for t, z in enumerate(logits):
        experts, gates = np_top_k(z, layer.router)
        for g, e in zip(gates, experts):
            out[t] += g * np_expert(w, bank, activation, e, tokens[t])
    if layer.shared_expert is not None:
        out += np_shared_expert(layer.shared_expert, activation, tokens)
    return out.reshape(x.shape)


def randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)


def with_same_weights(layer, other, shape, seed):
    """Random inputs of `shape`, with `layer` and `other` built on them and
    given the same weights: `layer`'s randomized ones."""
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    layer.build(x.shape)
    other.build(x.shape)
    randomize(layer)
    other.set_weights(layer.get_weights())
    return x


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class NoisyCapacityFeedForward(MoEFeedForward):
    """`MoEFeedForward` of gated experts without biases and a noisy top-1
    router with a bias and a capacity, made afresh for every layer Keras's
    harness makes (`from_config` passes the saved ones)."""

    def __init__(self, experts=None, router=None, shared_expert=None, **kwargs):
        dtype = kwargs.get("dtype")
        if experts is None:
            experts = FeedForwardExperts(
                6, 3, gated=True, use_bias=False, dtype=dtype, name="experts"
            )
        if router is None:
            router = TopKRouter(
                3,
                top_k=1,
                use_bias=True,
                noisy_gating=True,
                capacity_factor=1.0,
                router_z_loss_weight=1e-3,
                seed=3,
                dtype=dtype,
                name="router",
            )
        super().__init__(
            experts=experts, router=router, shared_expert=shared_expert, **kwargs
        )


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class EveryOptionFeedForward(MoEFeedForward):
    """`MoEFeedForward` with every option of the published models' blocks at
    once: fused gated experts with the clamped SwiGLU in float32 and output
    scales, a router with a bias and its own normalised input routing in the
    compute dtype, jitter and a gated shared expert; made afresh for every
    layer Keras's harness makes."""

    def __init__(self, experts=None, router=None, shared_expert=None, **kwargs):
        dtype = kwargs.get("dtype")
        if experts is None:
            experts = FeedForwardExperts(
                6,
                3,
                gated=True,
                gate_up_layout="interleaved",
                swiglu_limit=7.0,
                activation_dtype="float32",
                output_scale=True,
                dtype=dtype,
                name="experts",
            )
        if router is None:
            router = TopKRouter(
                3,
                top_k=2,
                use_bias=True,
                router_dtype="compute",
                softmax_before_top_k=True,
                input_norm=True,
                dtype=dtype,
                name="router",
            )
        if shared_expert is None:
            shared_expert = SharedExpert(
                5,
                gated=True,
                output_gate=True,
                swiglu_limit=7.0,
                activation_dtype="float32",
                dtype=dtype,
                name="shared_expert",
            )
        kwargs = {"router_jitter_noise": 0.1, "seed": 2, **kwargs}
        super().__init__(
            experts=experts, router=router, shared_expert=shared_expert, **kwargs
        )


class MoEFeedForwardLayerTest(testing.TestCase):
    def test_layer_harness(self):
        # The router's statistics: last values, their sums, the steps; losses
        # only in training.
        kwargs = {"intermediate_dim": 6, "n_experts": 3, "top_k": 2}
        run_harness(self, MoEFeedForward, kwargs, ((2, 3, 4), (2, 3, 4)), (5, 7, 0, 0))

    def test_layer_harness_gated_noisy_capacity(self):
        # router kernel, bias and noise kernel; up, gate, down kernels.
        run_harness(self, NoisyCapacityFeedForward, {}, ((4, 4), (4, 4)), (6, 7, 1, 0))

    def test_layer_harness_model_options(self):
        # router kernel, bias and input scale, gate/up and down kernels
        # and biases, the scales, shared up/gate/down kernels and
        # biases, its gate.
        run_harness(
            self, EveryOptionFeedForward, {}, ((2, 3, 4), (2, 3, 4)), (15, 7, 1, 0)
        )


def composed(experts=None, router=None, shared_expert=None, **kwargs):
    """`MoEFeedForward` of a `FeedForwardExperts(M, E, **experts)`, a
    `TopKRouter(E, **router)` and a `SharedExpert(**shared_expert)`."""
    return MoEFeedForward(
        experts=FeedForwardExperts(M, E, **(experts or {})),
        router=TopKRouter(E, **(router or {})),
        shared_expert=None if shared_expert is None else SharedExpert(**shared_expert),
        **kwargs,
    )


# (make the layer, the NumPy activation): the shorthand, sublayers with each
# option, and the published models' blocks.
REFERENCE_CASES = {
    "top2": (lambda: MoEFeedForward(M, E, top_k=2), np_gelu),
    "top1_unnormalized_router_bias": (
        lambda: composed(
            router={"top_k": 1, "normalize_top_k": False, "use_bias": True}
        ),
        np_gelu,
    ),
    "top3_gated_silu": (
        lambda: MoEFeedForward(M, E, top_k=3, gated=True, activation="silu"),
        np_silu,
    ),
    "all_experts_no_bias": (
        lambda: MoEFeedForward(M, E, top_k=E, use_bias=False, activation="silu"),
        np_silu,
    ),
    # Mixtral's block: softmax, top-k, renormalised; SiLU in float32.
    "mixtral": (lambda: blocks.mixtral(M, E), np_silu),
    # Qwen MoE's: concatenated gate|up, top-k of the softmax without
    # renormalising, a shared expert behind a sigmoid gate.
    "qwen_moe": (
        lambda: blocks.qwen_moe(M, E, top_k=3, shared_intermediate_dim=7),
        np_silu,
    ),
    "qwen3_moe": (lambda: blocks.qwen3_moe(M, E, top_k=3), np_silu),
    "qwen3_5_moe": (
        lambda: blocks.qwen3_5_moe(M, E, top_k=2, shared_intermediate_dim=5),
        np_silu,
    ),
    # GPT-OSS's: interleaved gate/up with biases, a router bias, the clamped
    # SwiGLU (a small limit, so that the clamps act).
    "gpt_oss": (lambda: blocks.gpt_oss(M, E, top_k=2, swiglu_limit=0.5), None),
    # Gemma 4's experts: tanh-GELU in float32, per-expert output scales; the
    # router's own normalised input (here the layer's input).
    "gemma4": (lambda: blocks.gemma4(M, E), np_gelu_tanh),
    # A gate bias with separate kernels and a gated shared expert.
    "gate_bias_gated_shared_expert": (
        lambda: composed(
            experts={"gated": True, "use_gate_bias": True},
            shared_expert={"intermediate_dim": 5, "gated": True},
        ),
        np_gelu,
    ),
    # The shorthand with an ungated shared expert.
    "shared_expert": (
        lambda: MoEFeedForward(M, E, shared_expert=SharedExpert(5)),
        np_gelu,
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_matches_numpy_reference(case):
    make, activation = REFERENCE_CASES[case]
    x = np.random.default_rng(1).normal(size=(3, 5, D)).astype("float32")
    layer = make()
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
    layer.experts.gate_kernel.assign(bank._expert_feedforward_gate_dense)
    layer.experts.up_kernel.assign(bank._expert_feedforward_intermediate_dense)
    layer.experts.down_kernel.assign(bank._expert_feedforward_output_dense)
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(expected), rtol=1e-5, atol=1e-6
    )


def test_weight_names_and_shapes():
    layer = MoEFeedForward(
        experts=FeedForwardExperts(M, E, gated=True),
        router=TopKRouter(E, use_bias=True, noisy_gating=True),
    )
    layer.build((None, D))
    shapes = {relative_path(v): tuple(v.shape) for v in layer.weights}
    statistics = {"expert_load": (E,), "dropped_fraction": (), "router_entropy": ()}
    assert shapes == {
        "feed_forward_experts/up_kernel": (E, D, M),
        "feed_forward_experts/gate_kernel": (E, D, M),
        "feed_forward_experts/down_kernel": (E, M, D),
        "feed_forward_experts/up_bias": (E, M),
        "feed_forward_experts/down_bias": (E, D),
        "top_k_router/kernel": (D, E),
        "top_k_router/bias": (E,),
        "top_k_router/noise_kernel": (D, E),
        **{
            f"top_k_router/statistics/{name}{suffix}": shape
            for name, shape in statistics.items()
            for suffix in ("", "_sum")
        },
        "top_k_router/statistics/steps": (),
    }
    # The shorthand names its sublayers after their attributes.
    shorthand = MoEFeedForward(M, E, gated=True)
    shorthand.build((None, D))
    assert {relative_path(v).split("/")[0] for v in shorthand.weights} == {
        "experts",
        "router",
    }
    assert layer.experts.expert_weight_axes()["gate_kernel"] == 0


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
    x = np.random.default_rng(5).normal(size=(2, 4, D))
    assert_keras_masking_reaches(MoEFeedForward(M, E), x)


def test_gradients_reach_router_and_experts():
    x = np.random.default_rng(6).normal(size=(32, D)).astype("float32")
    y = np.random.default_rng(7).normal(size=(32, D)).astype("float32")
    layer = MoEFeedForward(M, E, top_k=2, gated=True, load_balance_weight=0.0)
    assert_a_training_step_moves_every_weight(layer, x, y)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_router_in_float32(policy):
    keras.config.set_dtype_policy(policy)
    x = np.random.default_rng(8).normal(size=(2, 5, D)).astype("float32")
    layer = MoEFeedForward(
        experts=FeedForwardExperts(M, E),
        router=TopKRouter(
            E,
            top_k=2,
            noisy_gating=True,
            load_balance_weight=0.01,
            router_z_loss_weight=1.0,
        ),
    )
    y = layer(x, training=True)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert layer.router.kernel.dtype == "float32"
    assert layer.experts.up_kernel.dtype == "float32"
    assert len(layer.losses) == 2
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
        experts=FeedForwardExperts(M, E),
        router=TopKRouter(
            E, top_k=2, capacity_factor=capacity_factor, noisy_gating=True, seed=1
        ),
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

    restored = reloaded_with_same_outputs(
        model, tmp_path / "moe.keras", x, predict=True
    )
    assert restored.layers[0].get_config() == layer.get_config()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"intermediate_dim": 0}, ValueError, "`intermediate_dim`.*Received"),
        ({"intermediate_dim": None}, ValueError, "`intermediate_dim` is required"),
        ({"n_experts": 2.0}, TypeError, "`n_experts`.*Received"),
        ({"n_experts": None}, ValueError, "`n_experts` is required"),
        ({"top_k": 5}, ValueError, "`top_k` must be an integer from 1 to `n_experts`"),
        ({"top_k": None}, TypeError, "`top_k`.*Received: top_k=None"),
        ({"capacity_factor": 0.0}, ValueError, "`capacity_factor`.*Received"),
        ({"load_balance_weight": -1.0}, ValueError, "`load_balance_weight`"),
        ({"gated": 1}, TypeError, "`gated` must be a bool"),
        ({"activation": "nope"}, ValueError, "`activation`.*Received"),
        ({"seed": -1}, ValueError, "`seed`.*Received"),
        ({"router_jitter_noise": 1.5}, ValueError, "`router_jitter_noise`.*0 to 1"),
        ({"routing": "sinkhorn"}, ValueError, "`routing` must be one of"),
        ({"layout": "rows2"}, ValueError, "`layout` must be one of"),
        (
            {"layout": "blocks", "capacity_factor": 1.0},
            ValueError,
            "`layout='blocks'` is a dropless layout.*Received",
        ),
        ({"router": 1}, TypeError, "`router` must be a .*Received: router=1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"intermediate_dim": M, "n_experts": E, **kwargs}
    with pytest.raises(error, match=match):
        MoEFeedForward(**arguments)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: TopKRouter(E, router_dtype="float16"),
            ValueError,
            "`router_dtype` must be one of",
        ),
        (
            lambda: TopKRouter(E, softmax_before_top_k=1),
            TypeError,
            "`softmax_before_top_k` must be",
        ),
        (lambda: TopKRouter(E, norm_epsilon=0.0), ValueError, "`norm_epsilon`"),
        (lambda: SharedExpert(0), ValueError, "`intermediate_dim`.*Received"),
        (
            lambda: SharedExpert(4, output_gate=1),
            TypeError,
            "`output_gate` must be a bool",
        ),
    ],
)
def test_bad_arguments_of_the_sublayers(make, error, match):
    """The options 0.2.0 took on `MoEFeedForward` are checked by the
    sublayers they belong to (the expert bank's in
    test_feed_forward_experts.py)."""
    with pytest.raises(error, match=match):
        make()
