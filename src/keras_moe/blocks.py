"""The MoE blocks of published models, as `MoEFeedForward` layers.

Each factory composes a `MoEFeedForward` from a
`keras_moe.layers.FeedForwardExperts`, a `keras_moe.routing.TopKRouter` and,
where the model has one, a `keras_moe.layers.SharedExpert`, with the options
that make it compute what the model's block computes (checked against
KerasHub's blocks in `tests/kerashub`). A new family is one more factory.

Every factory takes the block's sizes, the family's own options, and:
`load_balance_weight` and `router_z_loss_weight` (the router's losses, added
in training), `router_dtype` (`"float32"`, keras-moe's default, or
`"compute"` as KerasHub's models route), `dtype` (the dtype policy of the
block and its sublayers) and `**kwargs`, passed to `MoEFeedForward` (`name`,
`router_jitter_noise`, `seed`, ...).

Example:

>>> import numpy as np
>>> from keras_moe import blocks
>>> block = blocks.mixtral(intermediate_dim=32, n_experts=4, top_k=2)
>>> tuple(block(np.ones((2, 5, 16), "float32")).shape)
(2, 5, 16)
"""

from keras_moe.layers.feed_forward_experts import FeedForwardExperts
from keras_moe.layers.moe_feed_forward import MoEFeedForward
from keras_moe.layers.shared_expert import SharedExpert
from keras_moe.routing.top_k_router import TopKRouter

__all__ = ["gemma4", "gpt_oss", "mixtral", "qwen3_5_moe", "qwen3_moe", "qwen_moe"]


def _block(
    intermediate_dim,
    n_experts,
    top_k,
    experts,
    router,
    shared_expert=None,
    *,
    losses,
    dtype,
    **kwargs,
):
    """A `MoEFeedForward` of `FeedForwardExperts(intermediate_dim, n_experts,
    **experts)`, `TopKRouter(n_experts, top_k, **router, **losses)` and, if
    given, `SharedExpert(**shared_expert)`, all of the block's `dtype`."""
    if shared_expert is not None:
        shared_expert = SharedExpert(dtype=dtype, name="shared_expert", **shared_expert)
    return MoEFeedForward(
        experts=FeedForwardExperts(
            intermediate_dim, n_experts, dtype=dtype, name="experts", **experts
        ),
        router=TopKRouter(
            n_experts, top_k, dtype=dtype, name="router", **router, **losses
        ),
        shared_expert=shared_expert,
        dtype=dtype,
        **kwargs,
    )


def _losses(load_balance_weight, router_z_loss_weight, router_dtype):
    """The router options every factory takes, as `TopKRouter` arguments."""
    return dict(
        load_balance_weight=load_balance_weight,
        router_z_loss_weight=router_z_loss_weight,
        router_dtype=router_dtype,
    )


def mixtral(
    intermediate_dim,
    n_experts,
    top_k=2,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    router_dtype="float32",
    dtype=None,
    **kwargs,
):
    """Mixtral's MoE block (Jiang et al. 2024; KerasHub's
    `MixtralSparseMoeBlock`).

    Gated SiLU experts without biases (the activation in float32), top-k of
    the full softmax renormalised over the chosen experts.

    Args:
        intermediate_dim: Hidden size of each expert.
        n_experts: Number of experts.
        top_k: Experts per token.
        load_balance_weight: Weight of the load-balancing loss.
        router_z_loss_weight: Weight of the router z-loss.
        router_dtype: `"float32"` or `"compute"`.
        dtype: Dtype policy of the block.
        **kwargs: `MoEFeedForward`'s (`router_jitter_noise`, `name`, ...).
    """
    return _block(
        intermediate_dim,
        n_experts,
        top_k,
        experts=dict(
            activation="silu", gated=True, use_bias=False, activation_dtype="float32"
        ),
        router=dict(softmax_before_top_k=True),
        losses=_losses(load_balance_weight, router_z_loss_weight, router_dtype),
        dtype=dtype,
        **kwargs,
    )


def _qwen(
    intermediate_dim,
    n_experts,
    top_k,
    normalize_top_k,
    shared_intermediate_dim=None,
    activation_dtype=None,
    **kwargs,
):
    """The Qwen MoE families' block: gated SiLU experts without biases, gate
    and up fused (gate columns first), an optional gated shared expert."""
    experts = dict(
        activation="silu",
        gated=True,
        use_bias=False,
        gate_up_layout="concatenated",
        activation_dtype=activation_dtype,
    )
    shared_expert = None
    if shared_intermediate_dim is not None:
        shared_expert = dict(
            intermediate_dim=shared_intermediate_dim,
            activation="silu",
            gated=True,
            use_bias=False,
            output_gate=True,
            activation_dtype=activation_dtype,
        )
    router = dict(normalize_top_k=normalize_top_k, softmax_before_top_k=True)
    return _block(
        intermediate_dim, n_experts, top_k, experts, router, shared_expert, **kwargs
    )


def qwen_moe(
    intermediate_dim,
    n_experts,
    top_k=2,
    shared_intermediate_dim=None,
    normalize_top_k=False,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    router_dtype="float32",
    dtype=None,
    **kwargs,
):
    """Qwen1.5-MoE's and Qwen2-MoE's block (KerasHub's `QwenSparseMoeBlock`).

    Gated SiLU experts without biases, gate and up fused in one kernel (gate
    columns first), the top-k of the full softmax (renormalised with
    `normalize_top_k`, the model's `norm_top_k_prob`), and a shared expert
    of `shared_intermediate_dim` behind a sigmoid gate.

    Args:
        intermediate_dim: Hidden size of each expert.
        n_experts: Number of experts.
        top_k: Experts per token.
        shared_intermediate_dim: Hidden size of the shared expert (`None`:
            none).
        normalize_top_k: Whether the chosen weights are renormalised.
        load_balance_weight: Weight of the load-balancing loss.
        router_z_loss_weight: Weight of the router z-loss.
        router_dtype: `"float32"` or `"compute"`.
        dtype: Dtype policy of the block.
        **kwargs: `MoEFeedForward`'s.
    """
    return _qwen(
        intermediate_dim,
        n_experts,
        top_k,
        normalize_top_k,
        shared_intermediate_dim,
        losses=_losses(load_balance_weight, router_z_loss_weight, router_dtype),
        dtype=dtype,
        **kwargs,
    )


def qwen3_moe(
    intermediate_dim,
    n_experts,
    top_k=8,
    normalize_top_k=True,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    router_dtype="float32",
    dtype=None,
    **kwargs,
):
    """Qwen3-MoE's block (KerasHub's `Qwen3SparseMoeBlock`): Qwen MoE's
    experts without a shared expert.

    Args:
        intermediate_dim: Hidden size of each expert.
        n_experts: Number of experts.
        top_k: Experts per token.
        normalize_top_k: Whether the chosen weights are renormalised (the
            model's `norm_top_k_prob`).
        load_balance_weight: Weight of the load-balancing loss.
        router_z_loss_weight: Weight of the router z-loss.
        router_dtype: `"float32"` or `"compute"`.
        dtype: Dtype policy of the block.
        **kwargs: `MoEFeedForward`'s.
    """
    return _qwen(
        intermediate_dim,
        n_experts,
        top_k,
        normalize_top_k,
        losses=_losses(load_balance_weight, router_z_loss_weight, router_dtype),
        dtype=dtype,
        **kwargs,
    )


def qwen3_5_moe(
    intermediate_dim,
    n_experts,
    top_k=8,
    shared_intermediate_dim=None,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    router_dtype="float32",
    dtype=None,
    **kwargs,
):
    """Qwen3.5-MoE's block (KerasHub's `Qwen3_5MoeSparseMoeBlock`): Qwen
    MoE's experts and gated shared expert, their SiLU in float32, the
    chosen weights renormalised.

    Args:
        intermediate_dim: Hidden size of each expert.
        n_experts: Number of experts.
        top_k: Experts per token.
        shared_intermediate_dim: Hidden size of the shared expert (`None`:
            none).
        load_balance_weight: Weight of the load-balancing loss.
        router_z_loss_weight: Weight of the router z-loss.
        router_dtype: `"float32"` or `"compute"`.
        dtype: Dtype policy of the block.
        **kwargs: `MoEFeedForward`'s.
    """
    return _qwen(
        intermediate_dim,
        n_experts,
        top_k,
        True,
        shared_intermediate_dim,
        "float32",
        losses=_losses(load_balance_weight, router_z_loss_weight, router_dtype),
        dtype=dtype,
        **kwargs,
    )


def gpt_oss(
    intermediate_dim,
    n_experts,
    top_k=4,
    swiglu_limit=7.0,
    swiglu_alpha=1.702,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    router_dtype="float32",
    dtype=None,
    **kwargs,
):
    """GPT-OSS's MoE block (KerasHub's `GptOssSparseMoeBlock`).

    A router with a bias, the softmax over the top-k logits; experts with
    biases, gate and up interleaved in one kernel, and the clamped SwiGLU
    `(clip(up, -L, L) + 1) * g * sigmoid(alpha * g)`, `g = min(gate, L)`.

    Args:
        intermediate_dim: Hidden size of each expert.
        n_experts: Number of experts.
        top_k: Experts per token.
        swiglu_limit: The clamp `L`.
        swiglu_alpha: The SwiGLU's `alpha`.
        load_balance_weight: Weight of the load-balancing loss.
        router_z_loss_weight: Weight of the router z-loss.
        router_dtype: `"float32"` or `"compute"`.
        dtype: Dtype policy of the block.
        **kwargs: `MoEFeedForward`'s.
    """
    return _block(
        intermediate_dim,
        n_experts,
        top_k,
        experts=dict(
            gated=True,
            use_bias=True,
            gate_up_layout="interleaved",
            swiglu_limit=swiglu_limit,
            swiglu_alpha=swiglu_alpha,
        ),
        router=dict(use_bias=True),
        losses=_losses(load_balance_weight, router_z_loss_weight, router_dtype),
        dtype=dtype,
        **kwargs,
    )


def gemma4(
    intermediate_dim,
    n_experts,
    top_k=2,
    norm_epsilon=1e-6,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    router_dtype="float32",
    dtype=None,
    **kwargs,
):
    """Gemma 4's MoE block (KerasHub's `Gemma4Router` and `Gemma4MoEBlock`).

    The router scores `rms_norm(h) / sqrt(d) * s` of the hidden states `h`
    (pass them as the call's `router_inputs`; the experts run on their
    normalisation), the top-k of the full softmax renormalised; gated
    GELU-tanh experts without biases (the activation in float32), each
    output times a learned per-expert scale.

    Args:
        intermediate_dim: Hidden size of each expert.
        n_experts: Number of experts.
        top_k: Experts per token.
        norm_epsilon: Epsilon of the router's RMS normalisation.
        load_balance_weight: Weight of the load-balancing loss.
        router_z_loss_weight: Weight of the router z-loss.
        router_dtype: `"float32"` or `"compute"`.
        dtype: Dtype policy of the block.
        **kwargs: `MoEFeedForward`'s.
    """
    return _block(
        intermediate_dim,
        n_experts,
        top_k,
        experts=dict(
            activation="gelu_tanh",
            gated=True,
            use_bias=False,
            activation_dtype="float32",
            output_scale=True,
        ),
        router=dict(
            softmax_before_top_k=True, input_norm=True, norm_epsilon=norm_epsilon
        ),
        losses=_losses(load_balance_weight, router_z_loss_weight, router_dtype),
        dtype=dtype,
        **kwargs,
    )
