"""DenseMoE: Keras's layer harness, a NumPy reference of the original formula,
properties, initialisation statistics, mixed precision, bad arguments and
config round trips."""

import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras.src import testing
from keras.src.backend.common.masking import get_keras_mask

from keras_moe import DenseMoE
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.layers.references import UNIT_ROUNDOFF
from tests.layers.references import call_with_float32_router
from tests.layers.references import count_ops_calls
from tests.layers.references import np_softmax
from tests.layers.references import rounding_bound

ACTIVATIONS = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def np_activation(name):
    if name == "softmax":
        return np_softmax
    return ACTIVATIONS[name]


def original_weights(layer):
    """The layer's weights in the original layer's layout (documented shapes)."""
    weights = {
        # keras-moe stores (d, e, u); the original (d, u, e).
        "expert_kernel": np.transpose(to_numpy(layer.expert_kernel), (0, 2, 1)),
        "gating_kernel": to_numpy(layer.gating_kernel),
    }
    if layer.use_expert_bias:
        weights["expert_bias"] = np.transpose(to_numpy(layer.expert_bias))
    if layer.use_gating_bias:
        weights["gating_bias"] = to_numpy(layer.gating_bias)
    return weights


def reference_dense_moe(x, weights, expert_activation, gating_activation):
    """The original Keras 2 `DenseMoE.call`, in NumPy (float64)."""
    x = x.astype("float64")
    expert = np.tensordot(x, weights["expert_kernel"], axes=1)  # (..., u, e)
    if "expert_bias" in weights:
        expert = expert + weights["expert_bias"]
    expert = np_activation(expert_activation)(expert)
    gates = np.tensordot(x, weights["gating_kernel"], axes=1)  # (..., e)
    if "gating_bias" in weights:
        gates = gates + weights["gating_bias"]
    gates = np_activation(gating_activation)(gates)
    units = expert.shape[-2]
    gates = np.repeat(np.expand_dims(gates, -2), units, axis=-2)
    return np.sum(expert * gates, axis=-1)


def randomize(layer, rng):
    """Give every weight (biases too) a random value, so nothing is zero."""
    for w in layer.weights:
        w.assign(rng.normal(size=w.shape).astype(w.dtype))


# ---------------------------------------------------------------- harness


class DenseMoELayerTest(testing.TestCase):
    def test_2d_input(self):
        kwargs = {
            "units": 4,
            "n_experts": 3,
            "expert_activation": "relu",
            "gating_activation": "softmax",
        }
        run_harness(self, DenseMoE, kwargs, ((2, 5), (2, 4)), (4, 0, 0, 0))

    def test_3d_input_without_biases(self):
        kwargs = {
            "units": 3,
            "n_experts": 2,
            "use_expert_bias": False,
            "use_gating_bias": False,
            "gating_activation": "sigmoid",
        }
        run_harness(self, DenseMoE, kwargs, ((2, 3, 5), (2, 3, 3)), (2, 0, None, 0))

    def test_activity_regularizer_adds_a_loss(self):
        kwargs = {"units": 2, "n_experts": 2, "activity_regularizer": "l2"}
        run_harness(self, DenseMoE, kwargs, ((2, 4), (2, 2)), (4, None, None, 1))


def test_mask_passes_through():
    x = np.ones((2, 4, 3), "float32")
    x[0, 1:] = 0.0
    x[1, 3] = 0.0
    expected = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], bool)
    masked = keras.layers.Masking(mask_value=0.0)(x)
    outputs = DenseMoE(2, 2)(masked)
    np.testing.assert_array_equal(to_numpy(get_keras_mask(outputs)), expected)
    inputs = keras.Input((4, 3))
    symbolic = DenseMoE(2, 2)(keras.layers.Masking(mask_value=0.0)(inputs))
    assert get_keras_mask(symbolic) is not None
    assert tuple(get_keras_mask(symbolic).shape) == (None, 4)


# ---------------------------------------------------------------- NumPy reference


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((4, 6), {"units": 5, "n_experts": 3}),
        (
            (4, 6),
            {
                "units": 5,
                "n_experts": 3,
                "expert_activation": "relu",
                "gating_activation": "softmax",
            },
        ),
        (
            (2, 3, 4),
            {
                "units": 2,
                "n_experts": 4,
                "expert_activation": "tanh",
                "gating_activation": "sigmoid",
                "use_expert_bias": False,
            },
        ),
        (
            (2, 2, 3, 5),
            {
                "units": 3,
                "n_experts": 1,
                "gating_activation": "softmax",
                "use_gating_bias": False,
            },
        ),
    ],
)
def test_matches_numpy_reference(input_shape, kwargs):
    rng = np.random.default_rng(0)
    layer = DenseMoE(**kwargs)
    layer.build(input_shape)
    randomize(layer, rng)
    x = rng.normal(size=input_shape).astype("float32")
    expected = reference_dense_moe(
        x,
        original_weights(layer),
        kwargs.get("expert_activation"),
        kwargs.get("gating_activation"),
    )
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-4)


def test_softmax_gates_make_a_convex_combination_of_experts():
    # With identical experts, any gates summing to one give that expert back.
    rng = np.random.default_rng(1)
    layer = DenseMoE(3, 4, gating_activation="softmax")
    layer.build((None, 5))
    randomize(layer, rng)
    kernel = rng.normal(size=(5, 1, 3)).astype("float32")
    bias = rng.normal(size=(1, 3)).astype("float32")
    layer.expert_kernel.assign(np.repeat(kernel, 4, axis=1))
    layer.expert_bias.assign(np.repeat(bias, 4, axis=0))
    x = rng.normal(size=(6, 5)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(x)), x @ kernel[:, 0] + bias[0], rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- properties


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    units=st.integers(1, 4),
    input_dim=st.integers(1, 4),
    batch=st.just(2),
    activation=st.sampled_from([None, "relu", "tanh"]),
    use_bias=st.booleans(),
)
def test_one_expert_with_softmax_gating_is_a_dense_layer(
    units, input_dim, batch, activation, use_bias
):
    rng = np.random.default_rng(units * 100 + input_dim)
    moe = DenseMoE(
        units,
        1,
        expert_activation=activation,
        gating_activation="softmax",
        use_expert_bias=use_bias,
    )
    moe.build((None, input_dim))
    randomize(moe, rng)
    dense = keras.layers.Dense(units, activation=activation, use_bias=use_bias)
    dense.build((None, input_dim))
    weights = [to_numpy(moe.expert_kernel)[:, 0, :]]
    if use_bias:
        weights.append(to_numpy(moe.expert_bias)[0])
    dense.set_weights(weights)
    x = rng.normal(size=(batch, input_dim)).astype("float32")
    np.testing.assert_allclose(to_numpy(moe(x)), to_numpy(dense(x)), atol=1e-5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    units=st.integers(1, 4),
    n_experts=st.integers(1, 3),
    shape=st.lists(st.integers(1, 3), min_size=2, max_size=4),
)
def test_output_shape_equals_compute_output_shape(units, n_experts, shape):
    layer = DenseMoE(units, n_experts)
    x = np.zeros(shape, "float32")
    assert tuple(layer(x).shape) == layer.compute_output_shape(tuple(shape))
    symbolic = layer(keras.Input(batch_shape=(None,) + tuple(shape[1:])))
    assert tuple(symbolic.shape) == layer.compute_output_shape(
        (None,) + tuple(shape[1:])
    )


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_initialisation_is_uniform_with_the_original_limits(scale):
    input_dim, units, n_experts = 64, 32, 16
    layer = DenseMoE(
        units,
        n_experts,
        expert_kernel_initializer_scale=scale,
        gating_kernel_initializer_scale=scale,
    )
    layer.build((None, input_dim))
    expert_limit = math.sqrt(3 * scale / max(1, (input_dim + units) / 2))
    gating_limit = math.sqrt(3 * scale / max(1, (input_dim + 1) / 2))
    for weight, limit in [
        (to_numpy(layer.expert_kernel), expert_limit),
        (to_numpy(layer.gating_kernel), gating_limit),
    ]:
        assert np.abs(weight).max() <= limit
        # A uniform on +-limit has max |w| close to the limit and std limit/sqrt(3).
        assert np.abs(weight).max() > 0.9 * limit
        np.testing.assert_allclose(weight.std(), limit / math.sqrt(3), rtol=0.15)
        assert abs(weight.mean()) < 0.1 * limit
    np.testing.assert_array_equal(to_numpy(layer.expert_bias), 0.0)
    np.testing.assert_array_equal(to_numpy(layer.gating_bias), 0.0)


def test_bias_initializers_are_used():
    layer = DenseMoE(
        3, 2, expert_bias_initializer="ones", gating_bias_initializer="ones"
    )
    layer.build((None, 4))
    np.testing.assert_array_equal(to_numpy(layer.expert_bias), 1.0)
    np.testing.assert_array_equal(to_numpy(layer.gating_bias), 1.0)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_the_router_in_float32(policy):
    rng = np.random.default_rng(2)
    kwargs = {
        "units": 4,
        "n_experts": 3,
        "expert_activation": "relu",
        "gating_activation": "softmax",
    }
    mixed = DenseMoE(**kwargs, dtype=policy)
    mixed.build((None, 6))
    randomize(mixed, rng)
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    x = rng.normal(size=(5, 6)).astype("float32")
    out = call_with_float32_router(mixed, x, compute_dtype)

    # Against the float64 NumPy reference, within a first-order bound of the
    # compute dtype's rounding errors (unit roundoff `u`), per output:
    # - expert `e`'s pre-activation, from `x` and `W` rounded to the compute
    #   dtype (2 roundings a term), `d` additions and the rounded bias (2), is
    #   within `gamma_{d+4}` of `M_e = sum_i |x_i W_ie| + |b_e|`; relu is
    #   1-Lipschitz, so the expert's output too, and `|h_e| <= M_e`;
    # - the float32 gate rounded to the compute dtype, its product with the
    #   expert, the `E - 1` additions over the experts and the output's
    #   rounding add `E + 2` roundings of `sum_e g_e |h_e|`;
    # - the float32 router sees the rounded input: its logits move by at most
    #   `u * G_e`, `G_e = sum_i |x_i V_ie|`, which moves a softmax gate by at
    #   most `2 g_e max_e(u G_e)` (its Jacobian is `g (dz - g . dz)`).
    # So `|y - y_ref| <= gamma_{d + E + 6 + 2 max_e G_e} * sum_e g_e M_e`
    # (float32's own errors, 2**-24, are far below). A worst-case bound: the
    # errors measured on the three backends are 3-4% of it (the bound is
    # 2-3% of the outputs' scale in float16, 15-30% in bfloat16).
    weights = original_weights(mixed)
    expected = reference_dense_moe(x, weights, "relu", "softmax")
    x64 = np.abs(x.astype("float64"))
    magnitude = np.tensordot(x64, np.abs(weights["expert_kernel"]), axes=1)
    magnitude = magnitude + np.abs(weights["expert_bias"])  # (n, units, E)
    logits = x.astype("float64") @ weights["gating_kernel"] + weights["gating_bias"]
    gates = np_softmax(logits)  # (n, E)
    gating_sums = x64 @ np.abs(weights["gating_kernel"])  # G_e, (n, E)
    d, n_experts = x.shape[-1], kwargs["n_experts"]
    n = d + n_experts + 6 + 2 * gating_sums.max(axis=-1, keepdims=True)
    bound = rounding_bound(n, UNIT_ROUNDOFF[compute_dtype]) * np.sum(
        gates[:, None, :] * magnitude, axis=-1
    )
    error = np.abs(to_numpy(keras.ops.cast(out, "float32")) - expected)
    assert np.all(error <= bound), (error.max(), bound.min())


# ---------------------------------------------------------------- bad arguments

BAD_ARGUMENTS = [
    ({"units": 0}, ValueError, r"`units`.*Received: units=0"),
    ({"units": -3}, ValueError, r"`units`.*Received: units=-3"),
    ({"units": 2.5}, TypeError, r"`units`.*Received: units=2.5"),
    ({"units": True}, TypeError, r"`units`.*Received: units=True"),
    ({"units": "4"}, TypeError, r"`units`.*Received: units='4'"),
    ({"n_experts": 0}, ValueError, r"`n_experts`.*Received: n_experts=0"),
    ({"n_experts": 1.0}, TypeError, r"`n_experts`.*Received: n_experts=1.0"),
    ({"n_experts": False}, TypeError, r"`n_experts`.*Received: n_experts=False"),
    (
        {"expert_activation": "nope"},
        ValueError,
        r"`expert_activation`.*Received: expert_activation='nope'",
    ),
    (
        {"gating_activation": 3},
        ValueError,
        r"`gating_activation`.*Received: gating_activation=3",
    ),
    (
        {"expert_bias_initializer": "nope"},
        ValueError,
        r"`expert_bias_initializer`.*Received: expert_bias_initializer='nope'",
    ),
    (
        {"gating_bias_initializer": "nope"},
        ValueError,
        r"`gating_bias_initializer`.*Received: gating_bias_initializer='nope'",
    ),
    (
        {"expert_kernel_regularizer": "nope"},
        ValueError,
        r"`expert_kernel_regularizer`.*Received: expert_kernel_regularizer='nope'",
    ),
    (
        {"gating_bias_constraint": "nope"},
        ValueError,
        r"`gating_bias_constraint`.*Received: gating_bias_constraint='nope'",
    ),
    (
        {"activity_regularizer": "nope"},
        ValueError,
        r"`activity_regularizer`.*Received: activity_regularizer='nope'",
    ),
    (
        {"use_expert_bias": "yes"},
        TypeError,
        r"`use_expert_bias`.*Received: use_expert_bias='yes'",
    ),
    (
        {"use_gating_bias": 1},
        TypeError,
        r"`use_gating_bias`.*Received: use_gating_bias=1",
    ),
    (
        {"expert_kernel_initializer_scale": 0},
        ValueError,
        r"`expert_kernel_initializer_scale`.*"
        r"Received: expert_kernel_initializer_scale=0",
    ),
    (
        {"gating_kernel_initializer_scale": -1.0},
        ValueError,
        r"`gating_kernel_initializer_scale`.*"
        r"Received: gating_kernel_initializer_scale=-1.0",
    ),
    (
        {"gating_kernel_initializer_scale": "big"},
        TypeError,
        r"`gating_kernel_initializer_scale`.*"
        r"Received: gating_kernel_initializer_scale='big'",
    ),
    (
        {"expert_kernel_initializer_scale": float("nan")},
        ValueError,
        r"`expert_kernel_initializer_scale`.*"
        r"Received: expert_kernel_initializer_scale=nan",
    ),
]


@pytest.mark.parametrize(
    "kwargs, error, match", BAD_ARGUMENTS, ids=[str(a[0]) for a in BAD_ARGUMENTS]
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DenseMoE(**{"units": 2, "n_experts": 2, **kwargs})


@pytest.mark.parametrize(
    "input_shape, match",
    [
        ((4,), r"rank >= 2.*Received: input_shape=\(4,\)"),
        ((2, None), r"last axis.*Received: input_shape=\(2, None\)"),
    ],
)
def test_bad_input_shapes(input_shape, match):
    with pytest.raises(ValueError, match=match):
        DenseMoE(2, 2).build(input_shape)


def test_rank_one_input_on_call_is_rejected():
    with pytest.raises(ValueError, match=r"min_ndim=2"):
        DenseMoE(2, 2)(np.zeros((3,), "float32"))


def test_wrong_input_dim_after_build_is_rejected():
    layer = DenseMoE(2, 2)
    layer(np.zeros((1, 4), "float32"))
    with pytest.raises(
        ValueError, match=r"axis -1 of input shape to have value 4.*\(1, 5\)"
    ):
        layer(np.zeros((1, 5), "float32"))


# ---------------------------------------------------------------- config


def full_config_kwargs():
    return {
        "units": 3,
        "n_experts": 2,
        "expert_activation": "gelu",
        "gating_activation": "softmax",
        "use_expert_bias": False,
        "use_gating_bias": True,
        "expert_kernel_initializer_scale": 0.5,
        "gating_kernel_initializer_scale": 2.0,
        "expert_bias_initializer": keras.initializers.Constant(0.3),
        "gating_bias_initializer": "ones",
        "expert_kernel_regularizer": keras.regularizers.L2(0.01),
        "gating_kernel_regularizer": keras.regularizers.L1(0.02),
        "expert_bias_regularizer": keras.regularizers.L1L2(0.1, 0.2),
        "gating_bias_regularizer": "l2",
        "expert_kernel_constraint": keras.constraints.MaxNorm(2.0),
        "gating_kernel_constraint": "non_neg",
        "expert_bias_constraint": keras.constraints.UnitNorm(),
        "gating_bias_constraint": keras.constraints.MinMaxNorm(0.1, 0.9),
        "activity_regularizer": keras.regularizers.L2(0.5),
        "name": "moe",
    }


def test_config_round_trip_preserves_every_argument():
    layer = DenseMoE(**full_config_kwargs())
    config = layer.get_config()
    clone = DenseMoE.from_config(config)
    assert clone.get_config() == config
    assert config["units"] == 3 and config["n_experts"] == 2
    assert config["use_expert_bias"] is False
    assert config["expert_kernel_initializer_scale"] == 0.5
    assert clone.expert_activation is keras.activations.gelu
    assert clone.gating_activation is keras.activations.softmax
    assert isinstance(clone.expert_bias_initializer, keras.initializers.Constant)
    assert clone.expert_bias_initializer.value == 0.3
    assert isinstance(clone.expert_kernel_regularizer, keras.regularizers.L2)
    assert clone.expert_kernel_regularizer.l2 == pytest.approx(0.01)
    assert clone.expert_bias_regularizer.l1 == pytest.approx(0.1)
    assert clone.expert_bias_regularizer.l2 == pytest.approx(0.2)
    assert isinstance(clone.gating_kernel_constraint, keras.constraints.NonNeg)
    assert isinstance(clone.gating_bias_constraint, keras.constraints.MinMaxNorm)
    assert clone.gating_bias_constraint.max_value == pytest.approx(0.9)
    assert clone.activity_regularizer.l2 == pytest.approx(0.5)
    # The same config gives the same function.
    x = np.random.default_rng(3).normal(size=(2, 4)).astype("float32")
    layer.build((None, 4))
    clone.build((None, 4))
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(layer(x)), atol=1e-6)


def test_regularizers_add_losses():
    layer = DenseMoE(**full_config_kwargs())
    layer(np.ones((2, 4), "float32"))
    # Four weight regularizers (expert bias unused) + activity regularizer.
    assert len(layer.losses) == 4
    assert all(float(to_numpy(loss)) >= 0 for loss in layer.losses)


def test_constraints_are_attached_to_the_weights():
    layer = DenseMoE(**{**full_config_kwargs(), "use_expert_bias": True})
    layer.build((None, 4))
    assert isinstance(layer.expert_kernel.constraint, keras.constraints.MaxNorm)
    assert isinstance(layer.gating_kernel.constraint, keras.constraints.NonNeg)
    assert isinstance(layer.expert_bias.constraint, keras.constraints.UnitNorm)
    assert isinstance(layer.gating_bias.constraint, keras.constraints.MinMaxNorm)


# ---------------------------------------------------------------- no loops


def test_all_experts_come_from_one_matmul(monkeypatch):
    names = ["matmul", "einsum", "dot", "tensordot", "sum", "multiply"]
    counts = {}
    for n_experts in (1, 6):
        layer = DenseMoE(3, n_experts, gating_activation="softmax")
        x = np.ones((2, 5, 4), "float32")
        layer.build(x.shape)
        with monkeypatch.context() as patch:
            counts[n_experts] = count_ops_calls(patch, names)
            layer(x)
    # One matmul for the experts, one for the gates and at most one
    # reduction to combine them (an einsum, or a sum; JAX's fast path is
    # outside `keras.ops`): the same whatever the number of experts, so no
    # Python loop over them.
    assert counts[1] == counts[6]
    assert counts[6]["matmul"] == 2
    assert counts[6]["dot"] == counts[6]["tensordot"] == 0
    assert counts[6]["einsum"] + counts[6]["sum"] <= 1
