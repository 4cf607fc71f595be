"""The sparse blocks one by one against KerasHub's: outputs, the returned
router logits (or scores, or dispatch weights), the auxiliary loss with each
family's mask, and the compute router under mixed precision (the router
values for both `router_dtype` settings: `test_router_values.py`)."""

import keras
import numpy as np
import pytest
from keras import ops
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4Router
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import (
    Qwen3_5MoeSparseMoeBlock,
)
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

from keras_moe.kerashub import _blocks
from tests.conftest import to_numpy
from tests.kerashub.families import FAMILIES

D, M, E = 16, 6, 4
BATCH, LENGTH = 4, 16


class Gemma4Holder(keras.layers.Layer):
    """A stand-in for Gemma 4's decoder block: its router and expert bank."""

    enable_moe_block = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.moe_router = Gemma4Router(E, 2, dtype=self.dtype_policy)
        self.moe_expert_bank = Gemma4MoEBlock(E, D, M, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.moe_router.build(input_shape)
        self.moe_expert_bank.build((None, D))


def make_block(family, dtype=None):
    """The family's MoE block, built, with random weights (the Gemma 4 block
    is a stand-in decoder holding its router and expert bank)."""
    kw = {"dtype": dtype}
    if family == "mixtral":
        block = MixtralSparseMoeBlock(D, M, E, top_k=2, router_aux_loss_coef=0.1, **kw)
    elif family == "qwen_moe":
        block = QwenSparseMoeBlock(
            D, M, 10, E, 2, False, router_aux_loss_coefficient=0.1, **kw
        )
    elif family == "qwen3_moe":
        block = Qwen3SparseMoeBlock(
            D, M, E, 3, True, router_aux_loss_coefficient=0.1, **kw
        )
    elif family == "qwen3_5_moe":
        block = Qwen3_5MoeSparseMoeBlock(
            D, M, 10, E, 2, router_aux_loss_coefficient=0.1, **kw
        )
    elif family == "gpt_oss":
        block = GptOssSparseMoeBlock(D, M, E, top_k=2, **kw)
    else:
        block = Gemma4Holder(**kw)
    block.build((None, None, D))
    layers = (
        [block.moe_router, block.moe_expert_bank] if family == "gemma4" else [block]
    )
    rng = np.random.default_rng(0)
    for layer in layers:
        for variable in layer.trainable_weights:
            noise = rng.normal(size=variable.shape) * 0.5
            base = to_numpy(variable) if len(variable.shape) < 2 else 0.0
            variable.assign((base + noise).astype("float32"))
    return block


def mask_of(family):
    """The mask the family's decoder hands its block: Mixtral's and Qwen3.5's
    padding mask, Qwen's and Qwen3's causal attention mask (None: no mask)."""
    padding = np.ones((BATCH, LENGTH), bool)
    padding[1, 10:] = False
    padding[3, 5:] = False
    if family in ("mixtral", "qwen3_5_moe"):
        return padding
    if family in ("qwen_moe", "qwen3_moe"):
        causal = np.tril(np.ones((LENGTH, LENGTH), bool))
        return causal[None] & padding[:, None, :]
    return None


def run(block, family, x, training=False):
    """`(outputs, routing)`: the block's outputs and what it returns besides
    (router logits, GPT-OSS's router scores, Gemma 4's dispatch weights)."""
    if family == "gemma4":
        dispatch = block.moe_router(x)
        flat = ops.reshape(x, (-1, D))
        return block.moe_expert_bank(flat, dispatch), dispatch
    if family == "gpt_oss":
        return block(x)
    return block(x, attention_mask=mask_of(family), training=training)


def losses(block, family):
    return [] if family in ("gpt_oss", "gemma4") else list(block.losses)


def sparsify_block(block, router_dtype="compute"):
    owner = _blocks.SPARSE_CLASSES.get(type(block), type(block))
    key = _blocks.Gemma4TextDecoderBlock if owner is Gemma4Holder else owner
    _blocks.SPARSIFIERS[key](block, router_dtype)
    return block


def inputs(seed=1):
    return np.random.default_rng(seed).normal(size=(BATCH, LENGTH, D)).astype("float32")


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_outputs_routing_and_loss_match_kerashub(family):
    block = make_block(family)
    x = inputs()
    dense, dense_routing = run(block, family, x, training=True)
    dense_losses = [to_numpy(v) for v in losses(block, family)]
    sparsify_block(block)
    sparse, sparse_routing = run(block, family, x, training=True)
    scale = np.abs(to_numpy(dense)).max()
    np.testing.assert_allclose(
        to_numpy(sparse), to_numpy(dense), rtol=1e-5, atol=1e-6 * scale
    )
    # The router is KerasHub's own in the compute dtype: the same values.
    np.testing.assert_array_equal(to_numpy(sparse_routing), to_numpy(dense_routing))
    sparse_losses = [to_numpy(v) for v in losses(block, family)]
    assert (
        len(sparse_losses)
        == len(dense_losses)
        == (0 if family in ("gpt_oss", "gemma4") else 1)
    )
    np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-6)


def chosen(routing, family, top_k):
    """The experts a token picked, as a set per token, from what the block
    returns (the logits' top-k, or the non-zero scores)."""
    routing = to_numpy(ops.cast(routing, "float32"))
    if family in ("gpt_oss", "gemma4"):
        return routing != 0
    probs = to_numpy(ops.softmax(ops.convert_to_tensor(routing)))
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    picked = np.zeros(routing.shape, bool)
    np.put_along_axis(picked, top, True, axis=-1)
    return picked


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_router_picks_kerashub_experts(family):
    block = make_block(family, dtype="mixed_bfloat16")
    x = inputs(2)
    dense, dense_routing = run(block, family, x)
    sparsify_block(block, "compute")
    sparse, sparse_routing = run(block, family, x)
    assert keras.backend.standardize_dtype(sparse_routing.dtype) == "bfloat16"
    # The same router computation in bfloat16: bit for bit, so the same
    # experts for every token.
    np.testing.assert_array_equal(
        to_numpy(ops.cast(sparse_routing, "float32")),
        to_numpy(ops.cast(dense_routing, "float32")),
    )
    dense, sparse = (to_numpy(ops.cast(y, "float32")) for y in (dense, sparse))
    np.testing.assert_allclose(
        sparse, dense, rtol=0.05, atol=0.05 * np.abs(dense).max()
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_reaches_the_dispatch(family, training, monkeypatch):
    """A training call of a sparsified backbone plans its dispatch as one
    (the blocks layout, without the capacity tiers' `ops.cond`), an
    inference call as the capacity tiers; GPT-OSS's block and Gemma 4's
    decoder pass no `training` to their banks, which Keras fills from the
    outer call. Observed through the plans `plan_dispatch` returns."""
    from keras_moe.kerashub import sparsify
    from keras_moe.routing import dispatch
    from tests.kerashub import families

    planned = []

    def plan_dispatch(*args, plan=dispatch.plan_dispatch, **kwargs):
        result = plan(*args, **kwargs)
        planned.append((kwargs["training"], type(result[0]).__name__))
        return result

    monkeypatch.setattr(dispatch, "plan_dispatch", plan_dispatch)
    backbone = sparsify(families.backbone(family))
    backbone(families.inputs(family), training=training)
    assert planned
    assert {seen for seen, _ in planned} == {training}
    matmul, preferred = dispatch.grouped_matmul()
    if matmul is not None and preferred:  # PyTorch: the sorted rows
        expected = "RowLayout"
    else:
        expected = "BlockLayout" if training else "TieredPlan"
    assert {plan for _, plan in planned} == {expected}


def test_mixtral_router_jitter_in_training():
    """KerasHub 0.32's Mixtral block fails with jitter (`ops.random` does not
    exist); the sparse one jitters in training only."""
    block = make_block("mixtral")
    block.router_jitter_noise = 0.2
    x = inputs()
    with pytest.raises(AttributeError):
        run(block, "mixtral", x, training=True)
    sparsify_block(block)
    plain, logits = run(block, "mixtral", x, training=False)
    jittered, jittered_logits = run(block, "mixtral", x, training=True)
    assert not np.allclose(to_numpy(jittered_logits), to_numpy(logits))
    assert np.isfinite(to_numpy(jittered)).all()
    np.testing.assert_allclose(
        to_numpy(run(block, "mixtral", x, training=False)[0]), to_numpy(plain)
    )
