import keras
from keras import ops

from keras_moe import utils
from keras_moe.routing.groups import distribution_groups
from keras_moe.routing.soft_slots import soft_slot_logits
from keras_moe.routing.soft_slots import soft_slot_statistics
from keras_moe.routing.soft_slots import soft_slot_weights
from keras_moe.routing.statistics import add_routing_stats_weights
from keras_moe.routing.statistics import last_routing_stats
from keras_moe.routing.statistics import mean_routing_stats
from keras_moe.routing.statistics import record_routing_stats
from keras_moe.routing.statistics import reset_routing_stats


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftMoE(keras.layers.Layer):
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
    (nats) of each token's shares over the experts. They live in two
    non-trainable float32 variables, `routing_stats_last` and
    `routing_stats_sum`, as in the sparse layers' routers; the running sums
    do not move in a frozen layer (`trainable=False`).

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
        bias_initializer: Initializer of the expert biases, each drawing its
            own values.
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

    Weights (expert axis first): `router_kernel` `(d, E * S)`,
    `router_scale` `()` (with `normalize`), `expert_up_kernel` `(E, d, m)`,
    `expert_gate_kernel` `(E, d, m)` (when gated), `expert_down_kernel`
    `(E, m, d)`, `expert_up_bias` `(E, m)`, `expert_down_bias` `(E, d)`, and
    the non-trainable `routing_stats_last` and `routing_stats_sum`.

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
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "`SoftMoE` expects an input of rank 3 `(batch, tokens, d)` with "
                f"a defined last axis. Received: input_shape={input_shape}"
            )
        d, m, e = input_shape[-1], self.intermediate_dim, self.n_experts
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
        self.expert_up_kernel = self.add_weight(
            name="expert_up_kernel",
            shape=(e, d, m),
            initializer=utils.initializer_for(
                self.kernel_initializer, "expert_up_kernel"
            ),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.expert_gate_kernel = None
        if self.gated:
            self.expert_gate_kernel = self.add_weight(
                name="expert_gate_kernel",
                shape=(e, d, m),
                initializer=utils.initializer_for(
                    self.kernel_initializer, "expert_gate_kernel"
                ),
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
            )
        self.expert_down_kernel = self.add_weight(
            name="expert_down_kernel",
            shape=(e, m, d),
            initializer=utils.initializer_for(
                self.kernel_initializer, "expert_down_kernel"
            ),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.expert_up_bias = None
        self.expert_down_bias = None
        if self.use_bias:
            self.expert_up_bias = self.add_weight(
                name="expert_up_bias",
                shape=(e, m),
                initializer=utils.initializer_for(
                    self.bias_initializer, "expert_up_bias"
                ),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
            self.expert_down_bias = self.add_weight(
                name="expert_down_bias",
                shape=(e, d),
                initializer=utils.initializer_for(
                    self.bias_initializer, "expert_down_bias"
                ),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        add_routing_stats_weights(self, e)
        self.input_spec = keras.layers.InputSpec(ndim=3, axes={-1: d})

    def _experts(self, slots, constrain):
        """The experts on their slots `(b, E, S, d)` -> `(b, E, S, d)`.

        Einsum legend: `b` sequences, `e` experts, `s` slots, `d` inputs,
        `m` hidden units.
        """

        def matmul(x, kernel):
            kernel = ops.cast(kernel, x.dtype)
            return constrain(ops.einsum("besd,edm->besm", x, kernel))

        def add_bias(x, bias):
            return x + ops.expand_dims(ops.cast(bias, x.dtype), 1)

        h = matmul(slots, self.expert_up_kernel)
        if self.expert_up_bias is not None:
            h = add_bias(h, self.expert_up_bias)
        if self.gated:
            h = self.activation(matmul(slots, self.expert_gate_kernel)) * h
        else:
            h = self.activation(h)
        y = matmul(h, self.expert_down_kernel)
        if self.expert_down_bias is not None:
            y = add_bias(y, self.expert_down_bias)
        return y

    def call(self, inputs, mask=None, training=None):
        # Keras autocasts float inputs only; integer ones are computed as floats.
        inputs = ops.cast(inputs, self.compute_dtype)
        if mask is not None:
            mask = ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(inputs)[:-1])
        e, s = self.n_experts, self.slots_per_expert
        d = self.expert_up_kernel.shape[1]
        logits = soft_slot_logits(inputs, self.router_kernel, self.router_scale)
        dispatch, combine = soft_slot_weights(logits, mask)
        # Under a `keras.distribution`, each device runs its experts on its
        # batch shard's slots (`(batch, expert, ...)` layout).
        _, constrain = distribution_groups(inputs.shape[0])
        constrain = constrain or (lambda x: x)
        dtype = inputs.dtype
        slots = ops.einsum("bns,bnd->bsd", ops.cast(dispatch, dtype), inputs)
        slots = constrain(ops.reshape(slots, (-1, e, s, d)))
        outputs = ops.reshape(self._experts(slots, constrain), (-1, e * s, d))
        outputs = ops.einsum("bns,bsd->bnd", ops.cast(combine, dtype), outputs)
        stats = soft_slot_statistics(combine, e, mask)
        record_routing_stats(self, stats, training)
        return outputs

    @property
    def routing_stats(self):
        """Statistics of the last call, as NumPy: `expert_load` (each
        expert's share of the combine weights), `dropped_fraction` (0) and
        `router_entropy` (mean entropy in nats of each token's shares)."""
        return last_routing_stats(self, self.n_experts)

    def routing_stats_mean(self):
        """Mean statistics over the training calls since the last
        `reset_routing_stats` (`None` if there were none), plus `steps`."""
        return mean_routing_stats(self, self.n_experts)

    def reset_routing_stats(self):
        """Zeroes the running sums behind `routing_stats_mean`."""
        reset_routing_stats(self)

    def expert_weight_axes(self):
        """Weight name -> its experts axis (`keras_moe.expert_parallel_layout_map`)."""
        names = ["expert_up_kernel", "expert_down_kernel"]
        if self.gated:
            names.append("expert_gate_kernel")
        if self.use_bias:
            names += ["expert_up_bias", "expert_down_bias"]
        return {name: 0 for name in names}

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
        }
        return {**super().get_config(), **config}
