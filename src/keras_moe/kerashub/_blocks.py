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

from keras import ops
from keras.src.backend import AutocastScope
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
from keras_moe.layers.base_feed_forward import BaseFeedForwardExperts


def full_precision(variable):
    """A variable's own value, not cast to the compute dtype.

    Inside a mixed-precision layer's call, reading a variable casts it to the
    compute dtype (Keras's autocast); a float32 router needs its kernel as
    stored. Read inside the scope: on TensorFlow a converted Keras variable
    is read later, under the layer's autocast."""
    with AutocastScope(None):
        return variable.value


class SparseState:
    """What a sparsified block holds besides KerasHub's state: no variable.

    An attribute of the block (`_keras_moe`) that is neither a layer nor a
    variable, so Keras does not track it and saving does not visit it.

    Args:
        experts: A `BaseFeedForwardExperts` on the block's expert variables
            (`bind_experts`), not tracked by the model.
        router_dtype: `"compute"` or `"float32"`.
        top_k: Experts per token (Gemma 4's expert bank does not know it).
    """

    def __init__(self, experts, router_dtype, top_k):
        self.experts = experts
        self.router_dtype = router_dtype
        self.top_k = top_k

    def logits(self, dense, tokens):
        """The router logits: KerasHub's router `Dense` itself in the compute
        dtype, or its weights in float32."""
        if self.router_dtype == "compute":
            return dense(tokens)
        bias = None if dense.bias is None else full_precision(dense.bias)
        return routing.gate_logits(tokens, full_precision(dense.kernel), bias)

    def mixture(self, tokens, weights, experts):
        """`sum_j w[t, j] * expert_{e[t, j]}(x[t])`, each token through its
        own experts only (dropless: every token's experts run)."""
        outputs, _, _ = routing.sparse_mixture(
            tokens,
            experts,
            weights,
            self.experts.n_experts,
            self.experts.run_experts,
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


def _flat(hidden_states, hidden_dim):
    return ops.reshape(hidden_states, (-1, hidden_dim))


# Mixtral ---------------------------------------------------------------------


class SparseMixtralMoeExperts(MixtralMoeExperts):
    """`MixtralMoeExperts` that declares its expert weights."""

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return {
            "expert_feedforward_gate_dense": 0,
            "expert_feedforward_intermediate_dense": 0,
            "expert_feedforward_output_dense": 0,
        }


class SparseMixtralSparseMoeBlock(MixtralSparseMoeBlock):
    """`MixtralSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states, attention_mask=None, training=False):
        state = self._keras_moe
        tokens = _flat(hidden_states, self.hidden_dim)
        if training and self.router_jitter_noise > 0:
            # KerasHub's jitter, drawn as KerasHub draws it.
            tokens = tokens * ops.random.uniform(
                shape=ops.shape(tokens),
                minval=1.0 - self.router_jitter_noise,
                maxval=1.0 + self.router_jitter_noise,
                dtype=tokens.dtype,
            )
        router_logits = state.logits(self._sparse_feedforward_gate_dense, tokens)
        weights, experts, _ = routing.top_k_gates(
            router_logits, self.top_k, normalize_top_k=True, softmax_before_top_k=True
        )
        out = state.mixture(tokens, weights, experts)
        if training:
            aux_loss = mixtral_decoder.compute_load_balancing_loss(
                router_logits=router_logits,
                num_experts=self.num_experts,
                top_k=self.top_k,
                attention_mask=attention_mask,
            )
            self.add_loss(self.router_aux_loss_coef * aux_loss)
        return ops.reshape(out, ops.shape(hidden_states)), router_logits


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
    _swap(block, SparseMixtralSparseMoeBlock, SparseState(experts, router_dtype, None))
    return [bank]


# Qwen1.5/2-MoE, Qwen3-MoE, Qwen3.5-MoE ---------------------------------------


def _qwen_expert_axes():
    return {"expert_feedforward_gate_dense": 0, "expert_feedforward_output_dense": 0}


class SparseQwenMoeExperts(QwenMoeExperts):
    """`QwenMoeExperts` that declares its expert weights."""

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return _qwen_expert_axes()


class SparseQwen3MoeExperts(Qwen3MoeExperts):
    """`Qwen3MoeExperts` that declares its expert weights."""

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return _qwen_expert_axes()


class SparseQwen3_5MoeExperts(Qwen3_5MoeExperts):
    """`Qwen3_5MoeExperts` that declares its expert weights."""

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return _qwen_expert_axes()


def _qwen_routed(block, tokens, normalize_top_k):
    """The routed experts' output and the router logits of a Qwen block."""
    state = block._keras_moe
    dense = getattr(block, "_sparse_feedforward_gate_dense", None)
    if dense is None:  # Qwen3.5-MoE
        dense = block._router_gate
    router_logits = state.logits(dense, tokens)
    weights, experts, _ = routing.top_k_gates(
        router_logits,
        block.top_k,
        normalize_top_k=normalize_top_k,
        softmax_before_top_k=True,
    )
    return state.mixture(tokens, weights, experts), router_logits


class SparseQwenSparseMoeBlock(QwenSparseMoeBlock):
    """`QwenSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states, attention_mask=None, training=None):
        tokens = _flat(hidden_states, self.hidden_dim)
        routed, router_logits = _qwen_routed(self, tokens, self.norm_top_k_prob)
        shared = self.shared_expert_dense(tokens)
        shared *= ops.sigmoid(self.shared_expert_gate_dense(tokens))
        out = routed + shared
        if training:
            aux_loss = qwen_moe_decoder.compute_load_balancing_loss(
                router_logits=router_logits,
                num_experts=self.num_experts,
                top_k=self.top_k,
                attention_mask=attention_mask,
            )
            self.add_loss(self.router_aux_loss_coefficient * aux_loss)
        return ops.reshape(out, ops.shape(hidden_states)), router_logits


class SparseQwen3SparseMoeBlock(Qwen3SparseMoeBlock):
    """`Qwen3SparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states, attention_mask=None, training=None):
        tokens = _flat(hidden_states, self.hidden_dim)
        out, router_logits = _qwen_routed(self, tokens, self.norm_top_k_prob)
        if training:
            aux_loss = qwen3_moe_decoder.compute_load_balancing_loss(
                router_logits=router_logits,
                num_experts=self.num_experts,
                top_k=self.top_k,
                attention_mask=attention_mask,
            )
            self.add_loss(self.router_aux_loss_coefficient * aux_loss)
        return ops.reshape(out, ops.shape(hidden_states)), router_logits


class SparseQwen3_5MoeSparseMoeBlock(Qwen3_5MoeSparseMoeBlock):
    """`Qwen3_5MoeSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states, attention_mask=None, training=None):
        tokens = _flat(hidden_states, self.hidden_dim)
        shared = self.shared_expert(tokens)
        shared = ops.sigmoid(self._shared_expert_gate(tokens)) * shared
        routed, router_logits = _qwen_routed(self, tokens, True)
        out = routed + shared
        if training:
            aux_loss = qwen3_5_moe_decoder.compute_load_balancing_loss(
                router_logits=router_logits,
                num_experts=self.num_experts,
                top_k=self.top_k,
                attention_mask=attention_mask,
            )
            self.add_loss(self.router_aux_loss_coefficient * aux_loss)
        return ops.reshape(out, ops.shape(hidden_states)), router_logits


def _sparsify_qwen(block, router_dtype, sparse_block, sparse_bank, activation_dtype):
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
    _swap(block, sparse_block, SparseState(experts, router_dtype, None))
    return [bank]


def _sparsify_qwen_moe(block, router_dtype):
    return _sparsify_qwen(
        block, router_dtype, SparseQwenSparseMoeBlock, SparseQwenMoeExperts, None
    )


def _sparsify_qwen3_moe(block, router_dtype):
    return _sparsify_qwen(
        block, router_dtype, SparseQwen3SparseMoeBlock, SparseQwen3MoeExperts, None
    )


def _sparsify_qwen3_5_moe(block, router_dtype):
    # Qwen3.5-MoE's experts compute SiLU in float32 (`Qwen3_5MoeExperts.call`).
    return _sparsify_qwen(
        block,
        router_dtype,
        SparseQwen3_5MoeSparseMoeBlock,
        SparseQwen3_5MoeExperts,
        "float32",
    )


# GPT-OSS ---------------------------------------------------------------------


class SparseGptOssExperts(GptOssExperts):
    """`GptOssExperts` that declares its expert weights."""

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return {
            "gate_up_proj": 0,
            "gate_up_proj_bias": 0,
            "down_proj": 0,
            "down_proj_bias": 0,
        }


class SparseGptOssSparseMoeBlock(GptOssSparseMoeBlock):
    """`GptOssSparseMoeBlock` that runs each token's top-k experts only."""

    def call(self, hidden_states):
        state = self._keras_moe
        tokens = _flat(hidden_states, self.hidden_dim)
        router_logits = state.logits(self.router.router_dense, tokens)
        # GPT-OSS's order: the softmax over the top-k logits.
        weights, experts, _ = routing.top_k_gates(
            router_logits, self.top_k, normalize_top_k=True, softmax_before_top_k=False
        )
        out = state.mixture(tokens, weights, experts)
        # The block returns the `(tokens, experts)` router scores, as KerasHub's.
        one_hot = ops.one_hot(experts, self.num_experts, dtype=weights.dtype)
        router_scores = ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)
        return ops.reshape(out, ops.shape(hidden_states)), router_scores


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
    _swap(block, SparseGptOssSparseMoeBlock, SparseState(experts, router_dtype, None))
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
        router_logits = routing.gate_logits(normed, full_precision(self.proj.kernel))
        weights, experts, _ = routing.top_k_gates(
            router_logits,
            self.num_experts_per_token,
            normalize_top_k=True,
            softmax_before_top_k=True,
        )
        one_hot = ops.one_hot(experts, self.num_experts, dtype="float32")
        return ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)


class SparseGemma4MoEBlock(Gemma4MoEBlock):
    """`Gemma4MoEBlock` (the expert bank) that runs each token's top-k experts
    only, and declares its expert weights."""

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

    def expert_weight_axes(self):
        """Weight name -> experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return {"gate_proj": 0, "up_proj": 0, "down_proj": 0, "per_expert_scale": 0}


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
    state = SparseState(experts, router_dtype, router.num_experts_per_token)
    _swap(router, SparseGemma4Router, state)
    _swap(bank, SparseGemma4MoEBlock, state)
    return [bank]


# KerasHub's layer classes that `sparsify` looks for -> the function that
# sparsifies one of them in place and returns the expert banks to shard.
SPARSIFIERS = {
    MixtralSparseMoeBlock: _sparsify_mixtral,
    QwenSparseMoeBlock: _sparsify_qwen_moe,
    Qwen3SparseMoeBlock: _sparsify_qwen3_moe,
    Qwen3_5MoeSparseMoeBlock: _sparsify_qwen3_5_moe,
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
