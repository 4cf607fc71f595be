"""KerasHub's MoE blocks and their sparse versions.

KerasHub exports its backbones and tasks, not their decoder layers: the MoE
blocks and the loss functions are imported from `keras_hub.src`, and the
blocks' routers and banks are reached by their private attribute names.
Both are what keras-hub 0.32 has (`kerashub.sparsify` refuses other
versions); nothing else in keras-moe touches the blocks (their expert banks:
`_experts.py`).

A block is sparsified in place, in two steps:

- Its KerasHub expert bank is replaced by a keras-moe `FeedForwardExperts`
  with KerasHub's variable names and order (`_experts.py`), which takes over
  the bank's values, attribute and place among the block's sublayers. The
  experts are thus a real keras-moe layer owning their variables, which
  the features for experts (expert-parallel layouts, quantization, LoRA)
  act on.
- The block object is given a subclass of its own class
  (`layer.__class__ = Sparse...`) whose `call` routes each token to its
  top-k experts with the block's own router and runs them through the new
  bank (`bank(tokens, gates=...)`, `keras_moe.routing.sparse_mixture`).
  Only the `call` changes: the block keeps its class's identity (KerasHub's
  code tests `isinstance` of its blocks), its config (KerasHub's decoders
  build their blocks from their own arguments, so a saved model reloads as
  KerasHub's), its router and shared-expert `Dense` layers (which Keras
  quantizes and adapts with LoRA itself) and their variables. Replacing the
  whole block instead would copy KerasHub's blocks, their arguments and
  their sublayers into keras-moe for no gain. Gemma 4's decoder block, whose
  `call` also runs attention, is not reclassed: its bank's replacement
  accepts the decoder's `moe_expert_bank(x, dispatch_weights)` call, and
  its router is reclassed only to route in float32 (`router_dtype`).

The sparse subclasses are not registered for serialisation: KerasHub builds
these blocks from the decoder's arguments, never from a saved config.
"""

import keras
from keras import ops
from keras_hub.src.models.gemma4.gemma4_decoder_block import Gemma4TextDecoderBlock
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4Router
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock
from keras_hub.src.models.mixtral import mixtral_decoder
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
from keras_hub.src.models.qwen3_5_moe import qwen3_5_moe_decoder
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import (
    Qwen3_5MoeSparseMoeBlock,
)
from keras_hub.src.models.qwen3_moe import qwen3_moe_decoder
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock
from keras_hub.src.models.qwen_moe import qwen_moe_decoder
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

from keras_moe import routing
from keras_moe.kerashub import _experts
from keras_moe.kerashub._float32_dense import check_float32_dense
from keras_moe.kerashub._float32_dense import float32_dense
from keras_moe.kerashub._float32_dense import full_precision


class SparseState:
    """What a sparsified block holds besides KerasHub's state: no variable.

    An attribute of the block (`_keras_moe`) that is neither a layer nor a
    variable, so Keras does not track it and saving does not visit it.

    Args:
        router_dtype: `"compute"` or `"float32"`.
        router: The block's router `Dense`; with `"float32"` checked now
            and at every call (it may be quantized later).
    """

    def __init__(self, router_dtype, router):
        if router_dtype == "float32":
            check_float32_dense(router)
        self.router = router
        self.router_dtype = router_dtype

    def logits(self, dense, tokens):
        """The router logits: KerasHub's router `Dense` itself in the compute
        dtype, or what it computes (quantized, LoRA) in float32."""
        if self.router_dtype == "compute":
            return dense(tokens)
        return float32_dense(dense, tokens)


def _swap(layer, cls, state):
    layer.__class__ = cls
    layer._keras_moe = state


def _replace_bank(holder, attribute, make_bank):
    """`[(holder, pairs)]`: `pairs` as `_experts.replace_bank` returns them,
    with the bank that `make_bank(old_bank)` makes; none when the bank is
    already keras-moe's (a model sparsified again)."""
    old = getattr(holder, attribute)
    if isinstance(old, _experts.KerasHubExperts):
        return [(holder, [])]
    return [(holder, _experts.replace_bank(holder, attribute, make_bank(old)))]


def _dense_weights(weights, experts, n_experts, dtype):
    """`(tokens, experts)` weights, as KerasHub's routers return them."""
    one_hot = ops.one_hot(experts, n_experts, dtype=dtype)
    return ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)


class _SparseBlock:
    """What the sparse blocks' `call`s share (`_keras_moe` holds the state)."""

    def _sparse_call(
        self,
        hidden_states,
        router,
        bank,
        attention_mask=None,
        training=None,
        loss=None,
        loss_coefficient=None,
        normalize_top_k=True,
        softmax_before_top_k=True,
        shared_expert=None,
        jitter_noise=0.0,
    ):
        """`(outputs, router_logits, weights, experts)`: each token through
        its top-k experts of `bank` (by the `router` Dense) plus
        `shared_expert`; in training, KerasHub's `loss` times
        `loss_coefficient`, and jitter."""
        state = self._keras_moe
        tokens = ops.reshape(hidden_states, (-1, self.hidden_dim))
        if training and jitter_noise > 0:
            # KerasHub's jitter (its block calls `ops.random`, which Keras
            # lacks, and fails), drawn with Keras's unseeded uniform.
            tokens = tokens * keras.random.uniform(
                shape=ops.shape(tokens),
                minval=1.0 - jitter_noise,
                maxval=1.0 + jitter_noise,
                dtype=tokens.dtype,
            )
        router_logits = state.logits(router, tokens)
        weights, experts, _ = routing.top_k_gates(
            router_logits,
            self.top_k,
            normalize_top_k=normalize_top_k,
            softmax_before_top_k=softmax_before_top_k,
        )
        # Without a `training` here (GPT-OSS's block), Keras gives the bank
        # the outer call's, unless one is passed, even None.
        context = {} if training is None else {"training": training}
        out = bank(tokens, gates=(weights, experts), **context)
        if shared_expert is not None:
            out = out + shared_expert(tokens)
        if training and loss is not None:
            aux_loss = loss(
                router_logits=router_logits,
                num_experts=self.num_experts,
                top_k=self.top_k,
                attention_mask=attention_mask,
            )
            self.add_loss(loss_coefficient * aux_loss)
        out = ops.reshape(out, ops.shape(hidden_states))
        return out, router_logits, weights, experts


# Mixtral ---------------------------------------------------------------------


class SparseMixtralSparseMoeBlock(_SparseBlock, MixtralSparseMoeBlock):
    """`MixtralSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states, attention_mask=None, training=False):
        return self._sparse_call(
            hidden_states,
            self._sparse_feedforward_gate_dense,
            self.expert_bank,
            attention_mask,
            training,
            loss=mixtral_decoder.compute_load_balancing_loss,
            loss_coefficient=self.router_aux_loss_coef,
            jitter_noise=self.router_jitter_noise,
        )[:2]


def _sparsify_mixtral(block, router_dtype):
    replaced = _replace_bank(block, "expert_bank", _experts.mixtral_experts)
    state = SparseState(router_dtype, block._sparse_feedforward_gate_dense)
    _swap(block, SparseMixtralSparseMoeBlock, state)
    return replaced


# Qwen1.5/2-MoE, Qwen3-MoE, Qwen3.5-MoE ---------------------------------------


class _SparseQwenBlock(_SparseBlock):
    """The sparse Qwen blocks' `call`: `_balancing_loss` is the family's
    KerasHub loss function, `_shared_expert` None or a function of tokens."""

    _shared_expert = None

    def call(self, hidden_states, attention_mask=None, training=None):
        return self._sparse_call(
            hidden_states,
            self._keras_moe.router,
            self.expert_bank,
            attention_mask,
            training,
            loss=self._balancing_loss,
            loss_coefficient=self.router_aux_loss_coefficient,
            normalize_top_k=getattr(self, "norm_top_k_prob", True),
            shared_expert=self._shared_expert,
        )[:2]


class SparseQwenSparseMoeBlock(_SparseQwenBlock, QwenSparseMoeBlock):
    """`QwenSparseMoeBlock` that runs each token's top-k experts only."""

    _balancing_loss = staticmethod(qwen_moe_decoder.compute_load_balancing_loss)

    def _shared_expert(self, tokens):
        shared = self.shared_expert_dense(tokens)
        shared *= ops.sigmoid(self.shared_expert_gate_dense(tokens))
        return shared


class SparseQwen3SparseMoeBlock(_SparseQwenBlock, Qwen3SparseMoeBlock):
    """`Qwen3SparseMoeBlock` that runs each token's top-k experts only."""

    _balancing_loss = staticmethod(qwen3_moe_decoder.compute_load_balancing_loss)


class SparseQwen3_5MoeSparseMoeBlock(_SparseQwenBlock, Qwen3_5MoeSparseMoeBlock):
    """`Qwen3_5MoeSparseMoeBlock` that runs each token's top-k experts only."""

    _balancing_loss = staticmethod(qwen3_5_moe_decoder.compute_load_balancing_loss)

    def _shared_expert(self, tokens):
        shared = self.shared_expert(tokens)
        return ops.sigmoid(self._shared_expert_gate(tokens)) * shared


def _sparsify_qwen(sparse_block, activation_dtype=None):
    """A Qwen family's sparsifier, given its class and activation dtype."""

    def make_bank(bank):
        return _experts.qwen_experts(bank, activation_dtype)

    def sparsify(block, router_dtype):
        replaced = _replace_bank(block, "expert_bank", make_bank)
        # Qwen3.5-MoE's router is `_router_gate`.
        router = getattr(block, "_sparse_feedforward_gate_dense", None)
        router = block._router_gate if router is None else router
        _swap(block, sparse_block, SparseState(router_dtype, router))
        return replaced

    return sparsify


# GPT-OSS ---------------------------------------------------------------------


class SparseGptOssSparseMoeBlock(_SparseBlock, GptOssSparseMoeBlock):
    """`GptOssSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states):
        # GPT-OSS's order: the softmax over the top-k logits.
        out, _, weights, experts = self._sparse_call(
            hidden_states,
            self.router.router_dense,
            self.experts,
            softmax_before_top_k=False,
        )
        # The block returns the `(tokens, experts)` router scores, as KerasHub's.
        return out, _dense_weights(weights, experts, self.num_experts, weights.dtype)


def _sparsify_gpt_oss(block, router_dtype):
    replaced = _replace_bank(block, "experts", _experts.gpt_oss_experts)
    state = SparseState(router_dtype, block.router.router_dense)
    _swap(block, SparseGptOssSparseMoeBlock, state)
    return replaced


# Gemma 4 ---------------------------------------------------------------------


class SparseGemma4Router(Gemma4Router):
    """`Gemma4Router` that can also route in float32 (`router_dtype`)."""

    def call(self, x):
        state = self._keras_moe
        if state.router_dtype == "compute":
            return super().call(x)
        tokens = ops.cast(ops.reshape(x, (-1, ops.shape(x)[-1])), "float32")
        # Gemma 4's router input, all in float32: RMSNorm without a scale,
        # `1 / sqrt(d)` and the learned per-dimension scale.
        variance = ops.mean(ops.square(tokens), axis=-1, keepdims=True)
        normed = tokens * ops.power(variance + self.layer_norm_epsilon, -0.5)
        normed = normed * self._scalar_root_size
        normed = normed * full_precision(self.per_dim_scale)
        router_logits = float32_dense(self.proj, normed)
        weights, experts, _ = routing.top_k_gates(
            router_logits,
            self.num_experts_per_token,
            normalize_top_k=True,
            softmax_before_top_k=True,
        )
        return _dense_weights(weights, experts, self.num_experts, "float32")


def _sparsify_gemma4(decoder, router_dtype):
    if not decoder.enable_moe_block:
        return []
    router = decoder.moe_router

    def make_bank(bank):
        # The decoder calls its bank with the router's dispatch weights.
        return _experts.gemma4_experts(bank, router.num_experts_per_token)

    replaced = _replace_bank(decoder, "moe_expert_bank", make_bank)
    _swap(router, SparseGemma4Router, SparseState(router_dtype, router.proj))
    return replaced


# KerasHub's layer classes that `sparsify` looks for -> the function that
# sparsifies one of them in place and returns `[(holder, pairs)]`, each
# bank it replaced (`_experts.replace_bank`).
SPARSIFIERS = {
    MixtralSparseMoeBlock: _sparsify_mixtral,
    QwenSparseMoeBlock: _sparsify_qwen(SparseQwenSparseMoeBlock),
    Qwen3SparseMoeBlock: _sparsify_qwen(SparseQwen3SparseMoeBlock),
    # Qwen3.5-MoE's experts compute SiLU in float32 (`Qwen3_5MoeExperts.call`).
    Qwen3_5MoeSparseMoeBlock: _sparsify_qwen(SparseQwen3_5MoeSparseMoeBlock, "float32"),
    GptOssSparseMoeBlock: _sparsify_gpt_oss,
    Gemma4TextDecoderBlock: _sparsify_gemma4,
}

# The sparse classes, each with the KerasHub class it stands in for: a model
# sparsified again (another `router_dtype`) is sparsified from them.
SPARSE_CLASSES = {
    SparseMixtralSparseMoeBlock: MixtralSparseMoeBlock,
    SparseQwenSparseMoeBlock: QwenSparseMoeBlock,
    SparseQwen3SparseMoeBlock: Qwen3SparseMoeBlock,
    SparseQwen3_5MoeSparseMoeBlock: Qwen3_5MoeSparseMoeBlock,
    SparseGptOssSparseMoeBlock: GptOssSparseMoeBlock,
}
