import keras
from keras import ops

from keras_moe import routing
from keras_moe import utils
from keras_moe.routing import router as router_lib


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEFeedForward(keras.layers.Layer):
    """Sparse mixture-of-experts transformer feed-forward block.

    `y = sum_{j < k} w_j(x) * expert_{e_j(x)}(x)`, where `e_1..e_k` are the
    `top_k` experts of largest router logit `z = x . R (+ r)` and each expert
    is `down(act(x . gate) * (x . up))` when `gated`, else `down(act(x . up))`
    (with biases when `use_bias`). Only the chosen experts run: tokens are
    sorted by expert and each expert multiplies its own tokens
    (`keras_moe.routing`), so compute and memory grow with `top_k`, not with
    `n_experts`. The router is a `keras_moe.routing.TopKRouter` sublayer,
    `router`, created in `build()`; it runs in float32 (logits, softmax,
    top-k weights, losses) under any dtype policy.

    Configured as `activation="silu", gated=True, use_bias=False,
    router_bias=False, top_k=2` it computes what KerasHub's
    `MixtralSparseMoeBlock` computes with the same weights.

    Args:
        intermediate_dim: Positive integer, hidden size `m` of each expert.
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, experts per token.
        activation: Activation of the hidden layer (`"gelu"`).
        gated: Whether each expert is a gated linear unit (GLU).
        use_bias: Whether the experts have biases.
        router_bias: Whether the router has a bias.
        normalize_top_k: If `True`, the chosen experts' weights are the
            softmax over their logits (summing to one); if `False`, the full
            softmax's values at the chosen experts.
        capacity_factor: `None` (dropless, the default: no token is ever
            dropped) or a positive float: each expert takes at most
            `ceil(capacity_factor * tokens * top_k / n_experts)` assignments,
            the others are dropped (zero contribution).
        noisy_gating: Noisy top-k gating (Shazeer et al. 2017) in training:
            Gaussian noise of learned scale `softplus(x . W_noise)`.
        load_balance_weight: Weight of the load-balancing loss
            `E * sum_i f_i * P_i` (1.0 at perfect balance), added in training.
        router_z_loss_weight: Weight of the router z-loss
            `mean(logsumexp(z)^2)`, added in training.
        kernel_initializer: Initializer of the expert kernels.
        bias_initializer: Initializer of the expert biases.
        router_initializer: Initializer of the router kernel.
        kernel_regularizer: Regularizer of the expert kernels.
        bias_regularizer: Regularizer of the expert biases.
        kernel_constraint: Constraint of the expert kernels.
        bias_constraint: Constraint of the expert biases.
        seed: Optional integer seed of the gating noise.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of shape `(..., d)`.
        mask: Optional boolean mask of shape `(...)`: masked tokens are not
            routed (their output is zero) and count in no loss or statistic.
        training: Python bool: losses and noise only when `True`.

    Input shape:
        N-D tensor `(batch_size, ..., d)`, N >= 2.

    Output shape:
        Same as the input.

    Weights (expert axis first): `expert_up_kernel` `(E, d, m)`,
    `expert_gate_kernel` `(E, d, m)` (when gated), `expert_down_kernel`
    `(E, m, d)`, `expert_up_bias` `(E, m)`, `expert_down_bias` `(E, d)`; the
    `router`'s `kernel` `(d, E)`, `bias` `(E,)` (with `router_bias`),
    `noise_kernel` `(d, E)` (with noisy gating) and non-trainable
    `routing_stats_last` and `routing_stats_sum` (see `routing_stats`).

    Example:

    >>> import numpy as np
    >>> from keras_moe import MoEFeedForward
    >>> layer = MoEFeedForward(32, n_experts=4, top_k=2)
    >>> tuple(layer(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    >>> sorted(layer.routing_stats)
    ['dropped_fraction', 'expert_load', 'router_entropy']

    References:
        - Shazeer et al., "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017.
        - Fedus, Zoph & Shazeer, "Switch Transformers", JMLR 2022.
        - Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse
          Expert Models", 2022.
        - Gale et al., "MegaBlocks: Efficient Sparse Training with
          Mixture-of-Experts", MLSys 2023.
    """

    def __init__(
        self,
        intermediate_dim,
        n_experts,
        top_k=2,
        activation="gelu",
        gated=False,
        use_bias=True,
        router_bias=False,
        normalize_top_k=True,
        capacity_factor=None,
        noisy_gating=False,
        load_balance_weight=0.01,
        router_z_loss_weight=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="glorot_uniform",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = utils.check_positive_int(
            "intermediate_dim", intermediate_dim
        )
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.activation = utils.get_activation("activation", activation)
        self.gated = utils.check_bool("gated", gated)
        self.use_bias = utils.check_bool("use_bias", use_bias)
        self.router_bias = utils.check_bool("router_bias", router_bias)
        self.kernel_initializer = utils.get_initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = utils.get_initializer(
            "bias_initializer", bias_initializer
        )
        self.router_initializer = utils.get_initializer(
            "router_initializer", router_initializer
        )
        self.kernel_regularizer = utils.get_regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = utils.get_regularizer(
            "bias_regularizer", bias_regularizer
        )
        self.kernel_constraint = utils.get_constraint(
            "kernel_constraint", kernel_constraint
        )
        self.bias_constraint = utils.get_constraint("bias_constraint", bias_constraint)
        self.top_k = utils.check_positive_int("top_k", top_k)
        if self.top_k > self.n_experts:
            raise ValueError(
                "`top_k` must be an integer from 1 to `n_experts`. "
                f"Received: top_k={top_k}, n_experts={n_experts}"
            )
        self.normalize_top_k = utils.check_bool("normalize_top_k", normalize_top_k)
        self.capacity_factor = None
        if capacity_factor is not None:
            self.capacity_factor = utils.check_positive_float(
                "capacity_factor", capacity_factor
            )
        self.noisy_gating = utils.check_bool("noisy_gating", noisy_gating)
        self.load_balance_weight = utils.check_non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.router_z_loss_weight = utils.check_non_negative_float(
            "router_z_loss_weight", router_z_loss_weight
        )
        self.seed = None
        if seed is not None:
            self.seed = utils.check_positive_int("seed", seed, minimum=0)
        self.router = None
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                "`MoEFeedForward` expects an input of rank >= 2 with a defined "
                f"last axis. Received: input_shape={input_shape}"
            )
        d, m, e = input_shape[-1], self.intermediate_dim, self.n_experts
        self.router = routing.TopKRouter(
            n_experts=e,
            top_k=self.top_k,
            normalize_top_k=self.normalize_top_k,
            capacity_factor=self.capacity_factor,
            noisy_gating=self.noisy_gating,
            load_balance_weight=self.load_balance_weight,
            router_z_loss_weight=self.router_z_loss_weight,
            use_bias=self.router_bias,
            kernel_initializer=self.router_initializer,
            seed=self.seed,
            dtype=self.dtype_policy,
            name="router",
        )
        self.router.build((None, d))
        self.expert_up_kernel = self.add_weight(
            name="expert_up_kernel",
            shape=(e, d, m),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.expert_gate_kernel = None
        if self.gated:
            self.expert_gate_kernel = self.add_weight(
                name="expert_gate_kernel",
                shape=(e, d, m),
                initializer=self.kernel_initializer,
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
            )
        self.expert_down_kernel = self.add_weight(
            name="expert_down_kernel",
            shape=(e, m, d),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.expert_up_bias = None
        self.expert_down_bias = None
        if self.use_bias:
            self.expert_up_bias = self.add_weight(
                name="expert_up_bias",
                shape=(e, m),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            self.expert_down_bias = self.add_weight(
                name="expert_down_bias",
                shape=(e, d),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: d})

    def _experts(self, layout, x):
        """The experts on their gathered rows `x` (see `routing.sparse_mixture`)."""
        h = layout.matmul(x, self.expert_up_kernel)
        if self.expert_up_bias is not None:
            h = layout.add_bias(h, self.expert_up_bias)
        if self.gated:
            h = self.activation(layout.matmul(x, self.expert_gate_kernel)) * h
        else:
            h = self.activation(h)
        y = layout.matmul(h, self.expert_down_kernel)
        if self.expert_down_bias is not None:
            y = layout.add_bias(y, self.expert_down_bias)
        return y

    def call(self, inputs, mask=None, training=None):
        # Keras autocasts float inputs only; integer ones are computed as floats.
        inputs = ops.cast(inputs, self.compute_dtype)
        d = self.expert_up_kernel.shape[1]
        tokens = ops.reshape(inputs, (-1, d))
        if mask is not None:
            mask = ops.reshape(ops.broadcast_to(mask, ops.shape(inputs)[:-1]), (-1,))
        weights, experts = self.router(tokens, mask=mask, training=training)
        outputs = self.router.dispatch(
            tokens, weights, experts, self._experts, mask, training
        )
        return ops.reshape(outputs, ops.shape(inputs))

    @property
    def routing_stats(self):
        """The router's statistics of the last call (`TopKRouter.routing_stats`)."""
        if self.router is None:
            raise ValueError(
                "`MoEFeedForward` has no routing statistics before it is built "
                "and called. Received: built=False"
            )
        return self.router.routing_stats

    def routing_stats_mean(self):
        """`TopKRouter.routing_stats_mean` of the router (None before a call)."""
        return None if self.router is None else self.router.routing_stats_mean()

    def reset_routing_stats(self):
        """`TopKRouter.reset_routing_stats` of the router."""
        if self.router is not None:
            self.router.reset_routing_stats()

    def expert_weight_axes(self):
        """Weight name -> its experts axis (`keras_moe.expert_parallel_layout_map`)."""
        names = ["expert_up_kernel", "expert_down_kernel"]
        if self.gated:
            names.append("expert_gate_kernel")
        if self.use_bias:
            names += ["expert_up_bias", "expert_down_bias"]
        return {name: 0 for name in names}

    def load_own_variables(self, store):
        router = self.router
        legacy = [router.kernel, router.bias, self.expert_up_kernel]
        legacy += [self.expert_gate_kernel, self.expert_down_kernel]
        legacy += [self.expert_up_bias, self.expert_down_bias, router.noise_kernel]
        legacy = [v for v in legacy if v is not None]
        legacy += [router.routing_stats_last, router.routing_stats_sum]
        router_lib.load_own_variables(self, store, legacy)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {
            "intermediate_dim": self.intermediate_dim,
            "n_experts": self.n_experts,
            "activation": keras.activations.serialize(self.activation),
            "gated": self.gated,
            "use_bias": self.use_bias,
            "router_bias": self.router_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "router_initializer": keras.initializers.serialize(self.router_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "top_k": self.top_k,
            "normalize_top_k": self.normalize_top_k,
            "capacity_factor": self.capacity_factor,
            "noisy_gating": self.noisy_gating,
            "load_balance_weight": self.load_balance_weight,
            "router_z_loss_weight": self.router_z_loss_weight,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}
