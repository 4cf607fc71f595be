"""`TopKRouter`: the token-choice router of the sparse layers, as a sublayer."""

import keras
from keras import ops

from keras_moe import utils
from keras_moe.routing.balance import balanced_top_k_gates
from keras_moe.routing.balance import update_balance_bias
from keras_moe.routing.dispatch import DROPLESS_CAPACITY_FACTORS
from keras_moe.routing.dispatch import sparse_mixture
from keras_moe.routing.gates import ROUTER_DTYPES
from keras_moe.routing.gates import gate_logits
from keras_moe.routing.gates import noisy_logits
from keras_moe.routing.gates import router_dtype_of
from keras_moe.routing.gates import top_k_gates
from keras_moe.routing.losses import expert_counts
from keras_moe.routing.losses import load_balance_loss
from keras_moe.routing.losses import router_z_loss
from keras_moe.routing.losses import routing_statistics


@keras.saving.register_keras_serializable(package="keras_moe")
class TopKRouter(keras.layers.Layer):
    """Token-choice top-k router: logits, top-k, balancing losses, statistics.

    `z = x . W_r (+ b_r)` in float32 (or, with `router_dtype="compute"`, in
    the layer's compute dtype); each token picks the `top_k` experts of
    largest `z` with weights `softmax` over the chosen logits
    (`normalize_top_k=True`) or the full softmax's values at them. In
    training it adds the load-balancing loss `E * sum_i f_i * P_i` (`f_i`
    expert `i`'s share of the assignments, `P_i` its mean softmax
    probability; 1.0 at balance) and the router z-loss
    `mean(logsumexp(z)^2)` (ST-MoE), each times its weight, and with
    `noisy_gating` it adds `N(0, 1) * softplus(x . W_noise)` to the logits
    (Shazeer et al. 2017).

    The sparse layers (`DenseMoE` with `top_k`, `MoEFeedForward`) create one
    in their `build()` as the sublayer `router`; `call` decides the routing,
    `dispatch` runs the experts on their tokens (`routing.sparse_mixture`)
    with the router's `capacity_factor`. A custom layer uses it the same way.

    Routing statistics live in two non-trainable variables, float32 under
    every dtype policy (as is `balance_bias`), updated at every call (so
    they work under `jit_compile` and in JAX's stateless training step):
    `routing_stats_last`, the last call's
    `(expert loads..., dropped fraction, entropy)`, and `routing_stats_sum`,
    their running sums over the training calls since `reset_routing_stats`
    plus the number of calls. A frozen router (`trainable=False`, or its
    host layer frozen) keeps its state as `BatchNormalization` does: neither
    the running sums nor `balance_bias` move, even in training calls; only
    `routing_stats_last` reports each call.

    Args:
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, experts per token.
        normalize_top_k: If `True`, the chosen experts' weights are the
            softmax over their logits (they sum to one); if `False`, the
            full softmax's values at the chosen experts.
        capacity_factor: `None` (dropless: no token is ever dropped) or a
            positive float: each expert takes at most
            `ceil(capacity_factor * tokens * top_k / n_experts)` assignments
            (`<= tokens`) in `dispatch`, the others are dropped.
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
        router_dtype: `"float32"` (the default) or `"compute"`: the dtype
            of the logits, the softmax and the top-k weights. Float32 keeps
            the routing stable in mixed-precision training; `"compute"`
            (bfloat16 under `"mixed_bfloat16"`) reproduces a model that routes
            in its compute dtype, as KerasHub's MoE models do: a float32
            router picks other experts than such a model for the tokens whose
            logits bfloat16 rounds into another order. The losses and
            statistics are float32 either way.
        balance_bias_rate: Non-negative float. When positive, loss-free
            balancing (DeepSeek-V3, `routing.balance`): a non-trainable
            per-expert `balance_bias` `(E,)` is added to the logits for
            choosing the experts only (the weights come from the unbiased
            logits), and in every training call (of a trainable router) each
            expert's bias moves by
            `balance_bias_rate * sign(mean load - its load)`, outside the
            optimizer. Saved with the model; `routing_stats` reports it.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(tokens, d)` tensor.
        mask: Optional `(tokens,)` boolean mask: masked tokens count in no
            loss or statistic (and `dispatch` sends them to no expert).
        training: Python bool: losses and noise only when `True`.

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.top_k = utils.check_positive_int("top_k", top_k)
        if self.top_k > self.n_experts:
            raise ValueError(
                "`top_k` must be an integer from 1 to `n_experts`. "
                f"Received: top_k={top_k}, n_experts={n_experts}"
            )
        self.normalize_top_k = utils.check_bool("normalize_top_k", normalize_top_k)
        self.softmax_before_top_k = utils.check_bool(
            "softmax_before_top_k", softmax_before_top_k
        )
        self.router_dtype = utils.check_choice(
            "router_dtype", router_dtype, ROUTER_DTYPES
        )
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
        self.balance_bias_rate = utils.check_non_negative_float(
            "balance_bias_rate", balance_bias_rate
        )
        self.use_bias = utils.check_bool("use_bias", use_bias)
        self.balance_bias = None
        self.kernel_initializer = utils.get_initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = utils.get_initializer(
            "bias_initializer", bias_initializer
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
        self.seed = None
        if seed is not None:
            self.seed = utils.check_positive_int("seed", seed, minimum=0)
        self.seed_generator = None
        if self.noisy_gating:
            self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.input_spec = keras.layers.InputSpec(ndim=2)
        # Masked tokens take part in no loss, statistic or dispatch; the
        # outputs keep the tokens' mask.
        self.supports_masking = True
        # Set by a host layer that loaded this router's variables itself from
        # a keras-moe 0.1.0 file, where they were the host's own.
        self._loaded_by_host = False

    def build(self, input_shape):
        input_dim = tuple(input_shape)[-1]
        if input_dim is None:
            raise ValueError(
                "The last axis of the input of `TopKRouter` must be defined. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        # The router stays in float32 under mixed precision: no autocast.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.n_experts),
            initializer=utils.initializer_for(self.kernel_initializer, "kernel"),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            autocast=False,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.n_experts,),
                initializer=utils.initializer_for(self.bias_initializer, "bias"),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                autocast=False,
            )
        self.noise_kernel = None
        if self.noisy_gating:
            # Zero-initialised as in Shazeer et al.: softplus(0) noise at first.
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_dim, self.n_experts),
                initializer="zeros",
                autocast=False,
            )
        self.routing_stats_last = self.add_weight(
            name="routing_stats_last",
            shape=(self.n_experts + 2,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        self.routing_stats_sum = self.add_weight(
            name="routing_stats_sum",
            shape=(self.n_experts + 3,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        # Created last: the variables before it keep their saved positions.
        self.balance_bias = None
        if self.balance_bias_rate:
            self.balance_bias = self.add_weight(
                name="balance_bias",
                shape=(self.n_experts,),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                autocast=False,
            )
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: input_dim})

    @property
    def logits_dtype(self):
        """The dtype of the logits and weights: float32, or the compute dtype
        with `router_dtype="compute"`."""
        return router_dtype_of(self.router_dtype, self.compute_dtype)

    def logits(self, inputs, training=None):
        """Router logits `(tokens, E)` in `logits_dtype`, with the noise in
        training."""
        logits = gate_logits(inputs, self.kernel, self.bias, dtype=self.logits_dtype)
        if self.noisy_gating and training:
            logits = noisy_logits(
                logits, inputs, self.noise_kernel, self.seed_generator
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
        # A frozen router's state does not move (as `BatchNormalization`'s).
        moves = training and self.trainable
        if moves and self.balance_bias is not None:
            update_balance_bias(self.balance_bias, counts, self.balance_bias_rate)
        if training:
            if self.load_balance_weight:
                loss = load_balance_loss(probs, counts, mask)
                self.add_loss(self.load_balance_weight * loss)
            if self.router_z_loss_weight:
                self.add_loss(self.router_z_loss_weight * router_z_loss(logits, mask))
        stats = routing_statistics(counts, ops.zeros((), "float32"), logits, mask)
        self.routing_stats_last.assign(stats)
        if moves:
            ones = ops.ones((1,), "float32")
            self.routing_stats_sum.assign_add(ops.concatenate([stats, ones]))
        return weights, experts

    def dispatch(
        self,
        inputs,
        weights,
        experts,
        expert_fn,
        mask=None,
        training=None,
        layout="auto",
        dropless_capacity_factors=DROPLESS_CAPACITY_FACTORS,
    ):
        """Runs the experts on their tokens and mixes them: `(tokens, m)`.

        `routing.sparse_mixture` with this router's `n_experts` and
        `capacity_factor`, on the `(weights, experts)` that `call` returned;
        with a `capacity_factor`, the share of assignments dropped goes into
        the routing statistics (in training calls, their running sums).
        `training`, `layout` and `dropless_capacity_factors` are
        `sparse_mixture`'s (`training` picks the dropless layout).
        """
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        outputs, _, dropped = sparse_mixture(
            inputs,
            experts,
            weights,
            self.n_experts,
            expert_fn,
            capacity_factor=self.capacity_factor,
            mask=mask,
            layout=layout,
            dropless_capacity_factors=dropless_capacity_factors,
            training=training,
        )
        if self.capacity_factor is not None:
            at = ops.cast(ops.arange(self.n_experts + 2) == self.n_experts, "float32")
            dropped = ops.stop_gradient(ops.cast(dropped, "float32"))
            last = self.routing_stats_last.value
            self.routing_stats_last.assign(last * (1.0 - at) + at * dropped)
            if training and self.trainable:
                at = ops.concatenate([at, ops.zeros((1,), "float32")])
                self.routing_stats_sum.assign_add(at * dropped)
        return outputs

    def _stats_dict(self, values):
        n = self.n_experts
        stats = {
            "expert_load": values[:n],
            "dropped_fraction": float(values[n]),
            "router_entropy": float(values[n + 1]),
        }
        if self.balance_bias is not None:
            stats["balance_bias"] = ops.convert_to_numpy(self.balance_bias.value)
        return stats

    @property
    def routing_stats(self):
        """Statistics of the last call, as NumPy: `expert_load` (each
        expert's share of the assignments), `dropped_fraction` and
        `router_entropy` (mean entropy in nats of the full softmax); with
        `balance_bias_rate`, also `balance_bias` (its current value)."""
        if not self.built:
            raise ValueError(
                "A router has no routing statistics before it is built and "
                f"called. Received: {self.name!r} with built=False"
            )
        return self._stats_dict(ops.convert_to_numpy(self.routing_stats_last.value))

    def routing_stats_mean(self):
        """Mean routing statistics over the training calls since the last
        `reset_routing_stats` (`None` if there were none), plus `steps`."""
        values = ops.convert_to_numpy(self.routing_stats_sum.value)
        steps = float(values[-1])
        if steps == 0:
            return None
        stats = self._stats_dict(values[:-1] / steps)
        stats["steps"] = int(round(steps))
        return stats

    def reset_routing_stats(self):
        """Zeroes the running sums behind `routing_stats_mean`."""
        self.routing_stats_sum.assign(ops.zeros(self.routing_stats_sum.shape))

    def load_own_variables(self, store):
        if self._loaded_by_host and not len(store.keys()):
            return
        super().load_own_variables(store)

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
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "normalize_top_k": self.normalize_top_k,
            "softmax_before_top_k": self.softmax_before_top_k,
            "router_dtype": self.router_dtype,
            "capacity_factor": self.capacity_factor,
            "noisy_gating": self.noisy_gating,
            "load_balance_weight": self.load_balance_weight,
            "router_z_loss_weight": self.router_z_loss_weight,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "seed": self.seed,
            "balance_bias_rate": self.balance_bias_rate,
        }
        return {**super().get_config(), **config}


def load_own_variables(layer, store, legacy_variables):
    """`layer.load_own_variables(store)` that also reads keras-moe 0.1.0 files.

    Until 0.1.0 the router's variables were the host layer's own, saved
    among them in the order `legacy_variables` lists. A store holding that
    many variables is read in that order, and the router is told that its
    variables are loaded (its own store in such a file is empty).
    """
    own = layer._trainable_variables + layer._non_trainable_variables
    if len(store.keys()) == len(legacy_variables) != len(own):
        for i, variable in enumerate(legacy_variables):
            variable.assign(store[str(i)])
        layer.router._loaded_by_host = True
        return
    keras.layers.Layer.load_own_variables(layer, store)
