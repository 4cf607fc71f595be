"""keras_moe.upcycling: a dense feed-forward block's kernels (or Dense layers)
into an MoEFeedForward with the same function at initialisation, against a
float64 NumPy reference; expert noise; save/load; bad arguments."""

import warnings

import keras
import numpy as np
import pytest

from keras_moe import FeedForwardExperts
from keras_moe import MoEFeedForward
from keras_moe.routing import TopKRouter
from keras_moe.upcycling import expert_copies
from keras_moe.upcycling import upcycle_feed_forward
from tests.conftest import to_numpy

D, M, E = 8, 12, 4
RNG = np.random.default_rng(0)


def np_gelu(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"relu": lambda x: np.maximum(x, 0.0), "gelu": np_gelu, "silu": np_silu}


def dense_block(activation, gated, biases, gate_bias=False, seed=0):
    """Random float32 kernels and biases of a dense block, as a dict."""
    rng = np.random.default_rng(seed)
    w = {
        "up": rng.normal(0, 0.3, (D, M)),
        "down": rng.normal(0, 0.3, (M, D)),
        "gate": rng.normal(0, 0.3, (D, M)) if gated else None,
        "up_bias": rng.normal(0, 0.3, (M,)) if biases else None,
        "down_bias": rng.normal(0, 0.3, (D,)) if biases else None,
        "gate_bias": rng.normal(0, 0.3, (M,)) if gate_bias else None,
    }
    return {k: None if v is None else v.astype("float32") for k, v in w.items()}


def upcycled(w, activation, n_experts=E, **kwargs):
    """`upcycle_feed_forward` of the arrays of `dense_block`."""
    return upcycle_feed_forward(
        w["up"],
        w["down"],
        n_experts=n_experts,
        gate=w["gate"],
        activation=activation,
        up_bias=w["up_bias"],
        down_bias=w["down_bias"],
        **kwargs,
    )


def np_block(w, activation, x):
    """The dense block in float64 NumPy."""
    act = ACTIVATIONS[activation]
    f64 = {k: None if v is None else v.astype("float64") for k, v in w.items()}
    x = x.astype("float64")
    h = x @ f64["up"] + (0 if f64["up_bias"] is None else f64["up_bias"])
    if f64["gate"] is not None:
        g = x @ f64["gate"] + (0 if f64["gate_bias"] is None else f64["gate_bias"])
        h = act(g) * h
    else:
        h = act(h)
    return h @ f64["down"] + (0 if f64["down_bias"] is None else f64["down_bias"])


def assert_relative_close(actual, expected, rtol=1e-5):
    actual, expected = to_numpy(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    error = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert error <= rtol, error


def dense_layers(w, activation):
    """The block as built Dense layers (activation on `up` or on `gate`)."""
    gated = w["gate"] is not None
    up = keras.layers.Dense(
        M, activation=None if gated else activation, use_bias=w["up_bias"] is not None
    )
    up.build((None, D))
    up.set_weights([w["up"]] + ([w["up_bias"]] if w["up_bias"] is not None else []))
    down = keras.layers.Dense(D, use_bias=w["down_bias"] is not None)
    down.build((None, M))
    down.set_weights(
        [w["down"]] + ([w["down_bias"]] if w["down_bias"] is not None else [])
    )
    gate = None
    if gated:
        gate = keras.layers.Dense(
            M, activation=activation, use_bias=w["gate_bias"] is not None
        )
        gate.build((None, D))
        gate_weights = [w["gate"]]
        if w["gate_bias"] is not None:
            gate_weights.append(w["gate_bias"])
        gate.set_weights(gate_weights)
    return up, down, gate


BLOCKS = [
    ("relu", False, False),
    ("gelu", False, True),
    ("silu", True, False),
    ("gelu", True, True),
]


@pytest.mark.parametrize("activation, gated, biases", BLOCKS)
def test_kernels_upcycle_to_the_same_function(activation, gated, biases):
    w = dense_block(activation, gated, biases)
    layer = upcycled(w, activation)
    assert isinstance(layer, MoEFeedForward) and layer.built
    assert isinstance(layer.experts, FeedForwardExperts)
    assert isinstance(layer.router, TopKRouter)
    experts, router = layer.experts, layer.router
    assert (experts.gated, experts.use_bias, router.normalize_top_k) == (
        gated,
        biases,
        True,
    )
    x = RNG.normal(size=(2, 3, D)).astype("float32")
    assert_relative_close(layer(x), np_block(w, activation, x))


@pytest.mark.parametrize("activation, gated, biases", BLOCKS)
def test_dense_layers_upcycle_to_the_same_function(activation, gated, biases):
    w = dense_block(activation, gated, biases)
    up, down, gate = dense_layers(w, activation)
    layer = upcycle_feed_forward(up, down, n_experts=E, gate=gate, top_k=3)
    x = RNG.normal(size=(6, D)).astype("float32")
    assert_relative_close(layer(x), np_block(w, activation, x))
    # The Dense layers' own output, as a second reference.
    h = up(x) if gate is None else gate(x) * up(x)
    assert_relative_close(layer(x), to_numpy(down(h)))


def test_a_gate_bias_is_kept():
    w = dense_block("silu", gated=True, biases=False, gate_bias=True)
    up, down, gate = dense_layers(w, "silu")
    layer = upcycle_feed_forward(up, down, n_experts=E, gate=gate)
    x = RNG.normal(size=(6, D)).astype("float32")
    assert_relative_close(layer(x), np_block(w, "silu", x))


@pytest.mark.parametrize("gated", [False, True])
def test_the_layer_is_composed_without_deprecated_options(gated):
    """The experts, router and options are 0.3.0's: no keras-moe deprecation
    warns, and the config saves the sublayers (no moved option of 0.2.0)."""
    w = dense_block("gelu", gated=gated, biases=True, gate_bias=gated)
    up, down, gate = dense_layers(w, "gelu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = upcycle_feed_forward(
            up, down, n_experts=E, gate=gate, top_k=3, capacity_factor=2.0
        )
        config = layer.get_config()
    # (PyTorch's backend warns of NumPy's `copy` keyword on its own.)
    assert not [w for w in caught if "keras-moe" in str(w.message)]
    assert layer.experts.use_gate_bias is gated
    assert (layer.router.top_k, layer.router.capacity_factor) == (3, 2.0)
    assert config["format_version"] == 2
    assert not {"gate_bias", "normalize_top_k", "intermediate_dim"} & set(config)


def test_every_expert_is_a_copy_and_any_router_keeps_the_function():
    w = dense_block("gelu", gated=True, biases=True)
    layer = upcycled(w, "gelu", router_initializer="zeros")
    for e in range(E):
        np.testing.assert_array_equal(to_numpy(layer.experts.up_kernel)[e], w["up"])
        np.testing.assert_array_equal(to_numpy(layer.experts.gate_kernel)[e], w["gate"])
        np.testing.assert_array_equal(to_numpy(layer.experts.down_kernel)[e], w["down"])
        np.testing.assert_array_equal(to_numpy(layer.experts.up_bias)[e], w["up_bias"])
    np.testing.assert_array_equal(to_numpy(layer.router.kernel), 0.0)
    x = RNG.normal(size=(6, D)).astype("float32")
    expected = np_block(w, "gelu", x)
    # A strong random router sends tokens to different experts: same function.
    layer.router.kernel.assign(RNG.normal(0, 10.0, (D, E)).astype("float32"))
    assert_relative_close(layer(x), expected)
    assert np.count_nonzero(layer.routing_stats["expert_load"]) > 2


@pytest.mark.parametrize("n_experts, top_k", [(E, 1), (E, E)])
def test_any_top_k_is_exact(n_experts, top_k):
    w = dense_block("relu", gated=False, biases=True)
    layer = upcycled(
        w,
        "relu",
        n_experts=n_experts,
        top_k=top_k,
        router_initializer=keras.initializers.RandomNormal(stddev=1.0),
    )
    x = RNG.normal(size=(6, D)).astype("float32")
    assert_relative_close(layer(x), np_block(w, "relu", x))


def test_a_one_sided_bias_is_completed_with_zeros():
    w = dense_block("relu", gated=False, biases=True)
    w["up_bias"] = None
    layer = upcycle_feed_forward(
        w["up"], w["down"], n_experts=E, activation="relu", down_bias=w["down_bias"]
    )
    np.testing.assert_array_equal(to_numpy(layer.experts.up_bias), 0.0)
    x = RNG.normal(size=(6, D)).astype("float32")
    assert_relative_close(layer(x), np_block(w, "relu", x))


def test_expert_noise_is_relative_seeded_and_breaks_only_the_symmetry():
    w = dense_block("silu", gated=True, biases=True)
    kwargs = dict(
        n_experts=E,
        gate=w["gate"],
        activation="silu",
        up_bias=w["up_bias"],
        down_bias=w["down_bias"],
        expert_noise=0.1,
        seed=3,
    )
    layer = upcycle_feed_forward(w["up"], w["down"], **kwargs)
    again = upcycle_feed_forward(w["up"], w["down"], **kwargs)
    up = to_numpy(layer.experts.up_kernel)
    np.testing.assert_array_equal(up, to_numpy(again.experts.up_kernel))
    # The seed's NumPy stream: the same on every backend.
    expected = expert_copies(w["up"], E, 0.1, np.random.default_rng(3))
    np.testing.assert_allclose(up, expected, rtol=1e-6)
    noise = up - w["up"][None]
    assert not np.allclose(up[0], up[1])
    np.testing.assert_allclose(noise.std(), 0.1 * w["up"].std(), rtol=0.15)
    # Biases are copied exactly.
    np.testing.assert_array_equal(to_numpy(layer.experts.down_bias)[2], w["down_bias"])
    x = RNG.normal(size=(6, D)).astype("float32")
    out, dense = to_numpy(layer(x)), np_block(w, "silu", x)
    error = np.max(np.abs(out - dense)) / np.max(np.abs(dense))
    assert 1e-4 < error < 0.5


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_kernels_upcycle_exactly(dtype, as_tensor):
    half = {
        k: None if v is None else v.astype(dtype)
        for k, v in dense_block("silu", gated=True, biases=True).items()
    }
    given = {
        k: keras.ops.convert_to_tensor(v) if as_tensor and v is not None else v
        for k, v in half.items()
    }
    layer = upcycled(given, "silu")
    # Every expert holds the half-precision values exactly (float32 weights).
    for name in ("up", "gate", "down"):
        kernels = to_numpy(getattr(layer.experts, f"{name}_kernel"))
        for kernel in kernels:
            np.testing.assert_array_equal(kernel, half[name].astype("float32"))
    x = RNG.normal(size=(6, D)).astype("float32")
    assert_relative_close(layer(x), np_block(half, "silu", x))


def test_dtype_policy_follows_the_dense_layers():
    keras.config.set_dtype_policy("mixed_float16")
    w = dense_block("relu", gated=False, biases=False)
    up, down, _ = dense_layers(w, "relu")
    layer = upcycle_feed_forward(up, down, n_experts=E)
    assert layer.dtype_policy.name == "mixed_float16"
    assert layer.experts.up_kernel.dtype == "float32"
    x = RNG.normal(size=(6, D)).astype("float32")
    out = to_numpy(layer(x)).astype("float32")
    np.testing.assert_allclose(out, np_block(w, "relu", x), rtol=2e-2, atol=2e-2)


def test_upcycled_layer_trains_saves_and_reloads(tmp_path):
    w = dense_block("gelu", gated=True, biases=True)
    layer = upcycled(w, "gelu")
    model = keras.Sequential([keras.Input((3, D)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = RNG.normal(size=(2, 3, D)).astype("float32")
    before = to_numpy(model(x))
    model.fit(x, RNG.normal(size=(2, 3, D)).astype("float32"), verbose=0)
    after = to_numpy(model(x))
    assert not np.allclose(before, after)
    path = tmp_path / "upcycled.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(reloaded(x)), after, rtol=1e-6, atol=1e-6)


def _unbuilt_dense():
    return keras.layers.Dense(M)


def _relu_down():
    layer = keras.layers.Dense(D, activation="relu")
    layer.build((None, M))
    return layer


def _gated_up_with_activation():
    layer = keras.layers.Dense(M, activation="relu")
    layer.build((None, D))
    return layer


def _relu_up():
    layer = keras.layers.Dense(M, activation="relu")
    layer.build((None, D))
    return layer


UP = np.ones((D, M), "float32")
DOWN = np.ones((M, D), "float32")
BAD_ARGUMENTS = [
    ({"up": UP, "down": np.ones((M, D + 1), "float32")}, ValueError, "`down`.*shape"),
    ({"up": UP, "down": DOWN, "gate": np.ones((D, M + 1))}, ValueError, "`gate`"),
    ({"up": np.ones((D, M, 2)), "down": DOWN}, ValueError, "`up`.*rank 2"),
    ({"up": np.ones((D, M), "int32"), "down": DOWN}, ValueError, "`up`.*float"),
    ({"up": "kernel", "down": DOWN}, ValueError, "`up`"),
    ({"up": keras.layers.ReLU(), "down": DOWN}, TypeError, "`up`.*Dense"),
    ({"up": _unbuilt_dense, "down": DOWN}, ValueError, "built `Dense`"),
    ({"up": UP, "down": _relu_down}, ValueError, "`down`.*without activation"),
    (
        {"up": _gated_up_with_activation, "down": DOWN, "gate": UP},
        ValueError,
        "`up`.*gated",
    ),
    ({"up": UP, "down": DOWN, "activation": None}, ValueError, "`activation` must"),
    ({"up": _relu_up, "down": DOWN, "activation": "gelu"}, ValueError, "`activation`"),
    ({"up": UP, "down": DOWN, "activation": "nope"}, ValueError, "`activation`"),
    ({"up": UP, "down": DOWN, "up_bias": np.ones(M + 1)}, ValueError, "`up_bias`"),
    ({"up": UP, "down": DOWN, "down_bias": np.ones(M)}, ValueError, "`down_bias`"),
    ({"up": UP, "down": DOWN, "n_experts": 0}, ValueError, "`n_experts`"),
    ({"up": UP, "down": DOWN, "top_k": 5}, ValueError, "`top_k`"),
    ({"up": UP, "down": DOWN, "expert_noise": -1.0}, ValueError, "`expert_noise`"),
    ({"up": UP, "down": DOWN, "seed": -1}, ValueError, "`seed`"),
    ({"up": UP, "down": DOWN, "router_initializer": "nope"}, ValueError, "router"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, error, message):
    kwargs = {
        k: v() if callable(v) and not isinstance(v, keras.layers.Layer) else v
        for k, v in kwargs.items()
    }
    kwargs = {"n_experts": E, "activation": "relu", **kwargs}
    with pytest.raises(error, match=message):
        upcycle_feed_forward(**kwargs)


def test_a_bias_given_twice_is_an_error():
    up = keras.layers.Dense(M)
    up.build((None, D))
    with pytest.raises(ValueError, match="`up_bias` must be None"):
        upcycle_feed_forward(
            up, DOWN, n_experts=2, activation="relu", up_bias=np.ones(M, "float32")
        )
