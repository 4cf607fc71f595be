"""`ExpertChoiceRouter`: expert-choice routing, each expert picks its tokens."""

import keras
from keras import ops

from keras_moe import distribution
from keras_moe import utils
from keras_moe.routing.base_router import BaseRouter
from keras_moe.routing.expert_choice import expert_choice_capacity
from keras_moe.routing.expert_choice import expert_choice_gates
from keras_moe.routing.expert_choice import expert_choice_mixture
from keras_moe.routing.expert_choice import expert_choice_statistics


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceRouter(BaseRouter):
    """Expert-choice router (Zhou et al. 2022): each expert picks its tokens.

    `S = softmax(x . W_r (+ b_r))` over the experts, in float32 (see
    `BaseRouter` for the logits); expert `e`
    takes the `c = ceil(capacity_factor * top_k * n / E)` tokens (at most
    `n`) of largest `S[:, e]` among the `n` (unmasked) tokens of the call,
    and `dispatch` computes `y_t = sum over the experts e that took t of
    S[t, e] * expert_e(x_t)`; a token that no expert took gets zero. Every
    expert runs `c` tokens, so the load is balanced by construction (no
    balancing loss); what varies is how many experts each token gets
    (`top_k` on average), and `dropped_fraction` reports the share of tokens
    that got none.

    It routes all tokens of a call at once (every position of every
    sequence of the batch): a token's routing depends on the other tokens,
    later ones included, so it is not causal, and a decoder must not use it
    for autoregressive inference without care (the paper's own caveat). It
    also routes over the whole batch under a `keras.distribution` (the same
    result on any number of devices), with the experts' `(E, c, d)` buffer
    laid out over the expert axis of `expert_parallel_layout_map`'s mesh.

    Args:
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, average experts per token.
        capacity_factor: Positive float `f` (1.0 by default), scaling the
            tokens each expert takes. (`None`, which 0.2.0 read as 1.0, is
            deprecated: it warns and means 1.0.)
        router_z_loss_weight: Non-negative weight of the router z-loss
            `mean(logsumexp(z)^2)` (ST-MoE), added in training.
        use_bias: Whether the logits have a bias `b_r`.
        kernel_initializer: Initializer of the router kernel `W_r`.
        bias_initializer: Initializer of the router bias.
        kernel_regularizer: Regularizer of the router kernel.
        bias_regularizer: Regularizer of the router bias.
        kernel_constraint: Constraint of the router kernel.
        bias_constraint: Constraint of the router bias.
        router_dtype: `"float32"` (the default) or `"compute"`, the dtype of
            the logits (`BaseRouter`); the softmax is float32 either way.
        input_norm: Whether the router scores its inputs RMS-normalised and
            scaled (Gemma 4's router; `BaseRouter`).
        norm_epsilon: Epsilon of that normalisation.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(tokens, d)` tensor.
        mask: Optional `(tokens,)` boolean mask: masked tokens are taken by
            no expert and count in no loss or statistic, nor in `n`: padding
            never changes the real tokens' outputs. The returned arrays keep
            the static `c` of all the tokens; the rows past each expert's `c`
            of the unmasked tokens (masked tokens, or unmasked ones it does
            not take) have weight 0 and `dispatch` does not count them.
        training: Python bool: the z-loss and the running sums only when
            `True`.

    Returns:
        `(weights, tokens)`: `(E, c)` float32 scores `S[t, e]` of the tokens
        each expert took, best first, and their `(E, c)` int32 indices.

    Input shape:
        2D tensor `(tokens, d)`.

    Output shape:
        Two 2D tensors `(n_experts, c)`.

    Example:

    >>> import numpy as np
    >>> from keras_moe.routing import ExpertChoiceRouter
    >>> router = ExpertChoiceRouter(n_experts=4, top_k=2)
    >>> weights, tokens = router(np.ones((6, 8), "float32"))
    >>> tuple(weights.shape), tuple(tokens.shape)  # c = ceil(2 * 6 / 4)
    ((4, 3), (4, 3))
    >>> sorted(router.routing_stats)
    ['dropped_fraction', 'expert_load', 'router_entropy']

    References:
        - Zhou et al., "Mixture-of-Experts with Expert Choice Routing",
          NeurIPS 2022.
        - Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse
          Expert Models", 2022.
    """

    def __init__(
        self,
        n_experts,
        top_k=2,
        capacity_factor=1.0,
        router_z_loss_weight=0.0,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        router_dtype="float32",
        input_norm=False,
        norm_epsilon=1e-6,
        **kwargs,
    ):
        if capacity_factor is None:
            utils.warn_deprecated(
                "ExpertChoiceRouter(capacity_factor=None)",
                "ExpertChoiceRouter(capacity_factor=1.0)",
                removed_in="0.4.0",
            )
            capacity_factor = 1.0
        super().__init__(
            n_experts=n_experts,
            top_k=top_k,
            use_bias=use_bias,
            router_z_loss_weight=router_z_loss_weight,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            router_dtype=router_dtype,
            input_norm=input_norm,
            norm_epsilon=norm_epsilon,
            **kwargs,
        )
        self.capacity_factor = utils.check_positive_float(
            "capacity_factor", capacity_factor
        )

    def capacity(self, n_tokens):
        """Tokens each expert takes out of `n_tokens`."""
        return expert_choice_capacity(
            n_tokens, self.top_k, self.n_experts, self.capacity_factor
        )

    def kept_capacity(self, mask):
        """Tokens each expert takes out of the unmasked ones: a scalar int32
        tensor, or None without a mask (the buffer's `c`)."""
        if mask is None:
            return None
        n_valid = ops.sum(ops.cast(ops.reshape(mask, (-1,)), "int32"))
        return self.capacity(n_valid)

    def call(self, inputs, mask=None, training=None):
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        n = inputs.shape[0]
        if n is None:
            n = ops.shape(inputs)[0]
        logits = self.logits(inputs, training=training)
        kept = self.kept_capacity(mask)
        weights, tokens, _ = expert_choice_gates(logits, self.capacity(n), mask, kept)
        self.add_z_loss(logits, mask, training)
        stats = expert_choice_statistics(weights, tokens, logits, mask, kept)
        self.statistics.record(**stats, training=training)
        return weights, tokens

    def dispatch(self, inputs, weights, indices, expert_bank, mask=None, training=None):
        """Runs `expert_bank` on the tokens each expert took: `(tokens, m)`
        (`routing.expert_choice_mixture` on the `(weights, tokens)` that
        `call` returned)."""
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        return expert_choice_mixture(
            inputs,
            weights,
            indices,
            expert_bank,
            mask,
            self.kept_capacity(mask),
            distribution.expert_axis(),
        )

    def compute_mask(self, inputs, mask=None):
        # The outputs are per expert, not per token: no mask to carry on.
        return None

    def compute_output_shape(self, input_shape):
        n = tuple(input_shape)[0]
        shape = (self.n_experts, None if n is None else self.capacity(n))
        return shape, shape

    def compute_output_spec(self, inputs, mask=None, training=None):
        shape, _ = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, "float32"),
            keras.KerasTensor(shape, "int32"),
        )

    def get_config(self):
        config = {"capacity_factor": self.capacity_factor}
        return {**super().get_config(), **config}
