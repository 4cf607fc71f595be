"""Conv1DMoE, Conv2DMoE, Conv3DMoE: Keras's layer harness, a naive NumPy
reference of the original formula, properties, initialisation statistics,
mixed precision, bad arguments and config round trips."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras.src import testing

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.layers.references import UNIT_ROUNDOFF
from tests.layers.references import call_with_float32_router
from tests.layers.references import count_ops_calls
from tests.layers.references import np_conv
from tests.layers.references import np_softmax
from tests.layers.references import rounding_bound

LAYERS = {1: Conv1DMoE, 2: Conv2DMoE, 3: Conv3DMoE}
KERAS_CONVS = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}

NP_ACTIVATIONS = {
    None: lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def np_activation(name):
    return np_softmax if name == "softmax" else NP_ACTIVATIONS[name]


def as_tuple(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def reference_conv_moe(x, weights, kwargs, rank):
    """The original layers' formula in NumPy (float64), any data format.

    `weights` holds `expert_kernel` `kernel_size + (c_in, F * K)` (output
    channel `f * K + k` is expert `k` of filter `f`), `gating_kernel`
    `input_shape[1:] + (F, K)`, and biases broadcastable to `(F, K)`.
    """
    n_filters, n_experts = kwargs["n_filters"], kwargs["n_experts_per_filter"]
    channels_first = kwargs.get("data_format") == "channels_first"
    x = x.astype("float64")
    x_last = np.moveaxis(x, 1, -1) if channels_first else x
    h = np_conv(
        x_last,
        weights["expert_kernel"].astype("float64"),
        as_tuple(kwargs.get("strides", 1), rank),
        kwargs.get("padding", "valid"),
        as_tuple(kwargs.get("dilation_rate", 1), rank),
    )
    h = h.reshape(h.shape[:-1] + (n_filters, n_experts))
    if "expert_bias" in weights:
        h = h + np.reshape(weights["expert_bias"], (n_filters, n_experts))
    h = np_activation(kwargs.get("expert_activation"))(h)
    # The gates: a dense projection of the whole sample, in its own layout.
    g = np.tensordot(x, weights["gating_kernel"], axes=rank + 1)  # (b, F, K)
    if "gating_bias" in weights:
        g = g + np.reshape(weights["gating_bias"], (n_filters, n_experts))
    g = np_activation(kwargs.get("gating_activation"))(g)
    g = g.reshape((g.shape[0],) + (1,) * rank + g.shape[1:])
    y = np.sum(h * g, axis=-1)
    return np.moveaxis(y, -1, 1) if channels_first else y


def layer_weights(layer):
    weights = {"expert_kernel": to_numpy(layer.expert_kernel)}
    weights["gating_kernel"] = to_numpy(layer.gating_kernel)
    if layer.use_expert_bias:
        weights["expert_bias"] = to_numpy(layer.expert_bias)
    if layer.use_gating_bias:
        weights["gating_bias"] = to_numpy(layer.gating_bias)
    return weights


def randomize(layer, rng, scale=0.5):
    for w in layer.weights:
        w.assign((scale * rng.normal(size=w.shape)).astype(w.dtype))


# ---------------------------------------------------------------- harness

# (rank, init kwargs, input shape, expected output shape)
HARNESS_CASES = [
    (
        1,
        {
            "n_filters": 2,
            "n_experts_per_filter": 2,
            "kernel_size": 3,
            "expert_activation": "relu",
            "gating_activation": "softmax",
            "data_format": "channels_last",
        },
        (2, 6, 3),
        (2, 4, 2),
    ),
    (
        1,
        {
            "n_filters": 3,
            "n_experts_per_filter": 2,
            "kernel_size": 2,
            "padding": "causal",
            "dilation_rate": 2,
            "data_format": "channels_first",
        },
        (2, 3, 6),
        (2, 3, 6),
    ),
    (
        1,
        {
            "n_filters": 2,
            "n_experts_per_filter": 3,
            "kernel_size": 3,
            "strides": 2,
            "padding": "same",
            "use_expert_bias": False,
            "use_gating_bias": False,
            "data_format": "channels_last",
        },
        (2, 7, 2),
        (2, 4, 2),
    ),
    (
        2,
        {
            "n_filters": 2,
            "n_experts_per_filter": 2,
            "kernel_size": (3, 2),
            "strides": (2, 1),
            "padding": "same",
            "gating_activation": "softmax",
            "data_format": "channels_last",
        },
        (2, 5, 4, 3),
        (2, 3, 4, 2),
    ),
    (
        2,
        {
            "n_filters": 2,
            "n_experts_per_filter": 2,
            "kernel_size": 3,
            "dilation_rate": (1, 2),
            "use_expert_bias": False,
            "expert_activation": "tanh",
            "data_format": "channels_first",
        },
        (2, 3, 5, 6),
        (2, 2, 3, 2),
    ),
    (
        3,
        {
            "n_filters": 2,
            "n_experts_per_filter": 2,
            "kernel_size": 2,
            "use_expert_bias": True,
            "gating_activation": "softmax",
            "data_format": "channels_last",
        },
        (2, 3, 4, 3, 2),
        (2, 2, 3, 2, 2),
    ),
    (
        3,
        {
            "n_filters": 2,
            "n_experts_per_filter": 1,
            "kernel_size": (2, 1, 2),
            "strides": 2,
            "padding": "same",
            "use_gating_bias": False,
            "data_format": "channels_first",
        },
        (2, 2, 3, 4, 3),
        (2, 2, 2, 2, 2),
    ),
]


def case_id(case):
    rank, kwargs, _, _ = case
    keys = ("padding", "data_format", "strides", "dilation_rate")
    parts = [f"{rank}d"] + [str(kwargs[k]) for k in keys if k in kwargs]
    if not kwargs.get("use_expert_bias", True):
        parts.append("no_expert_bias")
    if not kwargs.get("use_gating_bias", True):
        parts.append("no_gating_bias")
    return "-".join(parts)


class ConvMoELayerTest(testing.TestCase):
    pass


@pytest.mark.parametrize(
    "rank, kwargs, input_shape, output_shape",
    HARNESS_CASES,
    ids=[case_id(c) for c in HARNESS_CASES],
)
def test_run_layer_test(rank, kwargs, input_shape, output_shape):
    n_weights = (
        2 + kwargs.get("use_expert_bias", True) + kwargs.get("use_gating_bias", True)
    )
    case = ConvMoELayerTest("run_layer_test")
    run_harness(
        case,
        LAYERS[rank],
        kwargs,
        (input_shape, output_shape),
        (n_weights, 0, 0, 0),
        supports_masking=False,
    )


# ---------------------------------------------------------------- NumPy reference


@pytest.mark.parametrize(
    "rank, kwargs, input_shape, output_shape",
    HARNESS_CASES,
    ids=[case_id(c) for c in HARNESS_CASES],
)
def test_matches_numpy_reference(rank, kwargs, input_shape, output_shape):
    rng = np.random.default_rng(rank)
    layer = LAYERS[rank](**kwargs)
    layer.build(input_shape)
    randomize(layer, rng)
    x = rng.normal(size=input_shape).astype("float32")
    expected = reference_conv_moe(x, layer_weights(layer), kwargs, rank)
    assert expected.shape == output_shape
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "rank, kwargs, input_shape",
    [
        (
            1,
            {
                "kernel_size": 3,
                "padding": "same",
                "dilation_rate": 2,
                "expert_activation": "sigmoid",
                "gating_activation": "softmax",
            },
            (2, 8, 2),
        ),
        (1, {"kernel_size": 3, "padding": "causal", "strides": 2}, (2, 7, 2)),
        (
            2,
            {
                "kernel_size": (2, 3),
                "strides": (1, 2),
                "padding": "valid",
                "gating_activation": "sigmoid",
                "data_format": "channels_first",
            },
            (2, 2, 4, 7),
        ),
        (
            3,
            {
                "kernel_size": 3,
                "padding": "same",
                "dilation_rate": (1, 2, 1),
                "expert_activation": "relu",
                "gating_activation": "softmax",
            },
            (1, 3, 4, 3, 2),
        ),
    ],
)
def test_matches_numpy_reference_more_geometries(rank, kwargs, input_shape):
    kwargs = {"n_filters": 2, "n_experts_per_filter": 3, **kwargs}
    rng = np.random.default_rng(10 + rank)
    layer = LAYERS[rank](**kwargs)
    layer.build(input_shape)
    randomize(layer, rng)
    x = rng.normal(size=input_shape).astype("float32")
    expected = reference_conv_moe(x, layer_weights(layer), kwargs, rank)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-4)


def test_causal_outputs_do_not_see_the_future():
    rng = np.random.default_rng(4)
    layer = Conv1DMoE(
        2, 2, 3, padding="causal", dilation_rate=2, gating_activation="softmax"
    )
    layer.build((None, 9, 2))
    randomize(layer, rng)
    # Zero gating weights: the gates no longer see the whole sequence.
    layer.gating_kernel.assign(np.zeros(layer.gating_kernel.shape, "float32"))
    x = rng.normal(size=(1, 9, 2)).astype("float32")
    changed = x.copy()
    changed[:, 6:] += 1.0
    y, y_changed = to_numpy(layer(x)), to_numpy(layer(changed))
    np.testing.assert_allclose(y[:, :6], y_changed[:, :6], atol=1e-6)
    assert not np.allclose(y[:, 6:], y_changed[:, 6:])


# ---------------------------------------------------------------- properties


@st.composite
def conv_arguments(draw):
    rank = draw(st.integers(1, 3))
    kernel_size = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    use_strides = draw(st.booleans())
    strides = tuple(draw(st.integers(1, 2)) if use_strides else 1 for _ in range(rank))
    dilation = tuple(1 if use_strides else draw(st.integers(1, 2)) for _ in range(rank))
    paddings = ["valid", "same", "causal"] if rank == 1 else ["valid", "same"]
    padding = draw(st.sampled_from(paddings))
    data_format = draw(st.sampled_from(["channels_last", "channels_first"]))
    spatial = tuple(
        draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 3))
        for k, d in zip(kernel_size, dilation)
    )
    channels = draw(st.integers(1, 2))
    if data_format == "channels_last":
        input_shape = (2,) + spatial + (channels,)
    else:
        input_shape = (2, channels) + spatial
    kwargs = {
        "n_filters": draw(st.integers(1, 3)),
        "kernel_size": kernel_size,
        "strides": strides,
        "padding": padding,
        "data_format": data_format,
        "dilation_rate": dilation,
    }
    return rank, kwargs, input_shape


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    arguments=conv_arguments(),
    activation=st.sampled_from([None, "relu"]),
    use_bias=st.booleans(),
)
def test_one_expert_with_softmax_gating_is_a_conv_layer(
    arguments, activation, use_bias
):
    rank, kwargs, input_shape = arguments
    rng = np.random.default_rng(sum(input_shape))
    moe = LAYERS[rank](
        n_experts_per_filter=1,
        expert_activation=activation,
        gating_activation="softmax",
        use_expert_bias=use_bias,
        **kwargs,
    )
    moe.build(input_shape)
    randomize(moe, rng)
    # The Keras conv runs channels-last (the CPU kernels of some backends only
    # do that); the MoE layer gets the input in its own data format.
    conv_kwargs = {**kwargs, "data_format": "channels_last"}
    conv = KERAS_CONVS[rank](
        kwargs["n_filters"],
        activation=activation,
        use_bias=use_bias,
        **{k: v for k, v in conv_kwargs.items() if k != "n_filters"},
    )
    x = rng.normal(size=input_shape).astype("float32")
    channels_first = kwargs["data_format"] == "channels_first"
    x_last = np.moveaxis(x, 1, -1) if channels_first else x
    conv.build(x_last.shape)
    weights = [to_numpy(moe.expert_kernel)]
    if use_bias:
        weights.append(to_numpy(moe.expert_bias)[:, 0])
    conv.set_weights(weights)
    expected = to_numpy(conv(x_last))
    if channels_first:
        expected = np.moveaxis(expected, -1, 1)
    np.testing.assert_allclose(to_numpy(moe(x)), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(arguments=conv_arguments(), n_experts=st.integers(1, 2))
def test_output_shape_equals_compute_output_shape(arguments, n_experts):
    rank, kwargs, input_shape = arguments
    layer = LAYERS[rank](n_experts_per_filter=n_experts, **kwargs)
    x = np.zeros(input_shape, "float32")
    assert tuple(layer(x).shape) == layer.compute_output_shape(input_shape)
    symbolic = layer(keras.Input(batch_shape=(None,) + input_shape[1:]))
    expected = layer.compute_output_shape((None,) + input_shape[1:])
    assert tuple(symbolic.shape) == expected


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_initialisation_is_normal_with_the_original_std(scale):
    in_channels, kernel_size, input_shape = 8, (3, 3), (None, 8, 8, 8)
    layer = Conv2DMoE(
        16,
        4,
        kernel_size,
        expert_kernel_initializer_scale=scale,
        gating_kernel_initializer_scale=scale,
    )
    layer.build(input_shape)
    expert_std = scale / math.sqrt(in_channels * math.prod(kernel_size))
    gating_std = scale / math.sqrt(math.prod(input_shape[1:]))
    for weight, std in [
        (to_numpy(layer.expert_kernel), expert_std),
        (to_numpy(layer.gating_kernel), gating_std),
    ]:
        assert weight.size >= 4000
        np.testing.assert_allclose(weight.std(), std, rtol=0.05)
        assert abs(weight.mean()) < 0.05 * std
        # Normal, not uniform or truncated: ~68% within one std, tails beyond 2.5.
        within = np.mean(np.abs(weight) < std)
        assert 0.65 < within < 0.72
        assert np.abs(weight).max() > 2.5 * std
    np.testing.assert_array_equal(to_numpy(layer.expert_bias), 0.0)
    np.testing.assert_array_equal(to_numpy(layer.gating_bias), 0.0)


@pytest.mark.parametrize("rank", [1, 3])
def test_initialisation_std_in_other_ranks(rank):
    input_shape = {1: (None, 64, 16), 3: (None, 8, 8, 8, 4)}[rank]
    layer = LAYERS[rank](8, 4, 3)
    layer.build(input_shape)
    in_channels = input_shape[-1]
    np.testing.assert_allclose(
        to_numpy(layer.expert_kernel).std(),
        1.0 / math.sqrt(in_channels * 3**rank),
        rtol=0.1,
    )
    np.testing.assert_allclose(
        to_numpy(layer.gating_kernel).std(),
        1.0 / math.sqrt(math.prod(input_shape[1:])),
        rtol=0.05,
    )


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_mixed_precision_keeps_the_router_in_float32(policy, rank):
    rng = np.random.default_rng(5)
    kwargs = {
        "n_filters": 2,
        "n_experts_per_filter": 2,
        "kernel_size": 2,
        "padding": "same",
        "expert_activation": "relu",
        "gating_activation": "softmax",
    }
    input_shape = (2,) + (3,) * rank + (2,)
    mixed = LAYERS[rank](**kwargs, dtype=policy)
    mixed.build(input_shape)
    randomize(mixed, rng)
    # The gates at the layer's own initial scale (std 1 / sqrt(fan_in)): the
    # bound below grows with the gate logits' sensitivity to the input.
    fan_in = math.prod(input_shape[1:])
    mixed.gating_kernel.assign(
        rng.normal(size=mixed.gating_kernel.shape) / math.sqrt(fan_in)
    )
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    x = rng.normal(size=input_shape).astype("float32")
    out = call_with_float32_router(mixed, x, compute_dtype)

    # Against the float64 NumPy reference, within a first-order bound of the
    # compute dtype's rounding errors (unit roundoff `u`), per output:
    # - expert `(f, k)`'s pre-activation, from `x` and `W` rounded to the
    #   compute dtype (2 roundings a term), `n = C * prod(kernel_size)`
    #   additions and the rounded bias (2), is within `gamma_{n+4}` of
    #   `M = conv(|x|, |W|) + |b|`; relu is 1-Lipschitz and `|h| <= M`;
    # - the float32 gate rounded to the compute dtype, its product with the
    #   expert, the `K - 1` additions over the experts and the output's
    #   rounding add `K + 2` roundings of `sum_k g_k |h_k|`;
    # - the float32 router sees the rounded input: its logits move by at most
    #   `u * G`, `G = sum |x| |V|` over the sample ("flatten"), which moves a
    #   softmax gate by at most `2 g_k max_k(u G_k)`.
    # So `|y - y_ref| <= gamma_{n + K + 6 + 2 max_k G} * sum_k g_k M_k`
    # (float32's own errors, 2**-24, are far below). A worst-case bound: the
    # errors measured on the three backends are 3-6% of it (the bound is
    # 2-3% of the outputs' scale in float16, 15-30% in bfloat16).
    weights = layer_weights(mixed)
    expected = reference_conv_moe(x, weights, kwargs, rank)
    n_filters, n_experts = kwargs["n_filters"], kwargs["n_experts_per_filter"]
    x64 = x.astype("float64")
    geometry = ((1,) * rank, "same", (1,) * rank)
    magnitude = np_conv(np.abs(x64), np.abs(weights["expert_kernel"]), *geometry)
    magnitude = magnitude.reshape(magnitude.shape[:-1] + (n_filters, n_experts))
    magnitude = magnitude + np.abs(weights["expert_bias"])  # (b, *s, F, K)
    gating_kernel = weights["gating_kernel"]
    logits = np.tensordot(x64, gating_kernel, axes=rank + 1) + weights["gating_bias"]
    gates = np_softmax(logits).reshape((-1,) + (1,) * rank + logits.shape[1:])
    gating_sums = np.tensordot(np.abs(x64), np.abs(gating_kernel), axes=rank + 1)
    n = math.prod(weights["expert_kernel"].shape[:-1]) + n_experts + 6
    n = n + 2 * gating_sums.max(axis=-1).reshape((-1,) + (1,) * rank + (n_filters,))
    bound = rounding_bound(n, UNIT_ROUNDOFF[compute_dtype]) * np.sum(
        gates * magnitude, axis=-1
    )
    error = np.abs(to_numpy(keras.ops.cast(out, "float32")) - expected)
    assert np.all(error <= bound), (error.max(), bound.min())


# ---------------------------------------------------------------- bad arguments

BASE = {"n_filters": 2, "n_experts_per_filter": 2, "kernel_size": 3}

# (rank, arguments, exception, message regex)
BAD_ARGUMENTS = [
    (2, {"n_filters": 0}, ValueError, r"`n_filters`.*Received: n_filters=0"),
    (2, {"n_filters": -1}, ValueError, r"`n_filters`.*Received: n_filters=-1"),
    (2, {"n_filters": 2.0}, TypeError, r"`n_filters`.*Received: n_filters=2.0"),
    (1, {"n_filters": True}, TypeError, r"`n_filters`.*Received: n_filters=True"),
    (
        3,
        {"n_experts_per_filter": 0},
        ValueError,
        r"`n_experts_per_filter`.*Received: n_experts_per_filter=0",
    ),
    (
        2,
        {"n_experts_per_filter": "2"},
        TypeError,
        r"`n_experts_per_filter`.*Received: n_experts_per_filter='2'",
    ),
    (
        1,
        {"kernel_size": (3, 3)},
        ValueError,
        r"`kernel_size`.*tuple of 1 integers.*Received: kernel_size=\(3, 3\)",
    ),
    (
        2,
        {"kernel_size": (3,)},
        ValueError,
        r"`kernel_size`.*tuple of 2 integers.*Received: kernel_size=\(3,\)",
    ),
    (2, {"kernel_size": 0}, ValueError, r"`kernel_size`.*Received: kernel_size=0"),
    (
        3,
        {"kernel_size": (3, 0, 3)},
        ValueError,
        r"`kernel_size`.*positive.*Received: kernel_size=\(3, 0, 3\)",
    ),
    (1, {"kernel_size": 2.5}, TypeError, r"`kernel_size`.*Received: kernel_size=2.5"),
    (
        2,
        {"kernel_size": (3, 3.0)},
        TypeError,
        r"`kernel_size`.*Received: kernel_size=\(3, 3.0\)",
    ),
    (1, {"kernel_size": True}, TypeError, r"`kernel_size`.*Received: kernel_size=True"),
    (
        2,
        {"strides": (1, 2, 1)},
        ValueError,
        r"`strides`.*tuple of 2 integers.*Received: strides=\(1, 2, 1\)",
    ),
    (1, {"strides": 0}, ValueError, r"`strides`.*Received: strides=0"),
    (3, {"strides": -2}, ValueError, r"`strides`.*Received: strides=-2"),
    (
        2,
        {"dilation_rate": [2]},
        ValueError,
        r"`dilation_rate`.*tuple of 2 integers.*Received: dilation_rate=\[2\]",
    ),
    (
        1,
        {"dilation_rate": 0},
        ValueError,
        r"`dilation_rate`.*Received: dilation_rate=0",
    ),
    (
        1,
        {"dilation_rate": "2"},
        TypeError,
        r"`dilation_rate`.*Received: dilation_rate='2'",
    ),
    (
        2,
        {"strides": 2, "dilation_rate": 2},
        ValueError,
        r"`strides > 1`.*`dilation_rate > 1`.*Received: strides=\(2, 2\), "
        r"dilation_rate=\(2, 2\)",
    ),
    (1, {"padding": "full"}, ValueError, r"`padding`.*Received: padding='full'"),
    (2, {"padding": None}, ValueError, r"`padding`.*Received: padding=None"),
    (2, {"padding": "causal"}, ValueError, r"`padding`.*Received: padding='causal'"),
    (3, {"padding": "causal"}, ValueError, r"`padding`.*Received: padding='causal'"),
    (
        2,
        {"data_format": "NHWC"},
        ValueError,
        r"`data_format`.*Received: data_format='NHWC'",
    ),
    (
        2,
        {"expert_activation": "nope"},
        ValueError,
        r"`expert_activation`.*Received: expert_activation='nope'",
    ),
    (
        3,
        {"gating_bias_initializer": "nope"},
        ValueError,
        r"`gating_bias_initializer`.*Received: gating_bias_initializer='nope'",
    ),
    (
        1,
        {"expert_kernel_initializer_scale": -1},
        ValueError,
        r"`expert_kernel_initializer_scale`.*"
        r"Received: expert_kernel_initializer_scale=-1",
    ),
    (
        1,
        {"use_expert_bias": None},
        TypeError,
        r"`use_expert_bias`.*Received: use_expert_bias=None",
    ),
]


@pytest.mark.parametrize(
    "rank, kwargs, error, match",
    BAD_ARGUMENTS,
    ids=[f"{a[0]}d-{a[1]}" for a in BAD_ARGUMENTS],
)
def test_bad_arguments(rank, kwargs, error, match):
    with pytest.raises(error, match=match):
        LAYERS[rank](**{**BASE, **kwargs})


# (rank, arguments, input shape, message regex)
BAD_INPUT_SHAPES = [
    (2, {}, (None, 5, 5), r"rank 4.*Received: input_shape=\(None, 5, 5\)"),
    (1, {}, (None, 5, 5, 2), r"rank 3.*Received: input_shape=\(None, 5, 5, 2\)"),
    (
        3,
        {},
        (None, 4, 4, 4, 4, 1),
        r"rank 5.*Received: input_shape=\(None, 4, 4, 4, 4, 1\)",
    ),
    (
        2,
        {},
        (None, 5, 5, None),
        r"channel axis.*Received: input_shape=\(None, 5, 5, None\)",
    ),
    (
        2,
        {"data_format": "channels_first"},
        (None, None, 5, 5),
        r"channel axis.*Received: input_shape=\(None, None, 5, 5\)",
    ),
    (
        2,
        {},
        (None, None, 5, 3),
        r"non-batch axis.*Received: input_shape=\(None, None, 5, 3\)",
    ),
    (
        1,
        {"padding": "same"},
        (None, None, 3),
        r"non-batch axis.*Received: input_shape=\(None, None, 3\)",
    ),
    (
        2,
        {"kernel_size": 5},
        (None, 3, 6, 1),
        r"`kernel_size`.*larger than the input.*Received: kernel_size=\(5, 5\).*"
        r"input_shape=\(None, 3, 6, 1\)",
    ),
    (
        1,
        {"kernel_size": 3, "dilation_rate": 3},
        (None, 6, 1),
        r"`kernel_size`.*dilation_rate=\(3,\).*input_shape=\(None, 6, 1\)",
    ),
    (
        3,
        {"kernel_size": (1, 1, 4), "data_format": "channels_first"},
        (None, 2, 4, 4, 3),
        r"`kernel_size`.*Received: kernel_size=\(1, 1, 4\)",
    ),
]


@pytest.mark.parametrize(
    "rank, kwargs, input_shape, match",
    BAD_INPUT_SHAPES,
    ids=[f"{a[0]}d-{a[2]}" for a in BAD_INPUT_SHAPES],
)
def test_bad_input_shapes(rank, kwargs, input_shape, match):
    with pytest.raises(ValueError, match=match):
        LAYERS[rank](**{**BASE, **kwargs}).build(input_shape)


def test_bad_input_shape_in_compute_output_shape():
    with pytest.raises(ValueError, match=r"rank 4.*Received: input_shape"):
        Conv2DMoE(**BASE).compute_output_shape((None, 5, 5))


def test_valid_padding_kernel_larger_than_input_fails_when_called():
    with pytest.raises(ValueError, match=r"`kernel_size`.*larger than the input"):
        Conv1DMoE(2, 2, 4)(np.zeros((1, 3, 2), "float32"))


def test_same_padding_accepts_a_kernel_larger_than_the_input():
    y = Conv1DMoE(2, 2, 4, padding="same")(np.ones((1, 3, 2), "float32"))
    assert tuple(y.shape) == (1, 3, 2)


def test_wrong_rank_on_call_is_rejected():
    with pytest.raises(ValueError, match=r"ndim=4"):
        Conv2DMoE(**BASE)(np.zeros((1, 5, 5), "float32"))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_config_round_trip_preserves_every_argument(rank):
    kwargs = {
        "n_filters": 3,
        "n_experts_per_filter": 2,
        "kernel_size": (2,) * rank,
        "strides": (1,) * rank,
        "padding": "causal" if rank == 1 else "same",
        "data_format": "channels_first",
        "dilation_rate": (2,) * rank,
        "expert_activation": "elu",
        "gating_activation": "softmax",
        "use_expert_bias": True,
        "use_gating_bias": False,
        "expert_kernel_initializer_scale": 0.5,
        "gating_kernel_initializer_scale": 3.0,
        "expert_bias_initializer": keras.initializers.Constant(0.1),
        "gating_bias_initializer": "ones",
        "expert_kernel_regularizer": keras.regularizers.L2(0.01),
        "gating_kernel_regularizer": "l1",
        "expert_bias_regularizer": keras.regularizers.L1L2(0.1, 0.2),
        "gating_bias_regularizer": None,
        "expert_kernel_constraint": keras.constraints.MaxNorm(2.0),
        "gating_kernel_constraint": "non_neg",
        "expert_bias_constraint": keras.constraints.UnitNorm(),
        "gating_bias_constraint": None,
        "activity_regularizer": keras.regularizers.L2(0.5),
        "name": f"moe{rank}",
    }
    layer = LAYERS[rank](**kwargs)
    config = layer.get_config()
    clone = LAYERS[rank].from_config(config)
    assert clone.get_config() == config
    for key in ("kernel_size", "strides", "dilation_rate"):
        assert tuple(config[key]) == kwargs[key]
    for key in ("n_filters", "n_experts_per_filter", "padding", "data_format"):
        assert config[key] == kwargs[key]
    assert clone.use_gating_bias is False
    assert clone.expert_activation is keras.activations.elu
    assert clone.gating_kernel_initializer_scale == 3.0
    assert clone.expert_bias_initializer.value == pytest.approx(0.1)
    assert clone.expert_bias_regularizer.l2 == pytest.approx(0.2)
    assert isinstance(clone.gating_kernel_regularizer, keras.regularizers.L1)
    assert clone.expert_kernel_constraint.max_value == 2.0
    assert isinstance(clone.gating_kernel_constraint, keras.constraints.NonNeg)
    assert clone.activity_regularizer.l2 == pytest.approx(0.5)
    # A JSON round trip (what `.keras` files do) gives the same layer.
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert type(restored) is LAYERS[rank]
    assert restored.get_config() == config


# ---------------------------------------------------------------- no loops


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("n_experts", [1, 5])
def test_all_experts_come_from_one_convolution(monkeypatch, rank, n_experts):
    layer = LAYERS[rank](3, n_experts, 2, gating_activation="softmax")
    x = np.ones((2,) + (3,) * rank + (2,), "float32")
    layer.build(x.shape)
    counts = count_ops_calls(monkeypatch, ["conv", "matmul", "sum"])
    layer(x)
    # One convolution for every (filter, expert), one matmul for the gates,
    # one reduction to mix: independent of the number of experts.
    assert counts == {"conv": 1, "matmul": 1, "sum": 1}
