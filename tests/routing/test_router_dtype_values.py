"""The values of the router's logits and weights in each `router_dtype`.

`router_dtype="compute"` computes the logits in the policy's compute dtype
(bfloat16 or float16): the product of the inputs and of the kernel, both
rounded to it. `router_dtype="float32"` computes them from the float32 kernel.
A dtype check cannot tell the two apart once a result is cast, so the inputs
here are chosen so that they round differently: a kernel column
`(1 + eta, -1 + eta, 1 + eta, -1 + eta)` with `eta` below half a unit in the
last place of the compute dtype is `(1, -1, 1, -1)` there, and a token
`(a, a, b, b)` gets the logit `0` from it in the compute dtype but
`2 * eta * (a + b)` in float32, which for most tokens here puts that expert
above another whose logit `a * u / 2` both compute exactly. Every product and
sum is exact in both dtypes, so each logit equals its reference exactly
whatever the backend's order of summation.
"""

import keras
import numpy as np
import pytest

from keras_moe import MoEFeedForward
from keras_moe.layers import FeedForwardExperts
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy

POLICIES = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
# The compute dtype's unit in the last place at 1.
ULP = {"bfloat16": 2.0**-7, "float16": 2.0**-10}
N_EXPERTS, D = 4, 4


def router_case(compute_dtype):
    """`(x, kernel)`: tokens exact in the compute dtype and a float32 kernel
    whose first column the compute dtype rounds (module docstring)."""
    u = ULP[compute_dtype]
    eta = 3 * u / 16  # below u / 4, half a unit below 1
    s = 1 / (2 * u)
    kernel = np.zeros((D, N_EXPERTS))
    kernel[:, 0] = [1 + eta, -1 + eta, 1 + eta, -1 + eta]
    kernel[0, 1] = u / 2
    kernel[2, 2] = -u
    kernel[1, 3] = -3 * u
    # (a, b): float32 puts expert 0 above expert 1 when 3 b > a.
    pairs = [(s, s), (2 * s, s / 2), (s, 2 * s), (-s, -s), (s / 2, 4 * s)]
    x = np.array([[a, a, b, b] for a, b in pairs])
    return x.astype("float32"), kernel.astype("float32")


def np_logits(x, kernel, compute_dtype):
    """Float64 references of the logits in float32 (the float32 kernel) and in
    the compute dtype (the kernel rounded to it): `(float32, compute)`."""
    rounded = keras.ops.convert_to_numpy(
        keras.ops.cast(keras.ops.cast(kernel, compute_dtype), "float32")
    )
    x = x.astype("float64")
    return x @ kernel.astype("float64"), x @ rounded.astype("float64")


def np_top_k(logits, k):
    """Experts by decreasing logit, weights the softmax over the chosen."""
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    chosen = np.take_along_axis(logits, experts, axis=-1)
    weights = np.exp(chosen - chosen.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True), experts


def weight_tolerance(router_dtype, compute_dtype):
    # A softmax of values near 1/2 rounded to the compute dtype, with a few
    # roundings on the way (bfloat16: 2**-9 at 1/2; float16: 2**-12).
    return 1e-6 if router_dtype == "float32" else 8 * ULP[compute_dtype] / 4


def other(router_dtype):
    return "compute" if router_dtype == "float32" else "float32"


def check_construction(refs, tolerance):
    """The two references differ in every token's logits, in some token's
    chosen experts and in some token's weights by more than the tolerance."""
    assert (refs["float32"][:, 0] != refs["compute"][:, 0]).all()
    weights = {name: np_top_k(logits, 2) for name, logits in refs.items()}
    assert (weights["float32"][1] != weights["compute"][1]).any(axis=-1).sum() >= 2
    assert np.abs(weights["float32"][0] - weights["compute"][0]).max() > 4 * tolerance


@pytest.mark.parametrize("router_dtype", ["compute", "float32"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_top_k_router_logits_and_weights(policy, router_dtype):
    compute_dtype = POLICIES[policy]
    x, kernel = router_case(compute_dtype)
    refs = dict(zip(("float32", "compute"), np_logits(x, kernel, compute_dtype)))
    tolerance = weight_tolerance(router_dtype, compute_dtype)
    check_construction(refs, tolerance)
    router = TopKRouter(N_EXPERTS, top_k=2, router_dtype=router_dtype, dtype=policy)
    router.build((None, D))
    router.kernel.assign(kernel)
    dtype = compute_dtype if router_dtype == "compute" else "float32"

    logits = router.logits(x)
    assert keras.backend.standardize_dtype(logits.dtype) == dtype
    logits = to_numpy(logits).astype("float64")
    np.testing.assert_array_equal(logits, refs[router_dtype])
    assert (logits != refs[other(router_dtype)]).any(axis=-1).all()

    weights, experts = router(x)
    assert keras.backend.standardize_dtype(weights.dtype) == dtype
    ref_weights, ref_experts = np_top_k(refs[router_dtype], 2)
    np.testing.assert_array_equal(to_numpy(experts), ref_experts)
    np.testing.assert_allclose(
        to_numpy(weights).astype("float64"), ref_weights, rtol=0, atol=tolerance
    )


def np_relu_experts(x, up, down, experts, compute_dtype):
    """Top-1 mixture of `relu(x . up_e) . down_e` with the expert kernels
    rounded to the compute dtype (weight 1)."""
    up, down = (
        keras.ops.convert_to_numpy(
            keras.ops.cast(keras.ops.cast(w, compute_dtype), "float32")
        ).astype("float64")
        for w in (up, down)
    )
    hidden = np.maximum(np.einsum("nd,ndm->nm", x, up[experts]), 0.0)
    return np.einsum("nm,nmd->nd", hidden, down[experts])


@pytest.mark.parametrize("router_dtype", ["compute", "float32"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_moe_feed_forward_routes_in_its_router_dtype(policy, router_dtype):
    """`MoEFeedForward` (top-1) sends each token to the expert of its
    router_dtype's logits: experts of opposite signs make the other choice
    far off."""
    compute_dtype = POLICIES[policy]
    x, kernel = router_case(compute_dtype)
    refs = dict(zip(("float32", "compute"), np_logits(x, kernel, compute_dtype)))
    experts = FeedForwardExperts(
        8, N_EXPERTS, activation="relu", gated=False, use_bias=False, dtype=policy
    )
    router = TopKRouter(N_EXPERTS, top_k=1, router_dtype=router_dtype, dtype=policy)
    layer = MoEFeedForward(experts=experts, router=router, dtype=policy)
    layer.build((None, D))
    layer.router.kernel.assign(kernel)
    rng = np.random.default_rng(0)
    # The tokens' features are up to 4 / u: the kernels bring them to ~1.
    up = rng.uniform(0.0, 1.0, size=(N_EXPERTS, D, 8)) * ULP[compute_dtype] / 2
    down = rng.uniform(0.5, 1.0, size=(N_EXPERTS, 8, D))
    down[1::2] *= -1.0
    layer.experts.up_kernel.assign(up.astype("float32"))
    layer.experts.down_kernel.assign(down.astype("float32"))

    logits = to_numpy(layer.router.logits(x)).astype("float64")
    np.testing.assert_array_equal(logits, refs[router_dtype])
    outputs = {
        name: np_relu_experts(x, up, down, logits.argmax(-1), compute_dtype)
        for name, logits in refs.items()
    }
    out = to_numpy(layer(x)).astype("float64")
    scale = np.abs(outputs[router_dtype]).max()
    tolerance = 4 * ULP[compute_dtype] * scale
    np.testing.assert_allclose(out, outputs[router_dtype], rtol=0, atol=tolerance)
    # The other router_dtype's choice is off by far more.
    gap = np.abs(outputs[router_dtype] - outputs[other(router_dtype)]).max()
    assert gap > 0.5 * scale
