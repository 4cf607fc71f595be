"""`sparse_mixture`: each token through its chosen experts only, mixed back."""

import keras
from keras import ops

from keras_moe import backend
from keras_moe.routing.groups import distribution_groups
from keras_moe.routing.layouts import Assignments
from keras_moe.routing.layouts import BlockLayout
from keras_moe.routing.layouts import CapacityLayout
from keras_moe.routing.layouts import EmptyLayout
from keras_moe.routing.layouts import RowLayout
from keras_moe.routing.layouts import default_block_size
from keras_moe.routing.layouts import expert_capacity

# Dropless mode first tries capacity buffers of these factors (exact, as long
# as every expert's group fits, which `ops.cond` checks at run time) and falls
# back to the padded blocks only for the rare batch that overflows them all.
DROPLESS_CAPACITY_FACTORS = (1.25, 1.5, 2.0)

# The values of `sparse_mixture`'s `layout` argument.
LAYOUTS = ("auto", "capacity", "blocks", "rows")


def _grouped_matmul():
    """The backend's grouped matmul if it can run now, else None."""
    grouped_matmul = backend.fast_path("grouped_matmul")
    usable = backend.fast_path("grouped_matmul_usable")
    if grouped_matmul is None or (usable is not None and not usable()):
        return None
    return grouped_matmul


def sparse_mixture(
    tokens,
    experts,
    weights,
    n_experts,
    expert_fn,
    capacity_factor=None,
    mask=None,
    layout="auto",
    dropless_capacity_factors=DROPLESS_CAPACITY_FACTORS,
    training=None,
):
    """Runs each token through its chosen experts only and mixes the results.

    `y[t] = sum_j w[t, j] * expert_{e[t, j]}(x[t])`, with `expert_fn`
    applied once to every expert's gathered tokens in a static-shaped layout
    (no loop over experts; see `keras_moe.routing.layouts`).

    Args:
        tokens: `(n, d)` inputs of the experts.
        experts: `(n, k)` int32 chosen experts (from `top_k_gates`).
        weights: `(n, k)` weights of the chosen experts.
        n_experts: Python int.
        expert_fn: `fn(layout, x) -> h`: the experts applied to the gathered
            rows `x`, using `layout.matmul(x, kernel)` for `(e, d, m)`
            kernels and `layout.add_bias(x, bias)` for `(e, m)` biases.
        capacity_factor: `None` (dropless) or a positive float: each expert
            takes `ceil(capacity_factor * n * k / e)` assignments (at most
            `n`: `expert_capacity`), the rest are dropped (zero). Under a `keras.distribution`
            with a batch axis, `n` is the tokens of one batch shard: each
            shard routes its own tokens (`distribution_groups`).
        mask: optional `(n,)` bool; masked tokens are not dispatched, their
            output is zero and they are not counted in `group_sizes`.
        layout: how the dropless mode lays the rows out (with a
            `capacity_factor`, always the capacity buffer):
            - `"auto"`: `"rows"` where the backend has a grouped matmul
              (PyTorch; JAX on a GPU: `jax.lax.ragged_dot`); else `"blocks"` when `training` is true, outside a
              `keras.distribution`, for tokens of at most twice the block
              size's features (256 at most; each block copies its
              expert's weights, which for wider tokens outweigh the rows);
              `"capacity"` otherwise. The capacity tiers' run-time
              `ops.cond` is cheap forward but costs in the backward (the
              gradient of a conditional keeps every branch's
              intermediates), the blocks the reverse.
            - `"capacity"`: the smallest capacity buffer of
              `dropless_capacity_factors` that holds every expert's group
              (checked at run time with `ops.cond`), else padded blocks;
              under a `keras.distribution` the last tier is a buffer of `n`
              slots per expert instead of the blocks, which holds any routing
              and keeps the expert weights where they are sharded.
            - `"blocks"`: each expert's group padded to a multiple of a block.
            - `"rows"`: the sorted rows, for the backend's grouped matmul
              (`ValueError` where the backend has none).
        dropless_capacity_factors: the capacity tiers of `layout="capacity"`.
        training: whether this is a training call (chooses `"auto"`'s
            layout; the outputs are the same).

    Returns:
        `(outputs, group_sizes, dropped_fraction)`: `(n, m)` outputs, `(e,)`
        int32 assignments per expert, float32 dropped share of the routed
        assignments (0 in dropless mode, and when nothing was routed).
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"`layout` must be one of {list(LAYOUTS)}. Received: layout={layout!r}"
        )
    if experts.shape[0] == 0:
        empty = EmptyLayout(experts.shape[-1])
        outputs = _run_empty(empty, tokens, expert_fn)
        return outputs, ops.zeros((n_experts,), "int32"), empty.dropped_fraction
    groups, constrain = distribution_groups(experts.shape[0])
    if groups > 1:
        # Each batch shard routes its own tokens (GShard's groups): group `g`'s
        # assignments to expert `e` go to the virtual expert `g * e_count + e`,
        # so one sort makes a `(groups, experts, capacity)` buffer whose
        # blocks live where both the group's tokens and the expert's weights
        # are.
        per_group = experts.shape[0] // groups
        group = ops.arange(experts.shape[0], dtype="int32") // per_group
        experts = experts + ops.expand_dims(group * n_experts, 1)
    a = Assignments(experts, weights, groups * n_experts, mask)
    # Tokens per group: a scalar tensor for a dynamic batch (TensorFlow's
    # graph mode), which never has groups.
    group_tokens = a.n_tokens // groups
    group_sizes = a.group_sizes
    if groups > 1:
        group_sizes = ops.sum(ops.reshape(group_sizes, (groups, n_experts)), axis=0)

    def run(plan):
        return plan.combine(expert_fn(plan, plan.gather(tokens)))

    def capacity_layout(capacity):
        return CapacityLayout(a, capacity, groups, constrain)

    def nonempty(compute):
        # A dynamic token count (TensorFlow's graph mode) may be 0 at run time.
        if isinstance(a.total, int):
            return compute()
        empty = EmptyLayout(a.top_k)
        return ops.cond(
            a.total > 0, compute, lambda: _run_empty(empty, tokens, expert_fn)
        )

    dropped = ops.zeros((), "float32")
    if capacity_factor is not None:
        capacity = expert_capacity(group_tokens, a.top_k, n_experts, capacity_factor)
        plan = capacity_layout(capacity)
        return nonempty(lambda: run(plan)), group_sizes, plan.dropped_fraction
    grouped_matmul = _grouped_matmul()
    if layout == "rows" and grouped_matmul is None:
        raise ValueError(
            "`layout='rows'` needs a backend grouped matmul, which the "
            f"{keras.backend.backend()!r} backend does not have here. "
            f"Received: layout={layout!r}"
        )
    if layout in ("auto", "rows") and grouped_matmul is not None:
        return run(RowLayout(a, grouped_matmul)), group_sizes, dropped
    distributed = keras.distribution.distribution() is not None
    if layout == "blocks" or (
        layout == "auto"
        and training
        and not distributed
        and _narrow(tokens, a.total, n_experts)
    ):
        return nonempty(lambda: run(BlockLayout(a))), group_sizes, dropped

    factors = tuple(dropless_capacity_factors)
    if distributed:
        # Under a distribution the blocks would copy every block's expert
        # weights onto each device (an all-reduce of expert weights). The last
        # tier is instead a buffer that holds every assignment (an expert
        # takes each token at most once: `n` slots), sharded like the others.
        factors = factors + (n_experts / a.top_k,)

    def exact(factors):
        # The run-time choice needs a static token count (a dynamic one, as in
        # TensorFlow's graph mode, goes straight to the blocks).
        if not factors or not isinstance(a.total, int):
            return lambda: run(BlockLayout(a))
        capacity = expert_capacity(group_tokens, a.top_k, n_experts, factors[0])
        if isinstance(capacity, int) and capacity >= group_tokens:
            return lambda: run(capacity_layout(capacity))
        return lambda: ops.cond(
            a.max_group_size <= capacity,
            lambda: run(capacity_layout(capacity)),
            exact(factors[1:]),
        )

    return nonempty(exact(factors)), group_sizes, dropped


def _narrow(tokens, n_assignments, n_experts):
    """Whether the tokens are narrow enough for the blocks in training: each
    block copies its expert's weights (`d x m` per kernel), which costs
    about `d / block` times the memory of the block's rows; up to `d` of
    twice the block size that is at most about the rows' own. (At
    Mixtral 8x7B's width, d=4096, it would be 30 times: wider tokens take
    the capacity tiers.)"""
    d = tokens.shape[-1]
    return d is not None and d <= 2 * default_block_size(n_assignments, n_experts)


def _run_empty(empty, tokens, expert_fn):
    return empty.combine(expert_fn(empty, empty.gather(tokens)))
