"""Expert-choice routing (Zhou et al. 2022): each expert picks its tokens.

`S = softmax(x . W_r)` over the experts, in float32. Expert `e` takes the
`c = ceil(capacity_factor * top_k * n / E)` tokens (at most `n`) of largest
`S[:, e]`, and `y_t = sum over the experts e that took t of
S[t, e] * expert_e(x_t)`; a token no expert took gets zero. With a mask, `n`
counts the unmasked tokens of the call only, so that padding never changes a
real token's output: the buffer keeps its static `c` of all tokens, and only
each expert's first `c` of the unmasked count (its best-scored tokens, all
unmasked) count (`kept_capacity`). `top_k` is the
average number of experts per token: the experts run `c * E ~ top_k * n`
rows, as token-choice top-k does, and every expert runs exactly `c` of them,
so the load is balanced by construction with no auxiliary loss.

Not causal: which tokens an expert takes depends on every token of the batch
(all positions of all sequences routed together), so a token's output
depends on later tokens. A decoder must not use it for autoregressive
inference as it is (the "Limitations" of Zhou et al. 2022).

The experts run on an `(E, c, d)` buffer, `ExpertChoiceLayout`, through the
same `expert_fn(layout, rows)` as `sparse_mixture`'s layouts (`matmul` of
`(E, d, m)` kernels, `add_bias` of `(E, m)` biases), so a layer's expert
function serves both routers unchanged.

Einsum legend: `e` experts, `c` capacity slots, `d` inputs, `m` outputs.
"""

import keras
from keras import ops

from keras_moe import utils
from keras_moe.routing.gates import gate_logits
from keras_moe.routing.layouts import Layout
from keras_moe.routing.layouts import expert_capacity
from keras_moe.routing.losses import router_entropy
from keras_moe.routing.losses import router_z_loss
from keras_moe.routing.statistics import add_routing_stats_weights
from keras_moe.routing.statistics import last_routing_stats
from keras_moe.routing.statistics import mean_routing_stats
from keras_moe.routing.statistics import record_routing_stats
from keras_moe.routing.statistics import reset_routing_stats


def expert_choice_capacity(n_tokens, top_k, n_experts, capacity_factor=None):
    """Tokens each expert takes: `min(n, ceil(f * top_k * n / E))`, `f = 1`
    when `capacity_factor` is None; at least 1 when there is a token.

    A Python int when `n_tokens` is one, else a scalar int32 tensor (a
    dynamic batch under TensorFlow's graph mode).
    """
    factor = 1.0 if capacity_factor is None else capacity_factor
    capacity = expert_capacity(n_tokens, top_k, n_experts, factor)
    if isinstance(n_tokens, int):
        return min(capacity, n_tokens)
    return ops.minimum(capacity, ops.cast(n_tokens, "int32"))


def counted_rows(tokens, mask=None, kept_capacity=None):
    """`(E, c)` bool: the rows of the buffer that count (an unmasked token,
    among its expert's first `kept_capacity` rows), or None when all do."""
    kept = None
    if mask is not None:
        mask = ops.cast(ops.reshape(mask, (-1,)), "bool")
        kept = ops.take(mask, tokens, axis=0)
    if kept_capacity is not None:
        c = tokens.shape[-1]
        rank = ops.arange(ops.shape(tokens)[-1] if c is None else c, dtype="int32")
        first = ops.expand_dims(rank < kept_capacity, 0)
        kept = first if kept is None else ops.logical_and(kept, first)
        kept = ops.broadcast_to(kept, ops.shape(tokens))
    return kept


def expert_choice_gates(logits, capacity, mask=None, kept_capacity=None):
    """Each expert's `capacity` tokens of highest softmax score.

    Args:
        logits: `(n, E)` router logits.
        capacity: Python int (or scalar tensor) `c <= n`, the buffer's rows
            per expert.
        mask: optional `(n,)` bool; an expert takes a masked token only when
            fewer than `c` tokens are unmasked, with weight 0 (and dispatch
            never runs it).
        kept_capacity: optional int or scalar tensor `<= c`: only each
            expert's first `kept_capacity` rows count, the others get weight
            0 (the router's capacity of the unmasked tokens).

    Returns:
        `(weights, tokens, probs)`: `(E, c)` float32 scores `S[t, e]` of the
        tokens each expert took (best first, 0 for the rows that do not
        count), `(E, c)` int32 token indices, and the `(n, E)` float32
        softmax `S`.
    """
    probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
    scores = ops.transpose(probs)
    if mask is not None:
        mask = ops.cast(ops.reshape(mask, (-1,)), "bool")
        # Below every probability: masked tokens are picked last.
        scores = ops.where(ops.expand_dims(mask, 0), scores, -1.0)
    weights, tokens = ops.top_k(scores, capacity)
    tokens = ops.cast(tokens, "int32")
    kept = counted_rows(tokens, mask, kept_capacity)
    if kept is not None:
        weights = ops.where(kept, weights, 0.0)
    return weights, tokens, probs


def _expert_axis_constrain():
    """Lays an `(E, c, ...)` buffer out over the mesh's expert axis (and the
    capacity over the batch axis where it divides), under a distribution
    whose layout map is `expert_parallel_layout_map`'s; else None."""
    distribution = keras.distribution.distribution()
    layout_map = getattr(distribution, "_layout_map", None)
    expert_axis = getattr(layout_map, "expert_axis", None)
    if expert_axis is None:
        return None
    mesh = distribution.device_mesh
    batch_axis = getattr(distribution, "batch_dim_name", None)
    batch_size = 1
    if batch_axis is not None:
        batch_size = mesh.shape[list(mesh.axis_names).index(batch_axis)]

    def constrain(x):
        capacity = x.shape[1]
        split = batch_size > 1 and isinstance(capacity, int)
        split = split and capacity % batch_size == 0
        axes = (expert_axis, batch_axis if split else None)
        axes += (None,) * (len(x.shape) - 2)
        layout = keras.distribution.TensorLayout(axes, mesh)
        return keras.distribution.distribute_tensor(x, layout)

    return constrain


class ExpertChoiceLayout(Layout):
    """The `(E, c, d)` buffer of expert-choice routing: expert `e`'s row `j`
    is token `tokens[e, j]`.

    `combine` sums every row back into its token, weighted:
    `y[t] = sum_{(e, j): tokens[e, j] = t} weights[e, j] * h[e, j]`, rows of
    masked tokens and rows past `kept_capacity` excluded.

    Args:
        weights: `(E, c)` weights of the rows.
        tokens: `(E, c)` int32 token of each row.
        n_tokens: Python int (or scalar tensor), number of tokens `n`.
        mask: optional `(n,)` bool; rows of masked tokens count for nothing.
        kept_capacity: optional int or scalar tensor: only each expert's
            first `kept_capacity` rows count (`expert_choice_gates`).
    """

    def __init__(self, weights, tokens, n_tokens, mask=None, kept_capacity=None):
        super().__init__(None)
        self.n_experts = tokens.shape[0]
        self.weights = weights
        self.n_tokens = n_tokens
        self._rows_token = ops.reshape(tokens, (-1,))
        self._shape = (self.n_experts, -1)
        self._kept = counted_rows(tokens, mask, kept_capacity)
        if self._kept is not None:
            self._kept = ops.reshape(self._kept, (-1,))
        self._constrain = _expert_axis_constrain() or (lambda x: x)

    def gather(self, tokens):
        return self._constrain(super().gather(tokens))

    def matmul(self, x, kernel, expert_axis=0):
        equation = "ecd,edm->ecm" if expert_axis == 0 else "ecd,dem->ecm"
        return self._constrain(ops.einsum(equation, x, ops.cast(kernel, x.dtype)))

    def add_bias(self, x, bias):
        return x + ops.expand_dims(ops.cast(bias, x.dtype), 1)

    def combine(self, expert_outputs):
        units = expert_outputs.shape[-1]
        rows = ops.reshape(expert_outputs, (-1, units))
        if isinstance(self.n_tokens, int) and self.n_tokens == 0:
            # An empty batch (PyTorch's segment_sum needs a row).
            return rows[:0]
        weights = ops.cast(ops.reshape(self.weights, (-1,)), rows.dtype)
        if self._kept is not None:
            # `where`, not a product: a masked token's row may hold anything.
            rows = ops.where(ops.expand_dims(self._kept, 1), rows, 0)
            weights = ops.where(self._kept, weights, ops.zeros_like(weights))
        summed = ops.segment_sum(
            rows * ops.expand_dims(weights, 1),
            self._rows_token,
            num_segments=self.n_tokens,
        )
        return ops.cast(summed, rows.dtype)


def expert_choice_mixture(
    inputs, weights, tokens, expert_fn, mask=None, kept_capacity=None
):
    """Runs each expert on the tokens it took and sums them back: `(n, m)`.

    Args:
        inputs: `(n, d)` inputs of the experts.
        weights: `(E, c)` weights (from `expert_choice_gates`).
        tokens: `(E, c)` int32 tokens each expert took.
        expert_fn: `fn(layout, x) -> h`, the experts on the `(E, c, d)`
            rows, as for `sparse_mixture`.
        mask: optional `(n,)` bool; masked tokens are run by no expert and
            their output is zero.
        kept_capacity: optional: only each expert's first `kept_capacity`
            rows count (`expert_choice_gates`).
    """
    n = inputs.shape[0]
    if n is None:
        n = ops.shape(inputs)[0]
    layout = ExpertChoiceLayout(weights, tokens, n, mask, kept_capacity)
    return layout.combine(expert_fn(layout, layout.gather(inputs)))


def expert_choice_statistics(weights, tokens, logits, mask=None, kept_capacity=None):
    """`(E + 2,)` float32: each expert's share of the routed rows that count
    (unmasked, within `kept_capacity`), the share of unmasked tokens that no
    expert took, and the mean router entropy (nats), without gradient."""
    n = logits.shape[0]
    if n is None:
        n = ops.shape(logits)[0]
    flat = ops.reshape(tokens, (-1,))
    valid = ops.ones((n,), "float32")
    if mask is not None:
        valid = ops.cast(ops.reshape(mask, (-1,)), "float32")
    counted = counted_rows(tokens, mask, kept_capacity)
    kept = ops.ones(ops.shape(flat), "float32")
    if counted is not None:
        kept = ops.cast(ops.reshape(counted, (-1,)), "float32")
    per_expert = ops.sum(ops.reshape(kept, ops.shape(tokens)), axis=1)
    load = per_expert / ops.maximum(ops.sum(per_expert), 1.0)
    dropped = ops.zeros((), "float32")
    if not isinstance(n, int) or n > 0:  # PyTorch's segment_sum needs a row
        taken = ops.segment_sum(kept, flat, num_segments=n) > 0
        dropped = ops.sum(valid * (1.0 - ops.cast(taken, "float32")))
        dropped = dropped / ops.maximum(ops.sum(valid), 1.0)
    scalars = ops.stack([dropped, router_entropy(logits, mask)])
    return ops.stop_gradient(ops.concatenate([load, scalars]))


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceRouter(keras.layers.Layer):
    """Expert-choice router (Zhou et al. 2022): each expert picks its tokens.

    `S = softmax(x . W_r (+ b_r))` over the experts, in float32; expert `e`
    takes the `c = ceil(capacity_factor * top_k * n / E)` tokens (at most
    `n`) of largest `S[:, e]` among the `n` unmasked tokens of the call, and
    `dispatch` computes `y_t = sum over the experts e that took t of
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

    Statistics, in two non-trainable float32 variables updated at every call
    (as `TopKRouter`'s): `routing_stats_last`, the last call's
    `(expert loads..., dropped fraction, entropy)`, and `routing_stats_sum`,
    their running sums over the training calls plus the number of calls
    (not in a frozen router, `trainable=False`: its state does not move).

    Args:
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, average experts per token.
        capacity_factor: `None` (1.0) or a positive float `f`, scaling the
            tokens each expert takes.
        router_z_loss_weight: Non-negative weight of the router z-loss
            `mean(logsumexp(z)^2)` (ST-MoE), added in training.
        use_bias: Whether the logits have a bias `b_r`.
        kernel_initializer: Initializer of the router kernel `W_r`.
        bias_initializer: Initializer of the router bias.
        kernel_regularizer: Regularizer of the router kernel.
        bias_regularizer: Regularizer of the router bias.
        kernel_constraint: Constraint of the router kernel.
        bias_constraint: Constraint of the router bias.
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
        capacity_factor=None,
        router_z_loss_weight=0.0,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
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
        self.capacity_factor = None
        if capacity_factor is not None:
            self.capacity_factor = utils.check_positive_float(
                "capacity_factor", capacity_factor
            )
        self.router_z_loss_weight = utils.check_non_negative_float(
            "router_z_loss_weight", router_z_loss_weight
        )
        self.use_bias = utils.check_bool("use_bias", use_bias)
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
        self.input_spec = keras.layers.InputSpec(ndim=2)

    def build(self, input_shape):
        input_dim = tuple(input_shape)[-1]
        if input_dim is None:
            raise ValueError(
                "The last axis of the input of `ExpertChoiceRouter` must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
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
        add_routing_stats_weights(self, self.n_experts)
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: input_dim})

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

    def logits(self, inputs, training=None):
        """Float32 router logits `(tokens, E)`."""
        return gate_logits(inputs, self.kernel, self.bias)

    def call(self, inputs, mask=None, training=None):
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        n = inputs.shape[0]
        if n is None:
            n = ops.shape(inputs)[0]
        logits = self.logits(inputs, training=training)
        kept = self.kept_capacity(mask)
        weights, tokens, _ = expert_choice_gates(logits, self.capacity(n), mask, kept)
        if training and self.router_z_loss_weight:
            self.add_loss(self.router_z_loss_weight * router_z_loss(logits, mask))
        stats = expert_choice_statistics(weights, tokens, logits, mask, kept)
        record_routing_stats(self, stats, training)
        return weights, tokens

    def dispatch(self, inputs, weights, tokens, expert_fn, mask=None, training=None):
        """Runs the experts on the tokens they took: `(tokens, m)`.

        `expert_choice_mixture` on the `(weights, tokens)` that `call`
        returned; `expert_fn(layout, rows)` is the same function a
        `TopKRouter.dispatch` takes.
        """
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        kept = self.kept_capacity(mask)
        return expert_choice_mixture(inputs, weights, tokens, expert_fn, mask, kept)

    @property
    def routing_stats(self):
        """Statistics of the last call, as NumPy: `expert_load` (each
        expert's share of the tokens taken: uniform, each takes `c` of the
        unmasked ones), `dropped_fraction` (the share of unmasked tokens
        that no expert took) and `router_entropy` (mean entropy in nats of
        the softmax over the experts)."""
        return last_routing_stats(self, self.n_experts)

    def routing_stats_mean(self):
        """Mean routing statistics over the training calls since the last
        `reset_routing_stats` (`None` if there were none), plus `steps`."""
        return mean_routing_stats(self, self.n_experts)

    def reset_routing_stats(self):
        """Zeroes the running sums behind `routing_stats_mean`."""
        reset_routing_stats(self)

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
        config = {
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
            "router_z_loss_weight": self.router_z_loss_weight,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
        }
        return {**super().get_config(), **config}
