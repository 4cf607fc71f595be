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

The experts run on an `(E, c, d)` buffer, `ExpertChoiceLayout`, a
`routing.layouts.Layout` like `sparse_mixture`'s, so an expert bank
(`keras_moe.layers.FeedForwardExperts`) serves both routers unchanged.

Einsum legend: `e` experts, `c` capacity slots, `d` inputs, `m` outputs.
"""

import keras
from keras import ops

from keras_moe.routing.dispatch import dispatch_runner
from keras_moe.routing.layouts import Layout
from keras_moe.routing.layouts import expert_capacity
from keras_moe.routing.losses import router_entropy


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


def _expert_axis_constrain(expert_axis):
    """Lays an `(E, c, ...)` buffer out over the mesh axis `expert_axis` (and
    the capacity over the batch axis where it divides), under the current
    distribution; None without an expert axis."""
    if expert_axis is None:
        return None
    distribution = keras.distribution.distribution()
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
        expert_axis: The mesh axis the experts are split over under a
            `keras.distribution` (`keras_moe.distribution.expert_axis()`), or
            None.
    """

    def __init__(
        self,
        weights,
        tokens,
        n_tokens,
        mask=None,
        kept_capacity=None,
        expert_axis=None,
    ):
        super().__init__(None)
        self.n_experts = tokens.shape[0]
        self.weights = weights
        self.n_tokens = n_tokens
        self._rows_token = ops.reshape(tokens, (-1,))
        self._shape = (self.n_experts, -1)
        self._kept = counted_rows(tokens, mask, kept_capacity)
        if self._kept is not None:
            self._kept = ops.reshape(self._kept, (-1,))
        self._constrain = _expert_axis_constrain(expert_axis) or (lambda x: x)

    def gather(self, tokens):
        return self._constrain(super().gather(tokens))

    def matmul(self, x, kernel):
        return self._constrain(super().matmul(x, kernel))

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
    inputs,
    weights,
    tokens,
    expert_bank,
    mask=None,
    kept_capacity=None,
    expert_axis=None,
):
    """Runs each expert on the tokens it took and sums them back: `(n, m)`.

    Args:
        inputs: `(n, d)` inputs of the experts.
        weights: `(E, c)` weights (from `expert_choice_gates`).
        tokens: `(E, c)` int32 tokens each expert took.
        expert_bank: The experts, a layer called as
            `expert_bank(rows, layout=layout)` on the `(E, c, d)` rows, as
            for `sparse_mixture`.
        mask: optional `(n,)` bool; masked tokens are run by no expert and
            their output is zero.
        kept_capacity: optional: only each expert's first `kept_capacity`
            rows count (`expert_choice_gates`).
        expert_axis: The mesh axis the experts are split over, or None
            (`ExpertChoiceLayout`).
    """
    n = inputs.shape[0]
    if n is None:
        n = ops.shape(inputs)[0]
    layout = ExpertChoiceLayout(weights, tokens, n, mask, kept_capacity, expert_axis)
    return layout.run(inputs, dispatch_runner(expert_bank))


def expert_choice_statistics(weights, tokens, logits, mask=None, kept_capacity=None):
    """The routing statistics of expert choice, float32 without gradient:
    `expert_load` `(E,)`, each expert's share of the routed rows that count
    (unmasked, within `kept_capacity`);
    `dropped_fraction`, the share of unmasked tokens that no expert took;
    `router_entropy`, the mean router entropy (nats)."""
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
    return {
        "expert_load": ops.stop_gradient(load),
        "dropped_fraction": ops.stop_gradient(dropped),
        "router_entropy": ops.stop_gradient(router_entropy(logits, mask)),
    }
