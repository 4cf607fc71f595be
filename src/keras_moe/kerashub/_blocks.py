"""KerasHub's MoE blocks and their sparse versions: every KerasHub internal here.

KerasHub exports its backbones and tasks, not their decoder layers: the MoE
blocks, their expert banks and the loss functions are imported from
`keras_hub.src`, and their weights are reached by their private attribute
names. Both are what keras-hub 0.32 has (`kerashub.sparsify` refuses other
versions); nothing else in keras-moe touches them.

A block is sparsified in place by giving the object a subclass of its own
class (`layer.__class__ = Sparse...`) whose `call` routes each token to its
top-k experts only (`keras_moe.routing.sparse_mixture`) and runs them with
keras-moe's experts (`BaseFeedForwardExperts`, `MoEFeedForward`'s) on the
block's own variables. The object keeps its attributes, sublayers, variables
and their paths, so saving, loading, checkpoints and KerasHub's own code
(which tests `isinstance` of the block classes) see the same layer; its expert bank becomes a subclass too, which
declares its expert weights to `keras_moe.expert_parallel_layout_map`. The
subclasses are not registered for serialisation: KerasHub builds these blocks
from the decoder's arguments, never from a saved config.
"""

import keras
from keras import ops
from keras.src.backend.common import global_state
from keras_hub.src.models.gemma4.gemma4_decoder_block import Gemma4TextDecoderBlock
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4Router
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssExperts
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssSparseMoeBlock
from keras_hub.src.models.mixtral import mixtral_decoder
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralMoeExperts
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
from keras_hub.src.models.qwen3_5_moe import qwen3_5_moe_decoder
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeExperts
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import (
    Qwen3_5MoeSparseMoeBlock,
)
from keras_hub.src.models.qwen3_moe import qwen3_moe_decoder
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3MoeExperts
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3SparseMoeBlock
from keras_hub.src.models.qwen_moe import qwen_moe_decoder
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenMoeExperts
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock

from keras_moe import routing
from keras_moe.kerashub._float32_dense import check_float32_dense
from keras_moe.kerashub._float32_dense import float32_dense
from keras_moe.kerashub._float32_dense import full_precision
from keras_moe.layers.base_feed_forward import BaseFeedForwardExperts


class SparseState:
    """What a sparsified block holds besides KerasHub's state: no variable.

    An attribute of the block (`_keras_moe`) that is neither a layer nor a
    variable, so Keras does not track it and saving does not visit it.

    Args:
        experts: A `BaseFeedForwardExperts` on the block's expert variables
            (`bind_experts`), not tracked by the model.
        router_dtype: `"compute"` or `"float32"`.
        top_k: Experts per token (Gemma 4's expert bank does not know it).
        router: The block's router `Dense`; with `"float32"` checked now
            and at every call (it may be quantized later).
    """

    def __init__(self, experts, router_dtype, top_k, router):
        if router_dtype == "float32":
            check_float32_dense(router)
        self.experts = experts
        self.router = router
        self.router_dtype = router_dtype
        self.top_k = top_k

    def logits(self, dense, tokens):
        """The router logits: KerasHub's router `Dense` itself in the compute
        dtype, or what it computes (quantized, LoRA) in float32."""
        if self.router_dtype == "compute":
            return dense(tokens)
        return float32_dense(dense, tokens)

    def mixture(self, tokens, weights, experts, training=None):
        """`sum_j w[t, j] * expert_{e[t, j]}(x[t])`, each token through its
        own experts only (dropless: every token's experts run; `training`
        picks the layout, see `sparse_mixture`)."""
        if training is None:
            # A block whose `call` takes no `training` (Gemma 4's bank):
            # Keras keeps the outer call's value in its call context.
            context = global_state.get_global_attribute("current_call_ctx")
            training = context.get_value("training") if context else None
        outputs, _, _ = routing.sparse_mixture(
            tokens,
            experts,
            weights,
            self.experts.n_experts,
            self.experts.run_experts,
            training=training,
        )
        return outputs


# Every weight attribute of keras-moe's experts.
_EXPERT_WEIGHTS = (
    "expert_up_kernel",
    "expert_gate_kernel",
    "expert_gate_up_kernel",
    "expert_down_kernel",
    "expert_up_bias",
    "expert_gate_bias",
    "expert_gate_up_bias",
    "expert_down_bias",
    "expert_scale",
)


def bind_experts(block, intermediate_dim, n_experts, weights, **options):
    """Gated experts whose weights are the given variables (no copy).

    They are not built: their weight attributes are set to the given
    variables (the others to None), and only `run_experts` is called.
    """
    experts = BaseFeedForwardExperts(
        intermediate_dim,
        n_experts,
        gated=True,
        dtype=block.dtype_policy,
        name=f"{block.name}_keras_moe_experts",
        **options,
    )
    for name in _EXPERT_WEIGHTS:
        setattr(experts, name, weights.get(name))
    experts.built = True
    return experts


def _swap(layer, cls, state=None):
    layer.__class__ = cls
    if state is not None:
        layer._keras_moe = state


class _ExpertBank:
    """An expert bank that declares its `_expert_weights` (experts on axis 0)."""

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return dict.fromkeys(self._expert_weights, 0)


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
        its top-k experts (by the `router` Dense) plus `shared_expert`; in
        training, KerasHub's `loss` times `loss_coefficient`, and jitter."""
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
        out = state.mixture(tokens, weights, experts, training)
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


class SparseMixtralMoeExperts(_ExpertBank, MixtralMoeExperts):
    """`MixtralMoeExperts` that declares its expert weights."""

    _expert_weights = (
        "expert_feedforward_gate_dense",
        "expert_feedforward_intermediate_dense",
        "expert_feedforward_output_dense",
    )


class SparseMixtralSparseMoeBlock(_SparseBlock, MixtralSparseMoeBlock):
    """`MixtralSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states, attention_mask=None, training=False):
        return self._sparse_call(
            hidden_states,
            self._sparse_feedforward_gate_dense,
            attention_mask,
            training,
            loss=mixtral_decoder.compute_load_balancing_loss,
            loss_coefficient=self.router_aux_loss_coef,
            jitter_noise=self.router_jitter_noise,
        )[:2]


def _sparsify_mixtral(block, router_dtype):
    bank = block.expert_bank
    experts = bind_experts(
        block,
        bank.intermediate_dim,
        block.num_experts,
        {
            "expert_gate_kernel": bank._expert_feedforward_gate_dense,
            "expert_up_kernel": bank._expert_feedforward_intermediate_dense,
            "expert_down_kernel": bank._expert_feedforward_output_dense,
        },
        activation=bank.activation,
        use_bias=False,
        activation_dtype="float32",
    )
    _swap(bank, SparseMixtralMoeExperts)
    state = SparseState(
        experts, router_dtype, None, block._sparse_feedforward_gate_dense
    )
    _swap(block, SparseMixtralSparseMoeBlock, state)
    return [bank]


# Qwen1.5/2-MoE, Qwen3-MoE, Qwen3.5-MoE ---------------------------------------


class _SparseQwenExperts(_ExpertBank):
    """The expert weights of the Qwen families' banks."""

    _expert_weights = (
        "expert_feedforward_gate_dense",
        "expert_feedforward_output_dense",
    )


class SparseQwenMoeExperts(_SparseQwenExperts, QwenMoeExperts):
    """`QwenMoeExperts` that declares its expert weights."""


class SparseQwen3MoeExperts(_SparseQwenExperts, Qwen3MoeExperts):
    """`Qwen3MoeExperts` that declares its expert weights."""


class SparseQwen3_5MoeExperts(_SparseQwenExperts, Qwen3_5MoeExperts):
    """`Qwen3_5MoeExperts` that declares its expert weights."""


class _SparseQwenBlock(_SparseBlock):
    """The sparse Qwen blocks' `call`: `_balancing_loss` is the family's
    KerasHub loss function, `_shared_expert` None or a function of tokens."""

    _shared_expert = None

    def call(self, hidden_states, attention_mask=None, training=None):
        return self._sparse_call(
            hidden_states,
            self._keras_moe.router,
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


def _sparsify_qwen(sparse_block, sparse_bank, activation_dtype=None):
    """A Qwen family's sparsifier, given its classes and activation dtype."""

    def sparsify(block, router_dtype):
        bank = block.expert_bank
        experts = bind_experts(
            block,
            bank.intermediate_dim,
            block.num_experts,
            {
                "expert_gate_up_kernel": bank._expert_feedforward_gate_dense,
                "expert_down_kernel": bank._expert_feedforward_output_dense,
            },
            activation=getattr(bank, "activation", "silu"),
            use_bias=False,
            gate_up_layout="concatenated",
            activation_dtype=activation_dtype,
        )
        _swap(bank, sparse_bank)
        # Qwen3.5-MoE's router is `_router_gate`.
        router = getattr(block, "_sparse_feedforward_gate_dense", None)
        router = block._router_gate if router is None else router
        _swap(block, sparse_block, SparseState(experts, router_dtype, None, router))
        return [bank]

    return sparsify


# GPT-OSS ---------------------------------------------------------------------


class SparseGptOssExperts(_ExpertBank, GptOssExperts):
    """`GptOssExperts` that declares its expert weights."""

    _expert_weights = (
        "gate_up_proj",
        "gate_up_proj_bias",
        "down_proj",
        "down_proj_bias",
    )


class SparseGptOssSparseMoeBlock(_SparseBlock, GptOssSparseMoeBlock):
    """`GptOssSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states):
        # GPT-OSS's order: the softmax over the top-k logits.
        out, _, weights, experts = self._sparse_call(
            hidden_states, self.router.router_dense, softmax_before_top_k=False
        )
        # The block returns the `(tokens, experts)` router scores, as KerasHub's.
        return out, _dense_weights(weights, experts, self.num_experts, weights.dtype)


def _sparsify_gpt_oss(block, router_dtype):
    bank = block.experts
    experts = bind_experts(
        block,
        bank.intermediate_dim,
        block.num_experts,
        {
            "expert_gate_up_kernel": bank.gate_up_proj,
            "expert_gate_up_bias": bank.gate_up_proj_bias,
            "expert_down_kernel": bank.down_proj,
            "expert_down_bias": bank.down_proj_bias,
        },
        use_bias=True,
        gate_up_layout="interleaved",
        swiglu_limit=bank.limit,
        swiglu_alpha=bank.alpha,
    )
    _swap(bank, SparseGptOssExperts)
    state = SparseState(experts, router_dtype, None, block.router.router_dense)
    _swap(block, SparseGptOssSparseMoeBlock, state)
    return [bank]


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


class SparseGemma4MoEBlock(_ExpertBank, Gemma4MoEBlock):
    """`Gemma4MoEBlock` (the expert bank) that runs each token's top-k experts
    only, and declares its expert weights."""

    _expert_weights = ("gate_proj", "up_proj", "down_proj", "per_expert_scale")

    def call(self, x, dispatch_weights):
        state = self._keras_moe
        # The router's `(tokens, experts)` weights have `top_k` non-zero
        # entries per token: its top-k are the chosen experts and weights.
        weights, experts = ops.top_k(dispatch_weights, state.top_k)
        experts = ops.cast(experts, "int32")
        # Each expert's output scale, as a factor of its routing weight.
        scale = ops.cast(self.per_expert_scale, weights.dtype)
        weights = weights * ops.take(scale, experts, axis=0)
        return state.mixture(x, weights, experts)


def _sparsify_gemma4(decoder, router_dtype):
    if not decoder.enable_moe_block:
        return []
    bank = decoder.moe_expert_bank
    router = decoder.moe_router
    experts = bind_experts(
        bank,
        bank.expert_intermediate_dim,
        bank.num_experts,
        {
            "expert_gate_kernel": bank.gate_proj,
            "expert_up_kernel": bank.up_proj,
            "expert_down_kernel": bank.down_proj,
        },
        activation="gelu_tanh",
        use_bias=False,
        activation_dtype="float32",
    )
    state = SparseState(
        experts, router_dtype, router.num_experts_per_token, router.proj
    )
    _swap(router, SparseGemma4Router, state)
    _swap(bank, SparseGemma4MoEBlock, state)
    return [bank]


# KerasHub's layer classes that `sparsify` looks for -> the function that
# sparsifies one of them in place and returns the expert banks to shard.
SPARSIFIERS = {
    MixtralSparseMoeBlock: _sparsify_mixtral,
    QwenSparseMoeBlock: _sparsify_qwen(SparseQwenSparseMoeBlock, SparseQwenMoeExperts),
    Qwen3SparseMoeBlock: _sparsify_qwen(
        SparseQwen3SparseMoeBlock, SparseQwen3MoeExperts
    ),
    # Qwen3.5-MoE's experts compute SiLU in float32 (`Qwen3_5MoeExperts.call`).
    Qwen3_5MoeSparseMoeBlock: _sparsify_qwen(
        SparseQwen3_5MoeSparseMoeBlock, SparseQwen3_5MoeExperts, "float32"
    ),
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
