"""FeedForwardExperts, the expert bank: Keras's layer harness, a NumPy
reference on each expert's `(E, c, d)` rows for every option (gate/up
layouts, biases, the clamped SwiGLU, output scales), the layouts' interface,
its weights (names, shapes, expert axes, variable names of a subclass),
regularizers, mixed precision, config round trips and bad arguments."""

import itertools

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe.layers import FeedForwardExperts
from keras_moe.layers.feed_forward_experts import WEIGHTS
from keras_moe.routing import Layout
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.layers.test_moe_feed_forward import bank_weights
from tests.layers.test_moe_feed_forward import np_expert
from tests.layers.test_moe_feed_forward import np_gelu_tanh
from tests.layers.test_moe_feed_forward import np_silu

D, M, E, C = 6, 5, 3, 4


class FeedForwardExpertsLayerTest(testing.TestCase):
    def test_layer_harness(self):
        # up, gate and down kernels, up and down biases.
        run_harness(
            self,
            FeedForwardExperts,
            {"intermediate_dim": M, "n_experts": E, "gated": True},
            ((2, E, C, D), (2, E, C, D)),
            (5, 0, 0, 0),
            supports_masking=None,
        )

    def test_layer_harness_fused_clamped_scaled(self):
        # gate/up and down kernels and biases, the scales; one regularization
        # loss per kernel.
        run_harness(
            self,
            FeedForwardExperts,
            {
                "intermediate_dim": M,
                "n_experts": E,
                "gated": True,
                "gate_up_layout": "interleaved",
                "swiglu_limit": 7.0,
                "activation_dtype": "float32",
                "output_scale": True,
                "kernel_regularizer": "l2",
            },
            ((E, C, D), (E, C, D)),
            (5, 0, 0, 2),
            supports_masking=None,
        )


def option_cases():
    """Every gate/up layout with and without biases and the clamped SwiGLU,
    each layout with and without output scales; the ungated bank; a gate
    bias with separate kernels."""
    cases = []
    for use_bias, output_scale in ((True, False), (False, True)):
        cases.append({"use_bias": use_bias, "output_scale": output_scale})
    for layout, use_bias, swiglu_limit in itertools.product(
        ("separate", "concatenated", "interleaved"), (True, False), (None, 0.5)
    ):
        cases.append(
            {
                "gated": True,
                "gate_up_layout": layout,
                "use_bias": use_bias,
                "swiglu_limit": swiglu_limit,
                "output_scale": use_bias == (swiglu_limit is None),
            }
        )
    for swiglu_limit in (None, 0.5):
        cases.append(
            {"gated": True, "use_gate_bias": True, "swiglu_limit": swiglu_limit}
        )
    return cases


def case_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def randomized(bank, shape, seed=0):
    bank.build(shape)
    rng = np.random.default_rng(seed)
    for v in bank.weights:
        v.assign((0.5 * rng.normal(size=v.shape)).astype("float32"))
    return bank


def np_bank(bank, rows, activation):
    """Each expert `e` on its rows `rows[..., e, :, :]` (float64)."""
    w = bank_weights(bank)
    rows = rows.astype("float64")
    out = np.stack(
        [np_expert(w, bank, activation, e, rows[..., e, :, :]) for e in range(E)],
        axis=-3,
    )
    return out


@pytest.mark.parametrize("kwargs", option_cases(), ids=case_id)
def test_matches_numpy_reference(kwargs):
    gated = kwargs.get("gated", False)
    # A keras-moe activation for the gated experts, a Keras one otherwise.
    activation, np_activation = (
        ("gelu_tanh", np_gelu_tanh) if gated else ("silu", np_silu)
    )
    bank = FeedForwardExperts(M, E, activation=activation, **kwargs)
    rows = np.random.default_rng(1).normal(size=(E, C, D)).astype("float32")
    randomized(bank, rows.shape)
    expected = np_bank(bank, rows, np_activation)
    np.testing.assert_allclose(to_numpy(bank(rows)), expected, rtol=1e-4, atol=1e-4)
    # The same through the `Layout` interface (the expert axis layout) and
    # with leading axes (Soft MoE's batch).
    np.testing.assert_allclose(
        to_numpy(bank(rows, layout=Layout())), expected, rtol=1e-4, atol=1e-4
    )
    batch = np.stack([rows, -rows])
    np.testing.assert_allclose(
        to_numpy(bank(batch)),
        np.stack([expected, np_bank(bank, -rows, np_activation)]),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("gated", [False, True])
def test_activation_dtype_float32_runs_the_activation_in_float32(gated):
    """Under bfloat16, the activation sees float32 values with
    `activation_dtype="float32"`, bfloat16 ones without; the output is
    bfloat16 either way."""
    rows = np.random.default_rng(2).normal(size=(E, C, D)).astype("float32")
    for activation_dtype, expected in ((None, "bfloat16"), ("float32", "float32")):
        seen = []

        def activation(x, seen=seen):
            seen.append(keras.backend.standardize_dtype(x.dtype))
            return keras.activations.silu(x)

        bank = FeedForwardExperts(
            M,
            E,
            activation=activation,
            gated=gated,
            activation_dtype=activation_dtype,
            dtype="mixed_bfloat16",
        )
        y = bank(rows)
        assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
        assert all(v.dtype == "float32" for v in bank.weights)
        assert seen == [expected]


# The weights of gated experts with a gate bias, in the order `build`
# creates them.
GATED_WEIGHTS = [
    "up_kernel",
    "gate_kernel",
    "down_kernel",
    "up_bias",
    "down_bias",
    "gate_bias",
]


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({}, ["up_kernel", "down_kernel", "up_bias", "down_bias"]),
        ({"use_bias": False}, ["up_kernel", "down_kernel"]),
        ({"gated": True, "use_gate_bias": True}, GATED_WEIGHTS),
        (
            {"gated": True, "gate_up_layout": "concatenated", "output_scale": True},
            ["gate_up_kernel", "down_kernel", "gate_up_bias", "down_bias", "scale"],
        ),
    ],
)
def test_weights_their_shapes_and_expert_axes(kwargs, names):
    bank = FeedForwardExperts(M, E, **kwargs)
    # Known before build: `expert_weights` declares them while building.
    assert bank.expert_weight_axes() == {name: 0 for name in names}
    bank.build((None, E, C, D))
    assert [v.name for v in bank.weights] == names  # the order of `WEIGHTS`
    shapes = {
        "up_kernel": (E, D, M),
        "gate_kernel": (E, D, M),
        "gate_up_kernel": (E, D, 2 * M),
        "down_kernel": (E, M, D),
        "up_bias": (E, M),
        "gate_up_bias": (E, 2 * M),
        "down_bias": (E, D),
        "gate_bias": (E, M),
        "scale": (E,),
    }
    assert {v.name: tuple(v.shape) for v in bank.weights} == {
        name: shapes[name] for name in names
    }
    for name, _ in WEIGHTS:
        variable = getattr(bank, name)
        assert (variable is None) == (name not in names), name
    if bank.scale is not None:
        np.testing.assert_array_equal(to_numpy(bank.scale), 1.0)  # initially


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class RenamedExperts(FeedForwardExperts):
    """An expert bank whose variables have another model's names."""

    weight_names = {
        **FeedForwardExperts.weight_names,
        "up_kernel": "wi",
        "down_kernel": "wo",
    }


def test_a_subclass_names_its_variables():
    bank = RenamedExperts(M, E, use_bias=False)
    assert bank.expert_weight_axes() == {"wi": 0, "wo": 0}
    bank.build((None, E, C, D))
    assert [v.name for v in bank.weights] == ["wi", "wo"]
    assert bank.up_kernel.name == "wi"
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(bank)
    )
    assert type(clone) is RenamedExperts


def test_regularizers_and_constraints_reach_every_weight():
    bank = FeedForwardExperts(
        M,
        E,
        gated=True,
        kernel_regularizer=keras.regularizers.L2(0.5),
        bias_regularizer=keras.regularizers.L1(0.25),
        kernel_constraint="non_neg",
        bias_constraint="non_neg",
    )
    randomized(bank, (E, C, D))
    bank(np.ones((E, C, D), "float32"))
    expected = sum(
        0.5 * np.sum(to_numpy(getattr(bank, k)) ** 2)
        for k in ("up_kernel", "gate_kernel", "down_kernel")
    ) + sum(
        0.25 * np.sum(np.abs(to_numpy(getattr(bank, b))))
        for b in ("up_bias", "down_bias")
    )
    assert len(bank.losses) == 5
    assert sum(float(to_numpy(loss)) for loss in bank.losses) == pytest.approx(
        expected, rel=1e-5
    )
    for v in bank.weights:
        assert isinstance(v.constraint, keras.constraints.NonNeg), v.name


def test_config_round_trip_with_every_option():
    bank = FeedForwardExperts(
        M,
        E,
        activation="gelu_tanh",
        gated=True,
        use_bias=True,
        gate_up_layout="separate",
        use_gate_bias=True,
        activation_dtype="float32",
        swiglu_limit=3.0,
        swiglu_alpha=1.5,
        output_scale=True,
        kernel_initializer=keras.initializers.RandomNormal(0.0, 0.1, seed=3),
        bias_initializer="ones",
        kernel_regularizer="l2",
        bias_regularizer="l1",
        kernel_constraint="non_neg",
        bias_constraint="max_norm",
        name="bank",
    )
    config = bank.get_config()
    clone = FeedForwardExperts.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(bank)
    )
    assert restored.get_config() == config
    rows = np.random.default_rng(4).normal(size=(E, C, D)).astype("float32")
    randomized(bank, rows.shape)
    restored.build(rows.shape)
    restored.set_weights(bank.get_weights())
    np.testing.assert_array_equal(to_numpy(restored(rows)), to_numpy(bank(rows)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"intermediate_dim": 0}, ValueError, "`intermediate_dim`.*Received"),
        ({"n_experts": 2.0}, TypeError, "`n_experts`.*Received"),
        ({"activation": "nope"}, ValueError, "`activation`.*Received"),
        ({"gated": 1}, TypeError, "`gated` must be a bool"),
        ({"use_bias": None}, TypeError, "`use_bias` must be a bool"),
        ({"gate_up_layout": "fused"}, ValueError, "`gate_up_layout` must be one"),
        (
            {"gate_up_layout": "interleaved"},
            ValueError,
            "`gate_up_layout` applies to gated experts only.*gated=False",
        ),
        ({"swiglu_limit": 7.0}, ValueError, "`swiglu_limit` applies to gated"),
        ({"use_gate_bias": True}, ValueError, "`use_gate_bias` applies to gated"),
        ({"gated": True, "swiglu_limit": -1.0}, ValueError, "`swiglu_limit`"),
        ({"gated": True, "swiglu_alpha": 0.0}, ValueError, "`swiglu_alpha`"),
        (
            {"gated": True, "gate_up_layout": "concatenated", "use_gate_bias": True},
            ValueError,
            "`use_gate_bias`.*Received: use_gate_bias=True.*concatenated",
        ),
        (
            {"gated": True, "use_bias": False, "use_gate_bias": True},
            ValueError,
            "`use_gate_bias`.*use_bias=False",
        ),
        ({"activation_dtype": "bfloat16"}, ValueError, "`activation_dtype` must"),
        ({"output_scale": 1}, TypeError, "`output_scale` must be a bool"),
        ({"kernel_initializer": "nope"}, ValueError, "`kernel_initializer`"),
        ({"bias_regularizer": "nope"}, ValueError, "`bias_regularizer`"),
        ({"kernel_constraint": "nope"}, ValueError, "`kernel_constraint`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    arguments = {"intermediate_dim": M, "n_experts": E, **kwargs}
    with pytest.raises(error, match=match):
        FeedForwardExperts(**arguments)


@pytest.mark.parametrize("shape", [(C, D), (E + 1, C, D), (2, 1, C, D)])
def test_rows_without_a_layout_need_the_expert_axis(shape):
    bank = FeedForwardExperts(M, E)
    with pytest.raises(ValueError, match=r"\(\.\.\., n_experts, c, d\).*Received"):
        bank(np.ones(shape, "float32"))


def test_an_undefined_feature_axis_is_a_clear_error():
    with pytest.raises(ValueError, match="last axis.*must be defined"):
        FeedForwardExperts(M, E).build((E, C, None))
