"""`gating_input` of Conv1DMoE/Conv2DMoE/Conv3DMoE: "flatten", "pooled", "local".

A NumPy reference for each mode, rank, data format and padding; Keras's layer
harness for each mode; inputs of undefined spatial size; the CondConv
(mixed-kernel) path against the general one; weights in the original order
through `compat`; bad values and config round trips.
"""

import itertools

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

LAYERS = {1: Conv1DMoE, 2: Conv2DMoE, 3: Conv3DMoE}
# Small channels-last input shapes (batch first) per rank.
SHAPES = {1: (2, 7, 3), 2: (2, 6, 5, 3), 3: (2, 4, 5, 3, 2)}
N_FILTERS, N_EXPERTS = 3, 2


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


ACTIVATIONS = {
    None: lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "softmax": np_softmax,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def np_conv(x, kernel, strides, padding, dilation):
    """Channels-last convolution (cross-correlation), one slice per kernel tap.

    `x` `(b, *spatial, c_in)`, `kernel` `kernel_size + (c_in, c_out)`;
    `"same"` pads as TensorFlow does (the extra row at the end).
    """
    rank = x.ndim - 2
    kernel_size = kernel.shape[:rank]
    effective = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation)]
    if padding == "causal":
        pads = [(effective[0] - 1, 0)]
    elif padding == "same":
        pads = []
        for n, e, s in zip(x.shape[1:-1], effective, strides):
            total = max((-(-n // s) - 1) * s + e - n, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(0, 0)] * rank
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], effective, strides)]
    y = np.zeros((x.shape[0], *out, kernel.shape[-1]))
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(t * d, t * d + (n - 1) * s + 1, s)
            for t, n, s, d in zip(tap, out, strides, dilation)
        )
        y += x[(slice(None), *window)] @ kernel[tap]
    return y


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
def test_matches_numpy_reference(mode, expert_activation, rank, padding, data_format):
    kwargs = dict(
        gating_input=mode,
        expert_activation=expert_activation,
        gating_activation="softmax",
        padding=padding,
        data_format=data_format,
    )
    rng = np.random.default_rng(rank)
    layer = LAYERS[rank](N_FILTERS, N_EXPERTS, 3 if rank < 3 else 2, **kwargs)
    layer._mixed_kernel = True  # wherever it applies, whatever the sizes
    x = make_input(rank, data_format, rng)
    layer.build(x.shape)
    weights = randomize(layer, rng)
    assert layer._uses_mixed_kernel(x) == (mode == "pooled" and not expert_activation)
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference(x, weights, kwargs, rank), rtol=1e-4, atol=1e-5
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
    layer = LAYERS[rank](N_FILTERS, N_EXPERTS, 2, **kwargs)
    layer._mixed_kernel = True
    x = make_input(rank, "channels_last", rng)
    layer.build(x.shape)
    weights = randomize(layer, rng)
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference(x, weights, kwargs, rank), rtol=1e-4, atol=1e-5
    )


def test_mixed_kernel_path_equals_the_general_path():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 9, 8, 4)).astype("float32")
    layer = Conv2DMoE(5, 3, 3, padding="same", gating_input="pooled")
    layer.build(x.shape)
    randomize(layer, rng)
    layer._mixed_kernel = True
    assert layer._uses_mixed_kernel(x)
    mixed = to_numpy(layer(x))
    layer._mixed_kernel = False
    assert not layer._uses_mixed_kernel(x)
    np.testing.assert_allclose(mixed, to_numpy(layer(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,input_shape,expected",
    [
        (dict(), (None, 5, 5, 32), True),
        (dict(expert_activation="relu"), (None, 5, 5, 32), False),
        (dict(gating_input="local"), (None, 5, 5, 32), False),
        (dict(gating_input="flatten"), (None, 5, 5, 32), False),
        (dict(), (None, None, 5, 32), False),
    ],
)
def test_mixed_kernel_path_applies_only_to_linear_experts_with_pooled_gates(
    kwargs, input_shape, expected
):
    kwargs = {"gating_input": "pooled", **kwargs}
    layer = Conv2DMoE(2, 4, 3, **kwargs)
    x = keras.KerasTensor(input_shape)
    # Automatic: off below 8 experts per filter, where it measured slower.
    assert not layer._uses_mixed_kernel(x)
    layer._mixed_kernel = True
    assert layer._uses_mixed_kernel(x) == expected
    # On by default from 8 experts per filter, where it measured faster.
    many = Conv2DMoE(2, base_conv_moe.MIXED_KERNEL_MIN_EXPERTS, 3, **kwargs)
    assert many._uses_mixed_kernel(x) == expected
    many._mixed_kernel = False
    assert not many._uses_mixed_kernel(x)


def test_default_path_with_many_experts_equals_the_general_path():
    """The mixed-kernel path the layer takes by itself (8 experts per filter)
    against the general path (checked against NumPy above)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 7, 6, 4)).astype("float32")
    n_experts = base_conv_moe.MIXED_KERNEL_MIN_EXPERTS
    layer = Conv2DMoE(3, n_experts, 3, padding="same", gating_input="pooled")
    layer.build(x.shape)
    randomize(layer, rng)
    assert layer._uses_mixed_kernel(x)
    default = to_numpy(layer(x))
    layer._mixed_kernel = False
    np.testing.assert_allclose(default, to_numpy(layer(x)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- harness


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class MixedKernelConv2DMoE(Conv2DMoE):
    """`Conv2DMoE` with the mixed-kernel path on, for Keras's harness."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mixed_kernel = True


class ConvGatingLayerTest(testing.TestCase):
    def run_mode(self, mode, expert_activation, rank=2, layer_cls=None):
        # run_layer_test includes symbolic and eager calls, serialisation, a
        # training step and the mixed-precision check.
        shape = SHAPES[rank]
        out = (2, 4, 3) if rank == 2 else (2, 5)
        self.run_layer_test(
            layer_cls or LAYERS[rank],
            init_kwargs={
                "n_filters": 4,
                "n_experts_per_filter": 4,
                "kernel_size": 3,
                "gating_input": mode,
                "expert_activation": expert_activation,
                "gating_activation": "softmax",
            },
            input_shape=shape,
            expected_output_shape=out + (4,),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
            expected_num_seed_generators=0,
            expected_num_losses=0,
        )

    def test_flatten(self):
        self.run_mode("flatten", "relu")

    def test_pooled(self):
        self.run_mode("pooled", "relu")

    def test_pooled_linear_experts(self):
        self.run_mode("pooled", None)

    def test_pooled_linear_experts_mixed_kernel(self):
        self.run_mode("pooled", None, layer_cls=MixedKernelConv2DMoE)

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
    layer = LAYERS[rank](4, 2, 3, gating_input=mode, padding="same")
    config = layer.get_config()
    assert config["gating_input"] == mode
    clone = LAYERS[rank].from_config(config)
    assert clone.gating_input == mode
    assert clone.get_config() == config


def test_default_is_the_original_flatten_gating():
    assert Conv2DMoE(2, 2, 3).gating_input == "flatten"
    assert Conv2DMoE(2, 2, 3, gating_input="Pooled").gating_input == "pooled"
