import keras
from keras import ops

from keras_moe import distribution
from keras_moe import saved_formats
from keras_moe import utils
from keras_moe.layers.feed_forward_experts import FeedForwardExperts
from keras_moe.routing.groups import distribution_groups
from keras_moe.routing.layouts import ExpertAxisLayout
from keras_moe.routing.soft_slots import soft_slot_logits
from keras_moe.routing.soft_slots import soft_slot_statistics
from keras_moe.routing.soft_slots import soft_slot_weights
from keras_moe.routing.statistics import RoutingStatistics


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftMoE(saved_formats.LegacyLoading, keras.layers.Layer):
    """Soft mixture of experts (Puigcerver et al. 2023) on token sequences.

    Per sequence `X` `(n, d)`: logits `L = X . Phi` `(n, E * S)` with the
    `router_kernel` `Phi` (slot `j` of expert `e` at column `e * S + j`,
    `S = slots_per_expert`), dispatch weights `D = softmax(L)` over the
    tokens, combine weights `C = softmax(L)` over the slots; slot `i` takes
    the input `(D^T X)_i`, a convex combination of the tokens, and expert
    `i // S` runs it; the output is `Y = C . slot_outputs`. Each expert is
    `down(act(x . gate) * (x . up))` when `gated`, else `down(act(x . up))`
    (with biases when `use_bias`), as in `MoEFeedForward`. With `normalize`
    (the paper's choice), `L = scale * l2n(X) . l2n(Phi)`: every token and
    every column of `Phi` scaled to unit norm, times a learned scalar
    `router_scale` (initially 1). The logits and both softmaxes run in
    float32 under any dtype policy.

    Fully differentiable, no token is dropped and no balancing loss is
    needed; the experts run `E * S` slots per sequence whatever its length
    (`S = top_k * n / E` matches the compute of token-choice top-k). The
    slots mix the tokens of a sequence, so, as the paper says, it is not
    causal: a decoder must not use it for autoregressive inference as it is.

    Statistics (every token reaches every expert, so these are about the
    combine weights): `routing_stats` reports as `expert_load` each expert's
    share of the combine weights (mean over the tokens of the sum over its
    slots), `dropped_fraction` 0, and as `router_entropy` the mean entropy
    (nats) of each token's shares over the experts. They live in a
    `keras_moe.routing.RoutingStatistics` sublayer, `statistics`, as in the
    sparse layers' routers; the running sums do not move in a frozen layer
    (`trainable=False`).

    Args:
        intermediate_dim: Positive integer, hidden size `m` of each expert.
        n_experts: Positive integer, number of experts `E`.
        slots_per_expert: Positive integer, slots `S` each expert runs per
            sequence.
        activation: Activation of the hidden layer (`"gelu"`).
        gated: Whether each expert is a gated linear unit (GLU).
        use_bias: Whether the experts have biases.
        normalize: Whether the logits are those of the l2-normalised tokens
            and slot parameters times a learned scale (the paper's choice);
            `False` is `L = X . Phi` exactly.
        kernel_initializer: Initializer of the expert kernels; each kernel
            draws its own values, also from a seeded initializer
            (`keras_moe.utils.initializer_for`).
        bias_initializer: Initializer of the expert biases.
        router_initializer: Initializer of the router kernel `Phi`.
        kernel_regularizer: Regularizer of the expert kernels.
        bias_regularizer: Regularizer of the expert biases.
        kernel_constraint: Constraint of the expert kernels.
        bias_constraint: Constraint of the expert biases.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of shape `(batch, tokens, d)`.
        mask: Optional boolean mask `(batch, tokens)`: masked tokens take no
            part in any slot's input, their output is zero and they count
            in no statistic.
        training: Python bool: the running statistics only when `True`.

    Input shape:
        3D tensor `(batch_size, tokens, d)`.

    Output shape:
        Same as the input.

    Weights: `router_kernel` `(d, E * S)` and `router_scale` `()` (with
    `normalize`); the sublayer `experts`, a `FeedForwardExperts` (its
    `up_kernel` `(E, d, m)`, ...); the sublayer `statistics`, a
    `keras_moe.routing.RoutingStatistics`.

    Example:

    >>> import numpy as np
    >>> from keras_moe import SoftMoE
    >>> layer = SoftMoE(32, n_experts=4, slots_per_expert=2)
    >>> tuple(layer(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    >>> sorted(layer.routing_stats)
    ['dropped_fraction', 'expert_load', 'router_entropy']

    References:
        - Puigcerver et al., "From Sparse to Soft Mixtures of Experts",
          ICLR 2024 (arXiv:2308.00951, 2023).
    """

    def __init__(
        self,
        intermediate_dim,
        n_experts,
        slots_per_expert=1,
        activation="gelu",
        gated=False,
        use_bias=True,
        normalize=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="lecun_normal",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = utils.check_positive_int(
            "intermediate_dim", intermediate_dim
        )
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.slots_per_expert = utils.check_positive_int(
            "slots_per_expert", slots_per_expert
        )
        self.activation = utils.get_activation("activation", activation)
        self.gated = utils.check_bool("gated", gated)
        self.use_bias = utils.check_bool("use_bias", use_bias)
        self.normalize = utils.check_bool("normalize", normalize)
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
        self.experts = FeedForwardExperts(
            self.intermediate_dim,
            self.n_experts,
            activation=self.activation,
            gated=self.gated,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
            name="experts",
        )
        self.statistics = RoutingStatistics(self.n_experts, name="statistics")
        if not self.trainable:
            # Frozen by its constructor, before its sublayers were made: its
            # experts do not train and its statistics do not move.
            self.experts.trainable = False
            self.statistics.trainable = False
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "`SoftMoE` expects an input of rank 3 `(batch, tokens, d)` with "
                f"a defined last axis. Received: input_shape={input_shape}"
            )
        d, e = input_shape[-1], self.n_experts
        # The router stays in float32 under mixed precision: no autocast.
        self.router_kernel = self.add_weight(
            name="router_kernel",
            shape=(d, e * self.slots_per_expert),
            initializer=utils.initializer_for(self.router_initializer, "router_kernel"),
            autocast=False,
        )
        self.router_scale = None
        if self.normalize:
            self.router_scale = self.add_weight(
                name="router_scale", shape=(), initializer="ones", autocast=False
            )
        self.experts.build((None, e, self.slots_per_expert, d))
        self.statistics.build()
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: d})

    def call(self, inputs, mask=None, training=None):
        # Keras autocasts float inputs only; integer ones are computed as floats.
        inputs = ops.cast(inputs, self.compute_dtype)
        if mask is not None:
            mask = ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(inputs)[:-1])
        e, s = self.n_experts, self.slots_per_expert
        d = inputs.shape[-1]
        logits = soft_slot_logits(inputs, self.router_kernel, self.router_scale)
        dispatch, combine = soft_slot_weights(logits, mask)
        # Under a `keras.distribution`, each device runs its experts on its
        # batch shard's slots (`(batch, expert, ...)` layout).
        _, constrain = distribution_groups(inputs.shape[0], distribution.expert_axis())
        constrain = constrain or (lambda x: x)
        dtype = inputs.dtype
        slots = ops.einsum("bns,bnd->bsd", ops.cast(dispatch, dtype), inputs)
        slots = constrain(ops.reshape(slots, (-1, e, s, d)))
        outputs = self.experts(slots, layout=_SlotLayout(constrain))
        outputs = ops.reshape(outputs, (-1, e * s, d))
        outputs = ops.einsum("bns,bsd->bnd", ops.cast(combine, dtype), outputs)
        stats = soft_slot_statistics(combine, e, mask)
        self.statistics.record(**stats, training=training)
        return outputs

    @property
    def routing_stats(self):
        """Statistics of the last call, as NumPy: `expert_load` (each
        expert's share of the combine weights), `dropped_fraction` (0) and
        `router_entropy` (mean entropy in nats of each token's shares)."""
        if not self.built:
            raise ValueError(
                "A layer has no routing statistics before it is built and "
                f"called. Received: {self.name!r} with built=False"
            )
        return self.statistics.last()

    def routing_stats_mean(self):
        """Mean statistics over the training calls since the last
        `reset_routing_stats` (`None` if there were none), plus `steps`."""
        return self.statistics.mean()

    def reset_routing_stats(self):
        """Zeroes the running sums behind `routing_stats_mean`."""
        self.statistics.reset()

    def load_legacy_variables(self, store, version):
        """Reads a store written by 0.2.0: the router's, the experts' and
        the packed routing statistics, all among the layer's own."""
        own = [self.router_kernel]
        if self.router_scale is not None:
            own.append(self.router_scale)
        variables = own + list(self.experts.weights)
        n = len(variables)
        if len(store.keys()) != n + 2:
            saved_formats.assign_in_order(store, variables)  # raises
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])
        self.statistics.assign_packed(store[str(n)], store[str(n + 1)])
        saved_formats.restored(self.experts)
        saved_formats.restored(self.statistics)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {
            "intermediate_dim": self.intermediate_dim,
            "n_experts": self.n_experts,
            "slots_per_expert": self.slots_per_expert,
            "activation": keras.activations.serialize(self.activation),
            "gated": self.gated,
            "use_bias": self.use_bias,
            "normalize": self.normalize,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "router_initializer": keras.initializers.serialize(self.router_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "format_version": saved_formats.FORMAT_VERSION,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        version = saved_formats.config_format(config)
        layer = cls(**config)
        saved_formats.expect_format(layer, version)
        return layer


class _SlotLayout(ExpertAxisLayout):
    """Soft MoE's `(b, E, S, d)` slots, laid out by `constrain` under a
    `keras.distribution` (each device runs its experts on its batch shard's
    slots)."""

    def __init__(self, constrain):
        super().__init__()
        self._constrain = constrain

    def matmul(self, x, kernel):
        return self._constrain(super().matmul(x, kernel))
