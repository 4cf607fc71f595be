"""`TopKRouter`: token-choice routing, each token to its `top_k` experts."""

import keras
from keras import ops

from keras_moe import distribution
from keras_moe import utils
from keras_moe.routing.balance import balanced_top_k_gates
from keras_moe.routing.balance import update_balance_bias
from keras_moe.routing.base_router import BaseRouter
from keras_moe.routing.dispatch import DROPLESS_CAPACITY_FACTORS
from keras_moe.routing.dispatch import check_layout
from keras_moe.routing.dispatch import sparse_mixture
from keras_moe.routing.gates import noisy_logits
from keras_moe.routing.gates import top_k_gates
from keras_moe.routing.losses import expert_counts
from keras_moe.routing.losses import load_balance_loss
from keras_moe.routing.losses import router_entropy


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(BaseRouter):
    """Token-choice top-k router: each token picks its `top_k` experts.

    `z = x . W_r (+ b_r)` in float32 (or in the compute dtype with
    `router_dtype="compute"`; `BaseRouter`); each token picks the `top_k`
    experts of largest `z` with weights `softmax` over the chosen logits
    (`normalize_top_k=True`) or the full softmax's values at them. In
    training it adds the load-balancing loss `E * sum_i f_i * P_i` (`f_i`
    expert `i`'s share of the assignments, `P_i` its mean softmax
    probability; 1.0 at balance) and the router z-loss
    `mean(logsumexp(z)^2)` (ST-MoE), each times its weight, and with
    `noisy_gating` it adds `N(0, 1) * softplus(x . W_noise)` to the logits
    (Shazeer et al. 2017).

    `call` decides the routing; `dispatch` runs an expert bank on each
    token's experts only (`routing.sparse_mixture`), in the dispatch
    `layout` (`routing.choose_layout`), dropless or with the router's
    `capacity_factor`. `MoEFeedForward` and `DenseMoE(top_k=...)` hold one as
    their sublayer `router`; a custom layer uses it the same way.

    Args:
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, experts per token.
        normalize_top_k: If `True`, the chosen experts' weights are the
            softmax over their logits (they sum to one); if `False`, the
            full softmax's values at the chosen experts.
        capacity_factor: `None` (dropless: no token is ever dropped) or a
            positive float: each expert takes at most
            `min(tokens, ceil(capacity_factor * tokens * top_k / n_experts))`
            assignments in `dispatch`, the others are dropped (zero
            contribution).
        noisy_gating: Whether to add learned-scale Gaussian noise to the
            logits in training (Shazeer et al. 2017).
        load_balance_weight: Non-negative weight of the load-balancing loss.
        router_z_loss_weight: Non-negative weight of the router z-loss.
        use_bias: Whether the logits have a bias `b_r`.
        kernel_initializer: Initializer of the router kernel `W_r`.
        bias_initializer: Initializer of the router bias.
        kernel_regularizer: Regularizer of the router kernel.
        bias_regularizer: Regularizer of the router bias.
        kernel_constraint: Constraint of the router kernel.
        bias_constraint: Constraint of the router bias.
        seed: Optional integer seed of the gating noise.
        softmax_before_top_k: The order of the operations
            (`routing.top_k_gates`): `False`, the softmax over the top-k
            logits; `True`, the top-k of the full softmax, divided by their
            sum with `normalize_top_k` (as Mixtral and Qwen MoE compute it).
            The same weights, rounded differently in low precision.
        router_dtype: `"float32"` (the default) or `"compute"`
            (`BaseRouter`): float32 keeps the routing stable in
            mixed-precision training; `"compute"` reproduces a model that
            routes in its compute dtype, as KerasHub's MoE models do.
        balance_bias_rate: Non-negative float. When positive, loss-free
            balancing (DeepSeek-V3, `routing.balance`): a non-trainable
            float32 per-expert `balance_bias` `(E,)` is added to the logits
            for choosing the experts only (the weights come from the
            unbiased logits), and in every training call of a trainable
            router each expert's bias moves by
            `balance_bias_rate * sign(mean load - its load)`, outside the
            optimizer. Saved with the model; `routing_stats` reports it.
        layout: The dispatch layout (`routing.LAYOUTS`): `"auto"` (the
            default, `routing.choose_layout`), `"capacity"` (with a
            `capacity_factor`), or dropless `"tiers"`, `"blocks"` or
            `"grouped"`. The same outputs; it decides speed and memory.
        input_norm: Whether the router scores its inputs RMS-normalised and
            scaled (Gemma 4's router; `BaseRouter`).
        norm_epsilon: Epsilon of that normalisation.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(tokens, d)` tensor.
        mask: Optional `(tokens,)` boolean mask: masked tokens count in no
            loss or statistic (and `dispatch` sends them to no expert).
        training: Python bool: losses, noise and the balance bias's moves
            only when `True`.

    Returns:
        `(weights, experts)`: `(tokens, top_k)` weights (float32, or the
        compute dtype with `router_dtype="compute"`) and int32 expert
        indices, best first.

    Input shape:
        2D tensor `(tokens, d)`.

    Output shape:
        Two 2D tensors `(tokens, top_k)`.

    Example:

    >>> import numpy as np
    >>> from keras_moe.routing import TopKRouter
    >>> router = TopKRouter(n_experts=4, top_k=2)
    >>> weights, experts = router(np.ones((3, 8), "float32"))
    >>> tuple(weights.shape), tuple(experts.shape)
    ((3, 2), (3, 2))
    >>> sorted(router.routing_stats)
    ['dropped_fraction', 'expert_load', 'router_entropy']

    References:
        - Shazeer et al., "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017.
        - Fedus, Zoph & Shazeer, "Switch Transformers", JMLR 2022.
        - Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse
          Expert Models", 2022.
    """

    def __init__(
        self,
        n_experts,
        top_k=2,
        normalize_top_k=True,
        capacity_factor=None,
        noisy_gating=False,
        load_balance_weight=0.0,
        router_z_loss_weight=0.0,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        softmax_before_top_k=False,
        router_dtype="float32",
        balance_bias_rate=0.0,
        layout="auto",
        input_norm=False,
        norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(
            n_experts=n_experts,
            top_k=top_k,
            use_bias=use_bias,
            router_dtype=router_dtype,
            input_norm=input_norm,
            norm_epsilon=norm_epsilon,
            router_z_loss_weight=router_z_loss_weight,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        self.normalize_top_k = utils.check_bool("normalize_top_k", normalize_top_k)
        self.softmax_before_top_k = utils.check_bool(
            "softmax_before_top_k", softmax_before_top_k
        )
        self.capacity_factor = utils.check_optional_positive_float(
            "capacity_factor", capacity_factor
        )
        self.layout = check_layout(layout, self.capacity_factor)
        self.noisy_gating = utils.check_bool("noisy_gating", noisy_gating)
        self.load_balance_weight = utils.check_non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.balance_bias_rate = utils.check_non_negative_float(
            "balance_bias_rate", balance_bias_rate
        )
        self.seed = utils.check_optional_seed(seed)
        self.seed_generator = None
        if self.noisy_gating:
            self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.noise_kernel = None
        self.balance_bias = None

    def build(self, input_shape):
        super().build(input_shape)
        input_dim = tuple(input_shape)[-1]
        if self.noisy_gating:
            # Zero-initialised as in Shazeer et al.: softplus(0) noise at first.
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_dim, self.n_experts),
                initializer="zeros",
                autocast=False,
            )
        if self.balance_bias_rate:
            self.balance_bias = self.add_weight(
                name="balance_bias",
                shape=(self.n_experts,),
                initializer="zeros",
                dtype="float32",
                trainable=False,
                autocast=False,
            )

    def logits(self, inputs, training=None):
        """Router logits `(tokens, E)` in `logits_dtype`, with the noise in
        training."""
        logits = super().logits(inputs)
        if self.noisy_gating and training:
            logits = noisy_logits(
                logits,
                self.scored_inputs(inputs),
                self.noise_kernel,
                self.seed_generator,
            )
        return logits

    def call(self, inputs, mask=None, training=None):
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        logits = self.logits(inputs, training=training)
        if self.balance_bias is None:
            weights, experts, probs = top_k_gates(
                logits, self.top_k, self.normalize_top_k, self.softmax_before_top_k
            )
        else:
            # The bias picks the experts; the weights ignore it (both orders
            # of `softmax_before_top_k` give these weights, rounded alike).
            weights, experts, probs = balanced_top_k_gates(
                logits, self.balance_bias.value, self.top_k, self.normalize_top_k
            )
        counts = expert_counts(experts, self.n_experts, mask)
        if training and self.trainable and self.balance_bias is not None:
            update_balance_bias(self.balance_bias, counts, self.balance_bias_rate)
        if training and self.load_balance_weight:
            loss = load_balance_loss(probs, counts, mask)
            self.add_loss(self.load_balance_weight * loss)
        self.add_z_loss(logits, mask, training)
        sizes = ops.cast(counts, "float32")
        self.statistics.record(
            expert_load=sizes / ops.maximum(ops.sum(sizes), 1.0),
            dropped_fraction=ops.zeros((), "float32"),
            router_entropy=router_entropy(logits, mask),
            training=training,
        )
        return weights, experts

    def dispatch(
        self,
        inputs,
        weights,
        experts,
        expert_bank,
        mask=None,
        training=None,
        layout=None,
        dropless_capacity_factors=DROPLESS_CAPACITY_FACTORS,
    ):
        """Runs `expert_bank` on each token's experts and mixes them back.

        `routing.sparse_mixture` with this router's `n_experts`,
        `capacity_factor` and `layout` (or the given `layout`), on the
        `(weights, experts)` that `call` returned. With a `capacity_factor`,
        the share of assignments dropped goes into the routing statistics.
        """
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        outputs, _, dropped = sparse_mixture(
            inputs,
            experts,
            weights,
            self.n_experts,
            expert_bank,
            capacity_factor=self.capacity_factor,
            mask=mask,
            layout=self.layout if layout is None else layout,
            dropless_capacity_factors=dropless_capacity_factors,
            training=training,
            expert_axis=distribution.expert_axis(),
        )
        if self.capacity_factor is not None:
            self.statistics.record(dropped_fraction=dropped, training=training)
        return outputs

    @property
    def routing_stats(self):
        """Statistics of the last call (`BaseRouter.routing_stats`); with
        `balance_bias_rate`, also `balance_bias` (its current value)."""
        stats = super().routing_stats
        return self._with_balance_bias(stats)

    def routing_stats_mean(self):
        """`BaseRouter.routing_stats_mean`, with the current `balance_bias`."""
        stats = super().routing_stats_mean()
        return None if stats is None else self._with_balance_bias(stats)

    def _with_balance_bias(self, stats):
        if self.balance_bias is not None:
            stats["balance_bias"] = ops.convert_to_numpy(self.balance_bias.value)
        return stats

    def compute_output_shape(self, input_shape):
        shape = (tuple(input_shape)[0], self.top_k)
        return shape, shape

    def compute_output_spec(self, inputs, mask=None, training=None):
        shape = (inputs.shape[0], self.top_k)
        return (
            keras.KerasTensor(shape, self.logits_dtype),
            keras.KerasTensor(shape, "int32"),
        )

    def get_config(self):
        config = {
            "normalize_top_k": self.normalize_top_k,
            "softmax_before_top_k": self.softmax_before_top_k,
            "capacity_factor": self.capacity_factor,
            "layout": self.layout,
            "noisy_gating": self.noisy_gating,
            "load_balance_weight": self.load_balance_weight,
            "balance_bias_rate": self.balance_bias_rate,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}
