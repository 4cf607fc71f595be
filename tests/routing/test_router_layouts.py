"""`TopKRouter(layout=...)`: every dispatch layout gives the NumPy
reference's outputs and gradients (inputs, router kernel and bias, expert
weights), dropless and with a capacity, masked tokens included."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend
from keras_moe import routing
from tests.routing.gradients import layer_gradients
from tests.routing.test_dispatch import np_kept
from tests.routing.test_dispatch import np_softmax

N, D, M, E, K = 16, 5, 3, 4, 2

# Dropless layouts, and the grouped matmul's where the backend has one.
DROPLESS = ["auto", "tiers", "blocks"]
if backend.grouped_matmul_available():
    DROPLESS.append("grouped")
CASES = [(layout, None, masked) for layout in DROPLESS for masked in (False, True)]
CASES += [
    (layout, 0.75, masked)
    for layout in ("auto", "capacity")
    for masked in (False, True)
]


class RoutedExperts(keras.layers.Layer):
    """A router and `tanh(x . W_e + b_e)` experts, run by its dispatch."""

    def __init__(self, router, **kwargs):
        super().__init__(**kwargs)
        self.router = router
        self.supports_masking = True

    def build(self, input_shape):
        self.router.build(input_shape)
        self.kernel = self.add_weight(name="kernel", shape=(E, D, M))
        self.bias = self.add_weight(name="bias", shape=(E, M))

    def bank(self, rows, layout):
        h = layout.matmul(rows, layout.select(self.kernel))
        return ops.tanh(h + layout.broadcast(layout.select(self.bias)))

    def call(self, x, mask=None, training=None):
        weights, experts = self.router(x, mask=mask, training=training)
        return self.router.dispatch(
            x, weights, experts, self.bank, mask=mask, training=training
        )


def np_routed_experts(x, router_kernel, router_bias, kernel, bias, g, capacity, mask):
    """Reference outputs, gradients (float64) of `L = sum(y * g)` and
    dropped fraction.

    Each token's top-`K` experts by logit, weights the softmax over their
    logits; with `capacity`, every first choice is served before any second
    one, in token order, and an expert's assignments past `capacity` are
    dropped (no output, no gradient; the weights' softmax still couples the
    logits)."""
    x = x.astype("float64")
    valid = np.ones(N, bool) if mask is None else mask
    logits = x @ router_kernel + router_bias
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
    weights = np_softmax(np.take_along_axis(logits, experts, axis=-1))
    y = np.zeros((N, M))
    grads = {
        "x": np.zeros_like(x),
        "kernel": np.zeros(kernel.shape),
        "bias": np.zeros(bias.shape),
        "router_kernel": np.zeros(router_kernel.shape),
        "router_bias": np.zeros(router_bias.shape),
    }
    weight_grads = np.zeros((N, K))
    kept, dropped = np_kept(experts, capacity, valid)
    for t, slot, e in kept:
        h = np.tanh(x[t] @ kernel[e] + bias[e])
        y[t] += weights[t, slot] * h
        weight_grads[t, slot] = g[t] @ h
        pre = weights[t, slot] * g[t] * (1.0 - h**2)
        grads["kernel"][e] += np.outer(x[t], pre)
        grads["bias"][e] += pre
        grads["x"][t] += kernel[e] @ pre
    # The softmax over the chosen logits, back to the router's weights.
    mixed = np.sum(weights * weight_grads, axis=-1, keepdims=True)
    logit_grads = np.zeros_like(logits)
    np.put_along_axis(logit_grads, experts, weights * (weight_grads - mixed), axis=-1)
    grads["router_kernel"] = x.T @ logit_grads
    grads["router_bias"] = logit_grads.sum(0)
    grads["x"] += logit_grads @ router_kernel.T
    return y, grads, dropped


@pytest.mark.parametrize("layout, capacity_factor, masked", CASES)
def test_every_layout_matches_numpy_with_gradients(layout, capacity_factor, masked):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype("float32")
    # Expert 0 favoured: the capacity really drops.
    x[:, 0] += 1.0
    router = routing.TopKRouter(
        E, top_k=K, use_bias=True, capacity_factor=capacity_factor, layout=layout
    )
    layer = RoutedExperts(router)
    layer.build((None, D))
    values = {
        "router_kernel": rng.normal(size=(D, E)),
        "router_bias": np.array([1.0, 0.0, -0.5, 0.2]),
        "kernel": rng.normal(size=(E, D, M)) / np.sqrt(D),
        "bias": rng.normal(size=(E, M)) * 0.1,
    }
    router.kernel.assign(values["router_kernel"].astype("float32"))
    router.bias.assign(values["router_bias"].astype("float32"))
    layer.kernel.assign(values["kernel"].astype("float32"))
    layer.bias.assign(values["bias"].astype("float32"))
    mask = None
    if masked:
        mask = np.arange(N) % 5 != 2
    g = rng.normal(size=(N, M)).astype("float32")
    capacity = None
    if capacity_factor is not None:
        capacity = routing.expert_capacity(N, K, E, capacity_factor)
    y, x_grad, grads = layer_gradients(layer, x, g, mask=mask, training=False)
    ref, ref_grads, ref_dropped = np_routed_experts(
        x, *values.values(), g, capacity, mask
    )
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x_grad, ref_grads["x"], rtol=1e-4, atol=1e-5)
    paths = {
        "router_kernel": router.kernel.path,
        "router_bias": router.bias.path,
        "kernel": layer.kernel.path,
        "bias": layer.bias.path,
    }
    for name, path in paths.items():
        np.testing.assert_allclose(
            grads[path], ref_grads[name], rtol=1e-4, atol=1e-5, err_msg=name
        )
    # A capacity really drops here; the router reports it (JAX's gradient
    # ran stateless: a plain call updates the statistics).
    assert (ref_dropped > 0) == (capacity_factor is not None)
    layer(x, mask=mask)
    dropped = router.routing_stats["dropped_fraction"]
    assert dropped == pytest.approx(ref_dropped, abs=1e-6)
    if mask is not None:
        np.testing.assert_array_equal(y[~mask], 0.0)
        np.testing.assert_array_equal(x_grad[~mask], 0.0)


def test_an_explicit_grouped_layout_needs_a_grouped_matmul():
    router = routing.TopKRouter(E, top_k=K, layout="grouped")
    layer = RoutedExperts(router)
    x = np.ones((N, D), "float32")
    if backend.grouped_matmul_available():
        assert tuple(layer(x).shape) == (N, M)
    else:
        with pytest.raises(ValueError, match="Received: layout='grouped'"):
            layer(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layout": "rows"}, "`layout` must be one of"),
        ({"layout": "tiers", "capacity_factor": 1.0}, "is a dropless layout"),
        ({"layout": "capacity"}, "it needs a `capacity_factor`"),
    ],
)
def test_bad_layouts_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        routing.TopKRouter(E, **kwargs)


def test_the_layout_is_saved():
    router = routing.TopKRouter(E, layout="blocks")
    config = router.get_config()
    assert config["layout"] == "blocks"
    assert routing.TopKRouter.from_config(config).layout == "blocks"
