"""The router's arithmetic stays in float32 under mixed precision.

The docs (docs/getting-started.md, docs/sparse-routing.md, the layers'
docstrings) say that under a mixed policy the router logits, the softmax and
top-k weights and the balancing losses are float32. A mixed layer's outputs
compared with a float32 layer's at a loose tolerance cannot see a router that
runs in float16: such a bug passed every test that did that. These tests
capture the router's intermediate values as the layers compute them (spies on
the instance's methods and on the `keras_moe.routing` functions the layers
call) and check their dtype and their values against float64 NumPy at
float32's precision, which float16 (unit roundoff 2**-11) and bfloat16
(2**-8) miss by far, whether they compute a value or only round it on the way.
The sparse layers' `router_dtype="compute"` (a model that routes in its
compute dtype) is checked too: logits and weights in the compute dtype, the
losses still float32.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import routing
from keras_moe.layers import FeedForwardExperts
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy
from tests.layers.references import np_conv

POLICIES = ["mixed_float16", "mixed_bfloat16"]
CONVS = {1: Conv1DMoE, 2: Conv2DMoE, 3: Conv3DMoE}

# A float32 value agrees with its float64 reference to `TOL` times the
# magnitude of the terms it sums: a dot product of `n` float32 terms is off by
# at most about `n * 2**-24` of `sum |x_i w_i|` (Higham, "Accuracy and
# Stability of Numerical Algorithms", 3.1), under 2**-17 for the sizes here
# (at most 100 terms); 2**-16 is still 32 times below float16's unit roundoff
# 2**-11, the least error of one float16 rounding of a value off its grid.
TOL = 2.0**-16

# The router settings under test: (extra constructor arguments of the sparse
# layers, the dtype the router computes in: "float32" or "compute", the
# policy's compute dtype). The losses are float32 in every setting.
# The default is `router_dtype="float32"` (checked below).
ROUTER_SETTINGS = [({}, "float32"), ({"router_dtype": "compute"}, "compute")]


def setting_id(setting):
    return ",".join(f"{k}={v}" for k, v in setting[0].items()) or "default"


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def router_dtype(setting, policy):
    return (
        keras.DTypePolicy(policy).compute_dtype if setting == "compute" else "float32"
    )


def tolerance(dtype):
    """`TOL` for float32; for a router that computes in the compute dtype,
    a few of that dtype's unit roundoffs per term (`n <= 100` terms)."""
    if dtype == "float32":
        return TOL
    return 128 * {"float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]


def rounded(x, policy):
    """`x` as the layer's experts and router see it: rounded to the compute
    dtype (the layers cast their inputs to it first), as float64."""
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    return to_numpy(ops.cast(ops.cast(x, compute_dtype), "float32")).astype("float64")


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_logsumexp(z):
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


def assert_close(actual, expected, magnitude, dtype="float32"):
    """`|actual - expected| <= tolerance(dtype) * magnitude`, elementwise."""
    actual = to_numpy(ops.cast(actual, "float32")).astype("float64")
    error = np.abs(actual - expected)
    bound = tolerance(dtype) * np.broadcast_to(magnitude, error.shape)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"off by {error[worst]:.3g} at {worst}, allowed {bound[worst]:.3g} "
        f"(a {dtype} computation)"
    )


@pytest.fixture(autouse=True)
def _initializers_without_random_draws(monkeypatch):
    """Every weight the tests read is set by `randomize`; the layers' random
    initial values are not needed (JAX compiles a random draw for each new
    weight shape: about 6 s of CPU per layer)."""

    def zeros(self, shape, dtype=None):
        return np.zeros(shape, keras.backend.standardize_dtype(dtype))

    for initializer in (
        keras.initializers.RandomNormal,
        keras.initializers.RandomUniform,
        keras.initializers.VarianceScaling,  # GlorotUniform's
    ):
        monkeypatch.setattr(initializer, "__call__", zeros)


class Spy:
    """Wraps `fn` and records each call's arguments and result."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


def randomize(layer, rng, scale=0.5):
    for w in layer.trainable_weights:
        w.assign((scale * rng.normal(size=w.shape)).astype("float32"))


# ----------------------------------------------------- sparse layers (TopKRouter)


def sparse_layer(kind, policy, extra):
    common = {
        "load_balance_weight": 1.0,
        "router_z_loss_weight": 1.0,
        "dtype": policy,
        **extra,
    }
    if kind == "TopKRouter":
        return TopKRouter(4, top_k=2, use_bias=True, **common)
    if kind == "DenseMoE":
        return DenseMoE(5, 4, top_k=2, expert_activation="relu", **common)
    if kind == "DenseMoE-capacity-unnormalized":
        return DenseMoE(
            5, 4, top_k=2, capacity_factor=1.0, normalize_top_k=False, **common
        )
    experts = {"gated": kind == "MoEFeedForward"}
    router = {
        "MoEFeedForward": {"top_k": 2, "use_bias": True},
        "MoEFeedForward-softmax-first": {"top_k": 2, "softmax_before_top_k": True},
        "MoEFeedForward-top1": {"top_k": 1},
    }[kind]
    return MoEFeedForward(
        experts=FeedForwardExperts(8, 4, dtype=policy, **experts),
        router=TopKRouter(4, **router, **common),
        dtype=policy,
    )


SPARSE_KINDS = [
    "TopKRouter",
    "DenseMoE",
    "DenseMoE-capacity-unnormalized",
    "MoEFeedForward",
    "MoEFeedForward-softmax-first",
    "MoEFeedForward-top1",
]


# Every kind with the default router; `router_dtype="compute"` on the router
# and on each layer that passes it on (JAX compiles each case: about 5 s).
SPARSE_CASES = [(kind, ROUTER_SETTINGS[0]) for kind in SPARSE_KINDS] + [
    (kind, ROUTER_SETTINGS[1])
    for kind in ("TopKRouter", "DenseMoE", "MoEFeedForward-softmax-first")
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "kind, setting",
    SPARSE_CASES,
    ids=[f"{kind}-{setting_id(setting)}" for kind, setting in SPARSE_CASES],
)
def test_sparse_router_logits_weights_and_losses_are_float32(kind, policy, setting):
    extra, computes_in = setting
    expected_dtype = router_dtype(computes_in, policy)
    rng = np.random.default_rng(0)
    layer = sparse_layer(kind, policy, extra)
    d = 6
    layer.build((None, d))
    randomize(layer, rng)
    router = layer if kind == "TopKRouter" else layer.router
    assert dtype_of(router.kernel.value) == "float32"  # no autocast
    if not extra:
        assert router.get_config()["router_dtype"] == "float32"
        if isinstance(layer, DenseMoE):
            assert layer.get_config()["router_dtype"] == "float32"
    logits_spy = Spy(router.logits)
    router.logits = logits_spy
    captured = {}
    if router is not layer:
        dispatch = router.dispatch

        def dispatch_spy(inputs, weights, experts, *args, **kwargs):
            captured["weights"], captured["experts"] = weights, experts
            return dispatch(inputs, weights, experts, *args, **kwargs)

        router.dispatch = dispatch_spy
    x = rng.normal(size=(12, d)).astype("float32")
    outputs = layer(x, training=True)
    if router is layer:
        captured["weights"], captured["experts"] = outputs
    assert len(logits_spy.calls) == 1
    logits = logits_spy.calls[0][2]
    weights, experts = captured["weights"], captured["experts"]

    # The logits: the compute-dtype input times the float32 kernel, in float32.
    assert dtype_of(logits) == expected_dtype
    x_c = rounded(x, policy)
    kernel = to_numpy(router.kernel).astype("float64")
    bias = 0.0 if router.bias is None else to_numpy(router.bias).astype("float64")
    magnitude = np.abs(x_c) @ np.abs(kernel) + np.abs(bias)
    assert_close(logits, x_c @ kernel + bias, magnitude, expected_dtype)

    # The top-k weights: from the captured logits, at float32's precision.
    z = to_numpy(ops.cast(logits, "float32")).astype("float64")
    assert dtype_of(weights) == expected_dtype
    # The chosen experts have the largest logits, best first (a tie, as
    # bfloat16 logits can have, may go either way).
    chosen = np.take_along_axis(z, to_numpy(experts), axis=-1)
    np.testing.assert_array_equal(chosen, -np.sort(-z, axis=-1)[:, : router.top_k])
    assert all(len(set(row)) == router.top_k for row in to_numpy(experts).tolist())
    if not router.normalize_top_k:
        reference = np.take_along_axis(np_softmax(z), to_numpy(experts), axis=-1)
    else:
        reference = np_softmax(chosen)
    assert_close(weights, reference, 1.0, expected_dtype)

    # The balancing losses, added in training: float32, from float32 values.
    losses = layer.losses
    assert len(losses) == 2
    for loss in losses:
        assert dtype_of(loss) == "float32"
    counts = np.bincount(to_numpy(experts).ravel(), minlength=router.n_experts)
    balance = router.n_experts * np.sum(
        counts / counts.sum() * np_softmax(z).mean(axis=0)
    )
    z_loss = np.mean(np_logsumexp(z) ** 2)
    # (The balance loss averages the softmax in the router's dtype.)
    assert_close(losses[0], balance, balance, expected_dtype)
    assert_close(losses[1], z_loss, z_loss)


@pytest.mark.parametrize("policy", POLICIES)
def test_noisy_router_logits_are_float32(policy):
    """With noise (training only), the noisy logits are float32 too."""
    layer = MoEFeedForward(
        experts=FeedForwardExperts(8, 4, dtype=policy),
        router=TopKRouter(4, noisy_gating=True, seed=3, dtype=policy),
        dtype=policy,
    )
    layer.build((None, 6))
    randomize(layer, np.random.default_rng(1))
    spy = Spy(layer.router.logits)
    layer.router.logits = spy
    layer(np.ones((5, 6), "float32"), training=True)
    ((_, kwargs, logits),) = spy.calls
    assert kwargs["training"] is True
    assert dtype_of(logits) == "float32"


# ----------------------------------------------------------- the soft DenseMoE


@pytest.mark.parametrize("policy", POLICIES)
def test_soft_dense_moe_gate_logits_and_softmax_are_float32(policy, monkeypatch):
    rng = np.random.default_rng(2)
    layer = DenseMoE(5, 4, gating_activation="softmax", dtype=policy)
    layer.build((None, 7))
    randomize(layer, rng)
    logits_spy = Spy(routing.gate_logits)
    values_spy = Spy(routing.gate_values)
    monkeypatch.setattr(routing, "gate_logits", logits_spy)
    monkeypatch.setattr(routing, "gate_values", values_spy)
    x = rng.normal(size=(3, 2, 7)).astype("float32")
    out = layer(x)
    assert dtype_of(out) == keras.DTypePolicy(policy).compute_dtype
    assert len(logits_spy.calls) == len(values_spy.calls) == 1
    logits = logits_spy.calls[0][2]
    assert dtype_of(logits) == "float32"
    x_c = rounded(x, policy).reshape(-1, 7)
    kernel = to_numpy(layer.gating_kernel).astype("float64")
    bias = to_numpy(layer.gating_bias).astype("float64")
    magnitude = np.abs(x_c) @ np.abs(kernel) + np.abs(bias)
    assert_close(logits, x_c @ kernel + bias, magnitude)
    check_gate_values(values_spy, logits)


def check_gate_values(values_spy, logits):
    """`gate_values` got the float32 logits and gave their float32 softmax."""
    ((args, _, gates),) = values_spy.calls
    assert args[0] is logits
    assert dtype_of(gates) == "float32"
    z = to_numpy(logits).astype("float64")
    assert_close(gates, np_softmax(z), 1.0)


# ------------------------------------------------------------- the conv layers

# (rank, gating_input, data_format): every mode in every rank, channels-first
# where the pooled mean and the local convolution take other axes.
CONV_CASES = [
    (rank, mode, "channels_last")
    for rank in (1, 2, 3)
    for mode in ("flatten", "pooled", "local")
] + [(2, "pooled", "channels_first"), (2, "local", "channels_first")]


def np_gate_logits(layer, x_c):
    """The conv layer's gate logits from its rounded input, float64, and the
    magnitude of the terms each sums: `(b, f, k)` or `(b, *spatial, f, k)`."""
    rank = layer.rank
    if layer.data_format == "channels_first":
        x_c = np.moveaxis(x_c, 1, -1)
    kernel = to_numpy(layer.gating_kernel).astype("float64")
    bias = to_numpy(layer.gating_bias).astype("float64")
    if layer.gating_input == "flatten":
        if layer.data_format == "channels_first":
            x_c = np.moveaxis(x_c, -1, 1)
        logits = np.tensordot(x_c, kernel, axes=rank + 1)
        magnitude = np.tensordot(np.abs(x_c), np.abs(kernel), axes=rank + 1)
    elif layer.gating_input == "pooled":
        mean = x_c.mean(axis=tuple(range(1, rank + 1)))
        logits = np.tensordot(mean, kernel, axes=1)
        magnitude = np.tensordot(
            np.abs(x_c).mean(axis=tuple(range(1, rank + 1))), np.abs(kernel), axes=1
        )
    else:
        flat = kernel.reshape(kernel.shape[:-2] + (-1,))
        geometry = (layer.strides, layer.padding, layer.dilation_rate)
        logits = np_conv(x_c, flat, *geometry)
        magnitude = np_conv(np.abs(x_c), np.abs(flat), *geometry)
        logits = logits.reshape(logits.shape[:-1] + kernel.shape[-2:])
        magnitude = magnitude.reshape(logits.shape)
    return logits + bias, magnitude + np.abs(bias)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "rank, mode, data_format", CONV_CASES, ids=lambda v: str(v) if v else None
)
def test_conv_gate_logits_and_softmax_are_float32(
    rank, mode, data_format, policy, monkeypatch
):
    rng = np.random.default_rng(rank)
    layer = CONVS[rank](
        2,
        3,
        2,
        padding="same",
        data_format=data_format,
        gating_activation="softmax",
        gating_input=mode,
        dtype=policy,
    )
    spatial = (4, 3, 3)[:rank]
    shape = (2,) + spatial + (2,)
    if data_format == "channels_first":
        shape = (2, 2) + spatial
    layer.build(shape)
    randomize(layer, rng)
    logits_spy = Spy(layer.gate_logits)
    layer.gate_logits = logits_spy
    values_spy = Spy(routing.gate_values)
    monkeypatch.setattr(routing, "gate_values", values_spy)
    x = rng.normal(size=shape).astype("float32")
    out = layer(x)
    assert dtype_of(out) == keras.DTypePolicy(policy).compute_dtype
    ((_, _, logits),) = logits_spy.calls
    assert dtype_of(logits) == "float32"
    expected, magnitude = np_gate_logits(layer, rounded(x, policy))
    assert_close(logits, expected, magnitude)
    # "local" hands the softmax its logits with the positions flattened.
    ((args, _, gates),) = values_spy.calls
    assert dtype_of(args[0]) == dtype_of(gates) == "float32"
    np.testing.assert_array_equal(to_numpy(args[0]).ravel(), to_numpy(logits).ravel())
    z = to_numpy(args[0]).astype("float64")
    assert_close(gates, np_softmax(z), 1.0)
