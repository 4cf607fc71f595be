"""MoEFeedForward's gradients with masked tokens, against a float64 NumPy
backpropagation, over many random draws (weights, inputs, masks)."""

import contextlib
import math

import keras
import numpy as np
import pytest

from keras_moe import MoEFeedForward
from keras_moe import backend
from keras_moe.layers import FeedForwardExperts
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy

N, D, M, E, K = 10, 6, 7, 4, 2
DRAWS = 40


def np_gelu_and_grad(x):
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    pdf = np.exp(-0.5 * x**2) / np.sqrt(2.0 * np.pi)
    return x * cdf, cdf + x * pdf


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_gradients(weights, x, mask, target, fused):
    """d sum(y * target) / d weights (float64), by hand: top-2 of the logits,
    softmax over the chosen, GELU experts (gated with the concatenated layout
    when `fused`), masked tokens contributing nothing."""
    w = {k: v.astype("float64") for k, v in weights.items()}
    g = {k: np.zeros_like(v) for k, v in w.items()}
    up_name = "gate_up" if fused else "up"
    for t in np.flatnonzero(mask):
        xt = x[t].astype("float64")
        logits = xt @ w["kernel"]
        experts = np.argsort(-logits, kind="stable")[:K]
        gates = np_softmax(logits[experts])
        d_gates = np.zeros(K)
        for j, e in enumerate(experts):
            u = xt @ w[f"{up_name}_kernel"][e] + w[f"{up_name}_bias"][e]
            if fused:
                act, d_act = np_gelu_and_grad(u[:M])
                h = act * u[M:]
            else:
                h, d_act = np_gelu_and_grad(u)
            y = h @ w["down_kernel"][e] + w["down_bias"][e]
            d_gates[j] = y @ target[t]
            dy = gates[j] * target[t]
            g["down_kernel"][e] += np.outer(h, dy)
            g["down_bias"][e] += dy
            dh = w["down_kernel"][e] @ dy
            if fused:
                du = np.concatenate([dh * u[M:] * d_act, dh * act])
            else:
                du = dh * d_act
            g[f"{up_name}_kernel"][e] += np.outer(xt, du)
            g[f"{up_name}_bias"][e] += du
        d_logits = gates * (d_gates - np.sum(gates * d_gates))
        g["kernel"][:, experts] += np.outer(xt, d_logits)
    return g


def gradients(layer, x, mask, target):
    """The backend's d sum(y * target) / d weights, by variable name."""
    variables = layer.trainable_variables
    names = [v.name for v in variables]
    name = keras.backend.backend()
    target = keras.ops.convert_to_tensor(target)

    def objective(values):
        y, _ = layer.stateless_call(
            values, layer.non_trainable_variables, x, mask=mask, training=True
        )
        return keras.ops.sum(y * target)

    if name == "jax":
        import jax

        grads = jax.grad(objective)([v.value for v in variables])
    elif name == "torch":
        import torch

        values = [v.value.detach().requires_grad_(True) for v in variables]
        grads = torch.autograd.grad(objective(values), values)
    else:
        import tensorflow as tf

        values = [tf.convert_to_tensor(v.value) for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = objective(values)
        grads = tape.gradient(loss, values)
    return {n: to_numpy(g) for n, g in zip(names, grads)}


@contextlib.contextmanager
def undefined_memory_is_nan():
    """PyTorch fills the memory it leaves uninitialised (`torch.empty`, the
    rows `torch._grouped_mm` does not write) with NaN in deterministic mode:
    a read of such memory then always shows, instead of now and then."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled)


@pytest.mark.parametrize("layout", ["auto", "grouped"])
@pytest.mark.parametrize("fused", [False, True])
def test_masked_gradients_are_finite_and_match_numpy(fused, layout):
    """Masked tokens sort past the grouped matmul's last group, where its rows
    are undefined: they must reach no value and no gradient (the bias
    gradients were NaN/inf in 5-21% of PyTorch's draws). `"grouped"` runs
    the backend's grouped matmul (JAX's also on a CPU)."""
    experts = FeedForwardExperts(M, E)
    if fused:
        experts = FeedForwardExperts(M, E, gated=True, gate_up_layout="concatenated")
    layer = MoEFeedForward(
        experts=experts, router=TopKRouter(E, top_k=K, layout=layout)
    )
    layer.build((None, D))
    if layout == "grouped" and backend.fast_path("grouped_matmul") is None:
        assert keras.backend.backend() == "tensorflow"
        with pytest.raises(ValueError, match="`layout='grouped'` needs a backend"):
            layer(np.ones((N, D), "float32"))
        return
    rng = np.random.default_rng(int(fused))
    with undefined_memory_is_nan():
        for draw in range(DRAWS):
            for v in layer.trainable_variables:
                v.assign(rng.normal(size=v.shape).astype("float32") * 0.5)
            x = rng.normal(size=(N, D)).astype("float32")
            target = rng.normal(size=(N, D)).astype("float32")
            mask = np.ones(N, bool)
            mask[rng.choice(N, 4, replace=False)] = False
            weights = {v.name: to_numpy(v) for v in layer.trainable_variables}
            expected = reference_gradients(weights, x, mask, target, fused)
            got = gradients(layer, x, mask, target)
            assert sorted(got) == sorted(expected)
            for name, grad in got.items():
                assert np.isfinite(grad).all(), (draw, name)
                np.testing.assert_allclose(
                    grad, expected[name], rtol=1e-4, atol=1e-4, err_msg=name
                )
