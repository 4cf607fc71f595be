"""`gating_input` of Conv1DMoE/Conv2DMoE/Conv3DMoE: "flatten", "pooled", "local".

A NumPy reference for each mode, rank, data format and padding; Keras's layer
harness for each mode; inputs of undefined spatial size; the CondConv
(mixed-kernel) path against the general one; weights in the original order
through `compat`; bad values and config round trips.
"""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import compat
from keras_moe.layers import base_conv_moe
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.layers.references import np_conv
from tests.layers.references import np_softmax

LAYERS = {1: Conv1DMoE, 2: Conv2DMoE, 3: Conv3DMoE}
# Small channels-last input shapes (batch first) per rank.
SHAPES = {1: (2, 7, 3), 2: (2, 6, 5, 3), 3: (2, 4, 5, 3, 2)}
N_FILTERS, N_EXPERTS = 3, 2


ACTIVATIONS = {
    None: lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "softmax": np_softmax,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def reference(x, weights, kwargs, rank):
    """NumPy (float64) output of a ConvNDMoE with `kwargs` and `weights`.

    `weights`: `expert_kernel` `kernel_size + (C, F * K)`, `gating_kernel` in
    the mode's shape, biases `(F, K)`.
    """
    mode = kwargs.get("gating_input", "flatten")
    channels_first = kwargs.get("data_format") == "channels_first"
    geometry = (
        (kwargs.get("strides", 1),) * rank,
        kwargs.get("padding", "valid"),
        (kwargs.get("dilation_rate", 1),) * rank,
    )
    x = x.astype("float64")
    x_last = np.moveaxis(x, 1, -1) if channels_first else x
    h = np_conv(x_last, weights["expert_kernel"].astype("float64"), *geometry)
    h = h.reshape(h.shape[:-1] + (N_FILTERS, N_EXPERTS)) + weights["expert_bias"]
    h = ACTIVATIONS[kwargs.get("expert_activation")](h)
    gating_kernel = weights["gating_kernel"].astype("float64")
    if mode == "flatten":
        z = np.tensordot(x, gating_kernel, axes=rank + 1)  # (b, F, K)
    elif mode == "pooled":
        z = np.tensordot(x_last.mean(axis=tuple(range(1, rank + 1))), gating_kernel, 1)
    else:
        kernel = gating_kernel.reshape(gating_kernel.shape[:-2] + (-1,))
        z = np_conv(x_last, kernel, *geometry)
        z = z.reshape(z.shape[:-1] + (N_FILTERS, N_EXPERTS))  # (b, *s, F, K)
    g = ACTIVATIONS[kwargs.get("gating_activation")](z + weights["gating_bias"])
    if mode != "local":
        g = g.reshape((g.shape[0],) + (1,) * rank + g.shape[1:])
    y = np.sum(h * g, axis=-1)
    return np.moveaxis(y, -1, 1) if channels_first else y


def randomize(layer, rng):
    """Random values in every weight (biases too), returned by name."""
    weights = {}
    for w in layer.weights:
        value = (0.5 * rng.normal(size=w.shape)).astype("float32")
        w.assign(value)
        weights[w.name] = value
    return weights


def convolutions(monkeypatch):
    """A list that records each `keras.ops.conv` call from now on: the
    mixed-kernel path runs none for the experts (`mixed_kernel_outputs`),
    the general path one."""
    calls = []
    original = keras.ops.conv

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(keras.ops, "conv", counting)
    return calls


def general_path_convolutions(mode):
    """Convolutions of the general path: the experts' (and the local gates')."""
    return 2 if mode == "local" else 1


def make_input(rank, data_format, rng, shape=None):
    x = rng.normal(size=shape or SHAPES[rank]).astype("float32")
    return np.moveaxis(x, -1, 1) if data_format == "channels_first" else x


PADDINGS = [(1, "valid"), (1, "same"), (1, "causal"), (2, "valid"), (2, "same")]
PADDINGS += [(3, "valid"), (3, "same")]
# (gating_input, expert_activation): linear experts with "pooled" gates take the
# mixed-kernel (CondConv) path.
MODES = [("flatten", "relu"), ("pooled", "relu"), ("pooled", None), ("local", "relu")]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("rank,padding", PADDINGS)
@pytest.mark.parametrize("mode,expert_activation", MODES)
def test_matches_numpy_reference(
    monkeypatch, mode, expert_activation, rank, padding, data_format
):
    kwargs = dict(
        gating_input=mode,
        expert_activation=expert_activation,
        gating_activation="softmax",
        padding=padding,
        data_format=data_format,
    )
    # The mixed-kernel path wherever it applies, whatever the sizes.
    mixed = mode == "pooled" and not expert_activation
    rng = np.random.default_rng(rank)
    layer = LAYERS[rank](
        N_FILTERS,
        N_EXPERTS,
        3 if rank < 3 else 2,
        mixed_kernel=True if mixed else None,
        **kwargs,
    )
    x = make_input(rank, data_format, rng)
    layer.build(x.shape)
    weights = randomize(layer, rng)
    calls = convolutions(monkeypatch)
    y = to_numpy(layer(x))
    assert len(calls) == (0 if mixed else general_path_convolutions(mode))
    np.testing.assert_allclose(
        y, reference(x, weights, kwargs, rank), rtol=1e-4, atol=1e-5
    )


GEOMETRIES = [
    (1, dict(padding="causal", dilation_rate=2)),
    (1, dict(padding="same", strides=2)),
    (2, dict(padding="same", strides=2)),
    (2, dict(padding="valid", dilation_rate=2)),
    (3, dict(padding="same", strides=2)),
]


@pytest.mark.parametrize("rank,geometry", GEOMETRIES)
@pytest.mark.parametrize("mode,expert_activation", MODES)
def test_strides_and_dilation_match_numpy_reference(
    mode, expert_activation, rank, geometry
):
    kwargs = dict(
        gating_input=mode,
        expert_activation=expert_activation,
        gating_activation="sigmoid",
        **geometry,
    )
    rng = np.random.default_rng(7)
    mixed = mode == "pooled" and not expert_activation
    layer = LAYERS[rank](
        N_FILTERS, N_EXPERTS, 2, mixed_kernel=True if mixed else None, **kwargs
    )
    x = make_input(rank, "channels_last", rng)
    layer.build(x.shape)
    weights = randomize(layer, rng)
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference(x, weights, kwargs, rank), rtol=1e-4, atol=1e-5
    )


def pooled_pair(n_experts, mixed_kernel, shape, seed):
    """Two `Conv2DMoE` with "pooled" gates and the same weights: one with
    `mixed_kernel`, one with the general path (`mixed_kernel=False`)."""
    rng = np.random.default_rng(seed)
    kwargs = {"padding": "same", "gating_input": "pooled"}
    layer = Conv2DMoE(5, n_experts, 3, mixed_kernel=mixed_kernel, **kwargs)
    general = Conv2DMoE(5, n_experts, 3, mixed_kernel=False, **kwargs)
    layer.build(shape)
    general.build(shape)
    randomize(layer, rng)
    general.set_weights(layer.get_weights())
    if None in shape:
        return layer, general, None
    return layer, general, rng.normal(size=shape).astype("float32")


def test_mixed_kernel_path_equals_the_general_path(monkeypatch):
    layer, general, x = pooled_pair(3, True, (3, 9, 8, 4), seed=3)
    calls = convolutions(monkeypatch)
    mixed = to_numpy(layer(x))
    assert calls == []
    np.testing.assert_allclose(mixed, to_numpy(general(x)), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(expert_activation="relu"),
        dict(gating_input="local"),
        dict(gating_input="flatten"),
    ],
)
def test_mixed_kernel_needs_linear_experts_with_pooled_gates(kwargs):
    kwargs = {"gating_input": "pooled", **kwargs}
    with pytest.raises(
        ValueError,
        match=r"`mixed_kernel=True` mixes the experts' kernels, which needs "
        r"linear experts.*Received: mixed_kernel=True",
    ):
        Conv2DMoE(2, 4, 3, mixed_kernel=True, **kwargs)
    # Automatic, these layers take the general path (no error).
    many = Conv2DMoE(2, base_conv_moe.MIXED_KERNEL_MIN_EXPERTS, 3, **kwargs)
    assert many.mixed_kernel is None


@pytest.mark.parametrize(
    "n_experts, mixed_kernel, mixed",
    [
        # Automatic: off below 8 experts per filter, where it measured
        # slower, on from 8, where it measured faster.
        (base_conv_moe.MIXED_KERNEL_MIN_EXPERTS - 1, None, False),
        (base_conv_moe.MIXED_KERNEL_MIN_EXPERTS, None, True),
        (base_conv_moe.MIXED_KERNEL_MIN_EXPERTS, False, False),
        (2, True, True),
    ],
)
def test_which_path_runs(monkeypatch, n_experts, mixed_kernel, mixed):
    """The path the layer takes by itself or as told, against the general
    path (checked against NumPy above)."""
    layer, general, x = pooled_pair(n_experts, mixed_kernel, (2, 7, 6, 4), seed=11)
    calls = convolutions(monkeypatch)
    y = to_numpy(layer(x))
    assert len(calls) == (0 if mixed else 1)
    np.testing.assert_allclose(y, to_numpy(general(x)), rtol=1e-5, atol=1e-5)


def test_mixed_kernel_with_undefined_spatial_sizes():
    """Built for any spatial size, `mixed_kernel=True` gives the general
    path's outputs at every size (the mixed kernel where a trace knows the
    sizes, the general path where it does not, as in TensorFlow's graphs)."""
    layer, general, _ = pooled_pair(4, True, (None, None, None, 4), seed=5)
    inputs = keras.Input((None, None, 4))
    model = keras.Model(inputs, [layer(inputs), general(inputs)])
    for size in ((5, 6), (8, 3)):
        x = np.random.default_rng(0).normal(size=(2,) + size + (4,))
        y, expected = model.predict(x.astype("float32"), verbose=0)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- harness


class ConvGatingLayerTest(testing.TestCase):
    def run_mode(self, mode, expert_activation, rank=2, **kwargs):
        # run_layer_test includes symbolic and eager calls, serialisation, a
        # training step and the mixed-precision check.
        shape = SHAPES[rank]
        out = (2, 4, 3) if rank == 2 else (2, 5)
        run_harness(
            self,
            LAYERS[rank],
            {
                "n_filters": 4,
                "n_experts_per_filter": 4,
                "kernel_size": 3,
                "gating_input": mode,
                "expert_activation": expert_activation,
                "gating_activation": "softmax",
                **kwargs,
            },
            (shape, out + (4,)),
            (4, 0, 0, 0),
            supports_masking=None,
        )

    def test_flatten(self):
        self.run_mode("flatten", "relu")

    def test_pooled(self):
        self.run_mode("pooled", "relu")

    def test_pooled_linear_experts(self):
        self.run_mode("pooled", None)

    def test_pooled_linear_experts_mixed_kernel(self):
        self.run_mode("pooled", None, mixed_kernel=True)

    def test_local(self):
        self.run_mode("local", "relu")

    def test_local_1d(self):
        self.run_mode("local", "tanh", rank=1)


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_router_is_float32_under_mixed_precision(mode):
    keras.config.set_dtype_policy("mixed_float16")
    layer = Conv2DMoE(3, 2, 3, gating_input=mode, gating_activation="softmax")
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype("float16")
    y = layer(x)
    assert layer.gating_kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    logits = layer.gate_logits(keras.ops.convert_to_tensor(x))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


# ----------------------------------------------- undefined spatial sizes


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("mode,expert_activation", MODES[1:])
def test_undefined_spatial_size_one_set_of_weights_any_size(
    mode, expert_activation, data_format
):
    kwargs = dict(
        gating_input=mode,
        expert_activation=expert_activation,
        gating_activation="softmax",
        padding="same",
        data_format=data_format,
    )
    channels = (None, None, 3) if data_format == "channels_last" else (3, None, None)
    inputs = keras.Input(channels)
    layer = Conv2DMoE(N_FILTERS, N_EXPERTS, 3, **kwargs)
    outputs = layer(inputs)
    expected = (None, None, None, N_FILTERS)
    if data_format == "channels_first":
        expected = (None, N_FILTERS, None, None)
    assert tuple(outputs.shape) == expected
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(11)
    weights = randomize(layer, rng)
    for shape in [(2, 6, 5, 3), (1, 9, 4, 3)]:
        x = make_input(2, data_format, rng, shape)
        np.testing.assert_allclose(
            to_numpy(model(x)), reference(x, weights, kwargs, 2), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_undefined_length_causal_1d_trains(mode):
    model = keras.Sequential(
        [
            keras.Input((None, 2)),
            Conv1DMoE(3, 2, 3, padding="causal", gating_input=mode),
            keras.layers.GlobalAveragePooling1D(),
        ]
    )
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).normal(size=(4, 8, 2)).astype("float32")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, np.ones((4, 3), "float32"), epochs=1, batch_size=2, verbose=0)
    assert all(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    assert model.predict(x[:, :5], verbose=0).shape == (4, 3)


def test_flatten_with_undefined_size_names_the_alternatives():
    with pytest.raises(
        ValueError, match="gating_input='pooled'.*Received: input_shape"
    ):
        Conv2DMoE(2, 2, 3)(keras.Input((None, None, 3)))


# ------------------------------------------------------------- weights


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_weight_shapes_and_parameter_counts(rank):
    kernel = (3,) * rank
    shapes = {}
    for mode in ["flatten", "pooled", "local"]:
        layer = LAYERS[rank](8, 2, 3, gating_input=mode)
        layer.build((None,) + (6,) * rank + (4,))
        shapes[mode] = tuple(layer.gating_kernel.shape)
        assert tuple(layer.gating_bias.shape) == (8, 2)
        assert tuple(layer.expert_kernel.shape) == kernel + (4, 16)
    assert shapes == {
        "flatten": (6,) * rank + (4, 8, 2),
        "pooled": (4, 8, 2),
        "local": kernel + (4, 8, 2),
    }


def test_cifar_sized_pooled_layer_parameter_count():
    # Conv2DMoE(32, 2, 3x3) on 32x32x3: experts 3*3*3*64 + 64, gates 3*64 + 64.
    layer = Conv2DMoE(32, 2, 3, padding="same", gating_input="pooled")
    layer.build((None, 32, 32, 3))
    assert layer.count_params() == 1728 + 64 + 192 + 64
    flatten = Conv2DMoE(32, 2, 3, padding="same")
    flatten.build((None, 32, 32, 3))
    assert flatten.count_params() == 1728 + 64 + 32 * 32 * 3 * 64 + 64


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_gating_initialisation_std(mode):
    layer = Conv2DMoE(32, 4, 3, gating_input=mode, gating_kernel_initializer_scale=2.0)
    layer.build((None, 8, 8, 16))
    fan_in = 16 if mode == "pooled" else 16 * 9
    std = to_numpy(layer.gating_kernel).std()
    np.testing.assert_allclose(std, 2.0 / np.sqrt(fan_in), rtol=0.1)


# ---------------------------------------------------------------- compat


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("rank,mode", [(1, "local"), (2, "pooled"), (2, "local")])
def test_compat_loads_mode_shaped_gating_kernel_into_unbuilt_layer(
    rank, mode, data_format
):
    rng = np.random.default_rng(5)
    kernel = (3,) * rank
    original = [
        rng.normal(size=kernel + (3, N_FILTERS * N_EXPERTS)),  # expert_kernel
        rng.normal(
            size=((3,) if mode == "pooled" else kernel + (3,)) + (N_FILTERS, N_EXPERTS)
        ),  # gating_kernel in the mode's shape
        rng.normal(size=(1,) * rank + (N_FILTERS, N_EXPERTS)),  # original bias
        rng.normal(size=(N_FILTERS, N_EXPERTS)),  # gating_bias
    ]
    original = [a.astype("float32") for a in original]
    kwargs = dict(
        gating_input=mode,
        expert_activation="relu",
        gating_activation="softmax",
        padding="same",
        data_format=data_format,
    )
    layer = LAYERS[rank](N_FILTERS, N_EXPERTS, 3, **kwargs)
    compat.load_seed_weights(layer, original)
    assert layer.built
    weights = {
        "expert_kernel": original[0],
        "gating_kernel": original[1],
        "expert_bias": original[2].reshape(N_FILTERS, N_EXPERTS),
        "gating_bias": original[3],
    }
    # Built for any spatial size: two sizes, one set of weights.
    for size in [5, 8]:
        x = make_input(rank, data_format, rng, (2,) + (size,) * rank + (3,))
        np.testing.assert_allclose(
            to_numpy(layer(x)),
            reference(x, weights, kwargs, rank),
            rtol=1e-4,
            atol=1e-5,
        )


def test_compat_rejects_a_gating_kernel_of_another_mode():
    rng = np.random.default_rng(0)
    flatten_shaped = rng.normal(size=(6, 6, 3, 2, 2))
    arrays = [
        rng.normal(size=(3, 3, 3, 4)),
        flatten_shaped,
        rng.normal(size=(1, 1, 2, 2)),
        rng.normal(size=(2, 2)),
    ]
    with pytest.raises(ValueError, match="gating_kernel"):
        compat.load_seed_weights(Conv2DMoE(2, 2, 3, gating_input="pooled"), arrays)


# ------------------------------------------------------- arguments, config


@pytest.mark.parametrize(
    "value,error",
    [("global", ValueError), ("", ValueError), (None, ValueError), (3, ValueError)],
)
def test_bad_gating_input(value, error):
    with pytest.raises(
        error, match=r"`gating_input` must be one of .*Received: gating_input="
    ):
        Conv2DMoE(2, 2, 3, gating_input=value)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("mode", ["flatten", "pooled", "local"])
def test_config_round_trip(rank, mode):
    mixed_kernel = True if mode == "pooled" else False
    layer = LAYERS[rank](
        4, 2, 3, gating_input=mode, padding="same", mixed_kernel=mixed_kernel
    )
    config = layer.get_config()
    assert config["gating_input"] == mode
    assert config["mixed_kernel"] is mixed_kernel
    clone = LAYERS[rank].from_config(config)
    assert clone.gating_input == mode
    assert clone.mixed_kernel is mixed_kernel
    assert clone.get_config() == config


@pytest.mark.parametrize("value", [1, "yes"])
def test_bad_mixed_kernel(value):
    with pytest.raises(
        TypeError, match=rf"`mixed_kernel` must be a bool.*mixed_kernel={value!r}"
    ):
        Conv2DMoE(2, 2, 3, gating_input="pooled", mixed_kernel=value)


def test_default_is_the_original_flatten_gating():
    assert Conv2DMoE(2, 2, 3).gating_input == "flatten"
    assert Conv2DMoE(2, 2, 3, gating_input="Pooled").gating_input == "pooled"
