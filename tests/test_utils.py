"""keras_moe.utils: argument checks that name the argument and the value."""

import re

import keras
import numpy as np
import pytest

from keras_moe import utils


@pytest.mark.parametrize(
    "value, expected", [(1, 1), (7, 7), (np.int64(3), 3), (np.int32(2), 2)]
)
def test_check_positive_int_accepts_integers(value, expected):
    result = utils.check_positive_int("units", value)
    assert result == expected and type(result) is int


def test_check_positive_int_minimum():
    assert utils.check_positive_int("top_k", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"`top_k` must be an integer >= 2.*top_k=1"):
        utils.check_positive_int("top_k", 1, minimum=2)


def test_check_optional_positive_int():
    assert utils.check_optional_positive_int("capacity", None) is None
    assert utils.check_optional_positive_int("capacity", 4) == 4
    with pytest.raises(ValueError, match=r"Received: capacity=0"):
        utils.check_optional_positive_int("capacity", 0)


@pytest.mark.parametrize("value", [1.5, 1.0, "3", None, True, False, [2]])
def test_check_positive_int_type_errors(value):
    with pytest.raises(
        TypeError, match=rf"`units`.*Received: units={re.escape(repr(value))}"
    ):
        utils.check_positive_int("units", value)


@pytest.mark.parametrize("value", [0, -1])
def test_check_positive_int_value_errors(value):
    with pytest.raises(ValueError, match=rf"`units` must be.*Received: units={value}$"):
        utils.check_positive_int("units", value)


def test_check_floats():
    assert utils.check_non_negative_float("rate", 0) == 0.0
    assert utils.check_positive_float("scale", 2) == 2.0
    assert type(utils.check_positive_float("scale", np.float32(0.5))) is float
    with pytest.raises(ValueError, match=r"`scale` must be a positive.*scale=0.0"):
        utils.check_positive_float("scale", 0)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"`rate`.*Received: rate="):
            utils.check_non_negative_float("rate", bad)
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match=rf"`rate`.*Received: rate={bad!r}"):
            utils.check_non_negative_float("rate", bad)


def test_check_bool():
    assert utils.check_bool("use_bias", True) is True
    for bad in (1, 0, "True", None):
        with pytest.raises(TypeError, match=rf"`use_bias`.*Received: use_bias={bad!r}"):
            utils.check_bool("use_bias", bad)


@pytest.mark.parametrize(
    "value, rank, expected",
    [
        (3, 2, (3, 3)),
        ((1, 2), 2, (1, 2)),
        ([4], 1, (4,)),
        ((np.int64(2),) * 3, 3, (2,) * 3),
    ],
)
def test_check_int_tuple(value, rank, expected):
    result = utils.check_int_tuple("kernel_size", value, rank)
    assert result == expected
    assert all(type(v) is int for v in result)


@pytest.mark.parametrize(
    "value, rank, error, match",
    [
        ((3, 3), 1, ValueError, r"tuple of 1 integers.*\(3, 3\) \(length 2\)"),
        ((3,), 3, ValueError, r"tuple of 3 integers.*\(3,\) \(length 1\)"),
        ((3, 1.5), 2, TypeError, r"only integers.*\(3, 1.5\)"),
        ((3, True), 2, TypeError, r"only integers.*\(3, True\)"),
        (0, 2, ValueError, r"positive integers.*kernel_size=0"),
        ((2, -1), 2, ValueError, r"positive integers.*kernel_size=\(2, -1\)"),
        (2.0, 1, TypeError, r"integer or a tuple.*kernel_size=2.0"),
        ("3", 1, TypeError, r"integer or a tuple.*kernel_size='3'"),
        (None, 1, TypeError, r"kernel_size=None"),
    ],
)
def test_check_int_tuple_errors(value, rank, error, match):
    with pytest.raises(error, match=r"`kernel_size`.*" + match):
        utils.check_int_tuple("kernel_size", value, rank)


def test_check_choice():
    assert utils.check_choice("padding", "SAME", {"same", "valid"}) == "same"
    for bad in ("full", None, 1):
        with pytest.raises(
            ValueError,
            match=rf"`padding` must be one of \['same', 'valid'\]. "
            rf"Received: padding={bad!r}",
        ):
            utils.check_choice("padding", bad, {"same", "valid"})


def test_getters_normalise():
    assert utils.get_activation("a", "relu") is keras.activations.relu
    assert utils.get_activation("a", None) is keras.activations.linear
    assert isinstance(utils.get_initializer("i", "ones"), keras.initializers.Ones)
    assert utils.get_regularizer("r", None) is None
    assert isinstance(utils.get_regularizer("r", "l2"), keras.regularizers.L2)
    assert utils.get_constraint("c", None) is None
    assert isinstance(utils.get_constraint("c", "non_neg"), keras.constraints.NonNeg)
    config = keras.initializers.serialize(keras.initializers.Constant(2.0))
    assert utils.get_initializer("i", config).value == 2.0


@pytest.mark.parametrize(
    "getter, name",
    [
        (utils.get_activation, "expert_activation"),
        (utils.get_initializer, "expert_bias_initializer"),
        (utils.get_regularizer, "gating_kernel_regularizer"),
        (utils.get_constraint, "gating_bias_constraint"),
    ],
)
@pytest.mark.parametrize("value", ["no_such_thing", 42])
def test_getters_name_the_argument(getter, name, value):
    with pytest.raises(
        ValueError, match=rf"`{name}` must be.*Received: {name}={value!r}"
    ):
        getter(name, value)


def test_check_top_k():
    assert utils.check_top_k(np.int64(2), 4) == 2
    assert type(utils.check_top_k(4, 4)) is int
    with pytest.raises(
        ValueError,
        match=r"`top_k` must be an integer from 1 to `n_experts`. "
        r"Received: top_k=5, n_experts=4",
    ):
        utils.check_top_k(5, 4)
    with pytest.raises(ValueError, match=r"`top_k`.*Received: top_k=0"):
        utils.check_top_k(0, 4)
    with pytest.raises(TypeError, match=r"`top_k`.*Received: top_k=1.5"):
        utils.check_top_k(1.5, 4)


def test_check_optional_positive_float_and_seed():
    assert utils.check_optional_positive_float("capacity_factor", None) is None
    assert utils.check_optional_positive_float("capacity_factor", 2) == 2.0
    with pytest.raises(ValueError, match=r"Received: capacity_factor=0.0"):
        utils.check_optional_positive_float("capacity_factor", 0.0)
    assert utils.check_optional_seed(None) is None
    assert utils.check_optional_seed(0) == 0
    with pytest.raises(ValueError, match=r"`seed`.*Received: seed=-1"):
        utils.check_optional_seed(-1)
    with pytest.raises(TypeError, match=r"`seed`.*Received: seed=1.5"):
        utils.check_optional_seed(1.5)


def test_check_same():
    utils.check_same("n_experts", 4, None)  # not given: nothing to compare
    utils.check_same("n_experts", 4, 4)
    with pytest.raises(
        ValueError,
        match=r"`n_experts` must agree with the given sublayers, which have "
        r"n_experts=4. Received: n_experts=3",
    ):
        utils.check_same("n_experts", 4, 3)


def test_get_activation_knows_keras_moes_activations():
    gelu_tanh = utils.get_activation("activation", "gelu_tanh")
    x = np.linspace(-3.0, 3.0, 13).astype("float32")
    expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gelu_tanh(x)), expected, rtol=1e-5, atol=1e-6
    )
    # It serialises by its name and comes back as the same function.
    name = keras.activations.serialize(gelu_tanh)
    assert utils.get_activation("activation", name) is gelu_tanh
    assert keras.activations.deserialize(name) is gelu_tanh
