"""The sparsified blocks' router values, family by family, for both
`router_dtype` settings: the router logits, the top-k weights and the
outputs, compared with KerasHub's block in float32 (where `sparsify`
promises the same model) and under `"mixed_bfloat16"` with a NumPy reference
of the family's router (Gemma 4: RMS norm x `1/sqrt(d)` x `per_dim_scale` x
kernel; GPT-OSS: `x . kernel + bias`; the others `x . kernel`) and of its
gating (softmax, top-k, renormalisation in the family's order).

The values that a router could drop without notice are set far from their
neutral values: GPT-OSS's router bias (magnitudes 1 to 2, signs mixed, so
that it moves logits apart) and Gemma 4's `per_dim_scale` (1.5 to 2.5)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import routing
from tests.conftest import to_numpy
from tests.kerashub.families import FAMILIES
from tests.kerashub.test_blocks import BATCH
from tests.kerashub.test_blocks import LENGTH
from tests.kerashub.test_blocks import D
from tests.kerashub.test_blocks import E
from tests.kerashub.test_blocks import chosen
from tests.kerashub.test_blocks import inputs
from tests.kerashub.test_blocks import losses
from tests.kerashub.test_blocks import make_block
from tests.kerashub.test_blocks import run
from tests.kerashub.test_blocks import sparsify_block
from tests.kerashub.test_quantized_router import router_of

ROUTER_DTYPES = ["compute", "float32"]
TOP_K = {"qwen3_moe": 3}
# Qwen1.5/2-MoE's block here keeps the softmax values of its top-k
# (`norm_top_k_prob=False`); the others renormalise them.
NOT_RENORMALISED = ("qwen_moe",)
# Float32 arithmetic: a dot product of 16 terms is within 16 * 2**-24 of the
# sum of its terms' magnitudes (Higham 3.1); 2**-16 leaves room for the norm.
# bfloat16 (the compute router): inputs, kernel and result each rounded to 8
# bits, and possibly bfloat16 sums: 2**-5 of the terms' magnitudes.
LOGITS_TOL = {"float32": 2.0**-16, "bfloat16": 2.0**-5}
WEIGHTS_TOL = {"float32": 1e-6, "bfloat16": 2.0**-6}


def block_with_values(family, dtype=None):
    """`make_block` with GPT-OSS's router bias and Gemma 4's per-dimension
    scale far from their neutral values."""
    block = make_block(family, dtype)
    rng = np.random.default_rng(7)
    if family == "gpt_oss":
        signs = np.array([1.0, -1.0, -1.0, 1.0])
        bias = signs * rng.uniform(1.0, 2.0, E)
        block.router.router_dense.bias.assign(bias.astype("float32"))
    if family == "gemma4":
        scale = rng.uniform(1.5, 2.5, D).astype("float32")
        block.moe_router.per_dim_scale.assign(scale)
    return block


def np_router_logits(block, family, tokens, dtype):
    """The family's router logits in float64 NumPy from `tokens` (the
    router's inputs as it sees them) and its weights, rounded to bfloat16 when
    the router computes in bfloat16; also the magnitude `|a| . |kernel| +
    |bias|` of the terms each logit sums (`a`: the projection's input)."""

    def weight(variable):
        value = to_numpy(variable)
        if dtype == "bfloat16":
            value = value.astype("bfloat16")
        return value.astype("float64")

    dense = router_of(block, family)
    kernel = weight(dense.kernel)
    if family == "gemma4":
        router = block.moe_router
        variance = np.mean(tokens**2, axis=-1, keepdims=True)
        tokens = tokens / np.sqrt(variance + router.layer_norm_epsilon)
        tokens = tokens / np.sqrt(D) * weight(router.per_dim_scale)
    logits = tokens @ kernel
    magnitude = np.abs(tokens) @ np.abs(kernel)
    if dense.bias is not None:
        logits = logits + weight(dense.bias)
        magnitude = magnitude + np.abs(weight(dense.bias))
    return logits, magnitude


def np_softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def assert_gating(weights, logits, family, tol):
    """`weights` (tokens, experts), zero off each token's chosen experts, are
    the family's gating of `logits`: its top-k experts (up to ties within
    `tol`) with the softmax renormalised over them (or not)."""
    weights, logits = np.asarray(weights, "float64"), np.asarray(logits, "float64")
    top_k = TOP_K.get(family, 2)
    chosen = weights != 0
    np.testing.assert_array_equal(chosen.sum(axis=-1), top_k)
    # GPT-OSS takes the top-k of the logits, the others of the probabilities.
    probs = np_softmax(logits)
    score = logits if family == "gpt_oss" else probs
    scale = 1.0 if family != "gpt_oss" else np.abs(logits).max()
    lowest_chosen = np.where(chosen, score, np.inf).min(axis=-1)
    highest_other = np.where(chosen, -np.inf, score).max(axis=-1)
    assert (lowest_chosen >= highest_other - tol * scale).all()
    expected = np.where(chosen, probs, 0.0)
    if family not in NOT_RENORMALISED:
        expected = expected / expected.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(weights, expected, rtol=0, atol=tol)


def dense_weights(weights, experts):
    """`(tokens, top_k)` weights of `experts` as `(tokens, experts)`."""
    weights, experts = to_numpy(ops.cast(weights, "float32")), to_numpy(experts)
    full = np.zeros((weights.shape[0], E), "float32")
    np.put_along_axis(full, experts, weights, axis=-1)
    return full


def observe(block, family, x, monkeypatch, training=False):
    """Runs the sparsified block; returns its outputs, what it returns besides
    (logits, scores or dispatch weights), and the router logits and
    `(tokens, experts)` weights as the block computed them (None where
    KerasHub's own router code runs: Gemma 4's `"compute"` router, whose
    returned dispatch weights are the weights)."""
    seen = {}

    def spy(logits, top_k, **kwargs):
        weights, experts, probs = top_k_gates(logits, top_k, **kwargs)
        seen["logits"], seen["weights"] = logits, dense_weights(weights, experts)
        return weights, experts, probs

    top_k_gates = routing.top_k_gates
    monkeypatch.setattr(routing, "top_k_gates", spy)
    outputs, returned = run(block, family, x, training=training)
    monkeypatch.setattr(routing, "top_k_gates", top_k_gates)
    weights = seen.get("weights")
    if family == "gemma4" and weights is None:
        weights = to_numpy(ops.cast(returned, "float32"))
    return outputs, returned, seen.get("logits"), weights


@pytest.mark.parametrize("router_dtype", ROUTER_DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_router_values_match_kerashub(family, router_dtype, monkeypatch):
    """Float32 policy: KerasHub's block and the sparsified one compute the
    same router logits, weights, outputs and auxiliary loss, and the logits
    are the family's router formula."""
    x = inputs(4)
    block = block_with_values(family)
    expected_outputs, expected_returned = run(block, family, x, training=True)
    expected_losses = [to_numpy(v) for v in losses(block, family)]
    sparsify_block(block, router_dtype)
    outputs, returned, logits, weights = observe(
        block, family, x, monkeypatch, training=True
    )

    expected_outputs = to_numpy(expected_outputs)
    scale = np.abs(expected_outputs).max()
    np.testing.assert_allclose(
        to_numpy(outputs), expected_outputs, rtol=1e-5, atol=1e-6 * scale
    )
    # Mixtral's and Qwen's router logits, GPT-OSS's router scores, Gemma 4's
    # dispatch weights: what the block returns, as KerasHub's.
    np.testing.assert_allclose(
        to_numpy(returned), to_numpy(expected_returned), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        [to_numpy(v) for v in losses(block, family)], expected_losses, rtol=1e-5
    )
    tokens = x.reshape(-1, D).astype("float64")
    reference, magnitude = np_router_logits(block, family, tokens, "float32")
    if logits is not None:
        assert np.all(
            np.abs(to_numpy(logits) - reference) <= LOGITS_TOL["float32"] * magnitude
        )
    assert_gating(weights, reference, family, WEIGHTS_TOL["float32"])


@pytest.mark.parametrize("router_dtype", ROUTER_DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_router_values_match_numpy(family, router_dtype, monkeypatch):
    """`"mixed_bfloat16"`: the router logits and weights against the NumPy
    reference, in float32 (`"float32"`: float32 weights and arithmetic on the
    bfloat16 inputs) or in bfloat16 (`"compute"`); the outputs (bfloat16) as
    KerasHub's bfloat16 block's on the tokens that chose the same experts."""
    policy = "mixed_bfloat16"
    x = inputs(5)
    kerashub_outputs, kerashub_returned = run(
        block_with_values(family, policy), family, x
    )
    block = sparsify_block(block_with_values(family, policy), router_dtype)
    # A training call with the float32 router, whose auxiliary losses are
    # float32 (KerasHub's own loss fails on TensorFlow with bfloat16 logits).
    training = router_dtype == "float32"
    outputs, returned, logits, weights = observe(
        block, family, x, monkeypatch, training=training
    )

    dtype = "float32" if router_dtype == "float32" else "bfloat16"
    assert keras.backend.standardize_dtype(returned.dtype) == dtype
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    for loss in losses(block, family) if training else []:
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    tokens = x.reshape(-1, D).astype("bfloat16").astype("float64")
    reference, magnitude = np_router_logits(block, family, tokens, dtype)
    if logits is not None:
        assert keras.backend.standardize_dtype(logits.dtype) == dtype
        logits = to_numpy(ops.cast(logits, "float32"))
        assert np.all(np.abs(logits - reference) <= LOGITS_TOL[dtype] * magnitude)
        # The gating of the block's own logits: no tie to forgive in float32.
        assert_gating(weights, logits, family, WEIGHTS_TOL[dtype])
    else:  # Gemma 4's "compute" router: KerasHub's own code.
        assert_gating(weights, reference, family, 4 * WEIGHTS_TOL[dtype])

    # The outputs: KerasHub's bfloat16 block's where the same experts run:
    # every token with the compute router (KerasHub's own, bit for bit:
    # `test_blocks.py`), most with the float32 one.
    same = np.ones(BATCH * LENGTH, bool)
    if router_dtype == "float32":
        kerashub_chosen = chosen(kerashub_returned, family, TOP_K.get(family, 2))
        same = (kerashub_chosen == (weights != 0)).all(axis=-1)
        assert same.mean() >= 0.75
    actual = to_numpy(ops.cast(outputs, "float32")).reshape(-1, D)[same]
    expected = to_numpy(ops.cast(kerashub_outputs, "float32")).reshape(-1, D)[same]
    np.testing.assert_allclose(
        actual, expected, rtol=0.05, atol=0.05 * np.abs(expected).max()
    )
