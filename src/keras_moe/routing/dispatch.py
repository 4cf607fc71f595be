"""Token-choice dispatch: which layout runs the experts, and running it.

`sparse_mixture` runs each token through its chosen experts only and mixes
the results back, in three steps a reader (and a test) can take apart:

1. `choose_layout`, a pure function of the sizes and the setting, names the
   layout (`LAYOUTS`);
2. `plan_dispatch` sorts the assignments by expert and makes that layout's
   plan (`keras_moe.routing.layouts`);
3. the plan gathers each expert's rows, the expert bank runs them
   (`bank(rows, layout=plan)`, see `keras_moe.layers.FeedForwardExperts`)
   and the plan combines the outputs per token.
"""

import inspect

import keras
from keras import ops

from keras_moe import backend
from keras_moe import utils
from keras_moe.routing.groups import distribution_groups
from keras_moe.routing.layouts import Assignments
from keras_moe.routing.layouts import BlockLayout
from keras_moe.routing.layouts import CapacityLayout
from keras_moe.routing.layouts import EmptyLayout
from keras_moe.routing.layouts import RowLayout
from keras_moe.routing.layouts import default_block_size
from keras_moe.routing.layouts import expert_capacity

# Dropless `"tiers"` first tries capacity buffers of these factors (exact, as
# long as every expert's group fits, which `ops.cond` checks at run time) and
# falls back to the padded blocks only for the rare batch that overflows them.
DROPLESS_CAPACITY_FACTORS = (1.25, 1.5, 2.0)

# The values of a router's `layout` (and of `sparse_mixture`'s):
# - "auto": `choose_layout` picks one of the others;
# - "capacity": a buffer of `capacity_factor`-sized slots per expert, the
#   overflow dropped (the only layout with a `capacity_factor`);
# - "tiers": dropless, the smallest capacity buffer of
#   `DROPLESS_CAPACITY_FACTORS` that holds every expert's group (chosen at
#   run time), else padded blocks;
# - "blocks": dropless, each expert's group padded to a multiple of a block;
# - "grouped": dropless, the sorted rows themselves, multiplied by the
#   backend's grouped matmul (PyTorch, JAX; `"auto"` takes it on PyTorch
#   and on a GPU under JAX).
LAYOUTS = ("auto", "capacity", "tiers", "blocks", "grouped")


def _renamed_layout(layout, capacity_factor):
    """0.2.0's names of two layouts, with a warning: `"rows"` (now
    `"grouped"`) and the dropless `"capacity"` (now `"tiers"`)."""
    new = {"rows": "grouped"}.get(layout)
    if layout == "capacity" and capacity_factor is None:
        new = "tiers"
    if new is None:
        return layout
    utils.warn_deprecated(
        f"layout={layout!r}" + (" without a capacity_factor" if new == "tiers" else ""),
        f"layout={new!r}",
        removed_in="0.4.0",
        stacklevel=3,
    )
    return new


def grouped_matmul():
    """`(matmul, preferred)`: the backend's grouped matmul if it can run now
    (else None), and whether `"auto"` takes it
    (`keras_moe.backend.grouped_matmul_preferred`: JAX's runs on a CPU, but
    only when asked for)."""
    if not backend.grouped_matmul_available():
        return None, False
    return backend.fast_path("grouped_matmul"), backend.grouped_matmul_preferred()


def check_layout(layout, capacity_factor):
    """`layout`, validated against `capacity_factor`."""
    layout = utils.check_choice("layout", layout, LAYOUTS)
    if capacity_factor is not None and layout not in ("auto", "capacity"):
        raise ValueError(
            f"`layout={layout!r}` is a dropless layout; with a "
            "`capacity_factor` the experts run in capacity buffers "
            "(`layout='capacity'` or `'auto'`). Received: "
            f"layout={layout!r}, capacity_factor={capacity_factor!r}"
        )
    if capacity_factor is None and layout == "capacity":
        raise ValueError(
            "`layout='capacity'` drops the assignments past each expert's "
            "capacity: it needs a `capacity_factor` (None is dropless). "
            "Received: layout='capacity', capacity_factor=None"
        )
    return layout


def choose_layout(
    layout,
    capacity_factor=None,
    training=None,
    features=None,
    n_assignments=None,
    n_experts=None,
    has_grouped_matmul=False,
    distributed=False,
    prefers_grouped_matmul=None,
):
    """The layout a dispatch runs: one of `"capacity"`, `"tiers"`,
    `"blocks"`, `"grouped"`.

    A pure function of the setting and the sizes. An explicit `layout` is
    kept; `"auto"` takes `"capacity"` with a `capacity_factor`, else
    `"grouped"` where the backend's grouped matmul can run
    (`has_grouped_matmul`) and is preferred (`prefers_grouped_matmul`),
    else `"blocks"` in training (`training`) outside a `keras.distribution`
    (`distributed`) for tokens of at most twice the block size's
    `features` (`default_block_size`; each block
    copies its expert's weights, which for wider tokens outweigh its rows;
    the capacity tiers' run-time `ops.cond` costs in the backward, where the
    gradient keeps every branch's intermediates), else `"tiers"` (cheaper
    forward).

    Args:
        layout: One of `LAYOUTS`.
        capacity_factor: `None` (dropless) or a positive float.
        training: Whether the call trains.
        features: The tokens' feature count `d` (None if unknown).
        n_assignments: `tokens * top_k` (a Python int, or None if dynamic).
        n_experts: Python int.
        has_grouped_matmul: Whether the backend's grouped matmul can run
            (`keras_moe.backend.grouped_matmul_available()`); `"grouped"`
            needs it.
        distributed: Whether a `keras.distribution` is set.
        prefers_grouped_matmul: Whether `"auto"` takes the grouped matmul
            where it can run (`keras_moe.backend.grouped_matmul_preferred()`;
            None: whenever it can run).

    Returns:
        The layout's name.

    Raises:
        ValueError: for a `layout` not in `LAYOUTS`, a dropless layout with
            a `capacity_factor`, `"capacity"` without one, and `"grouped"`
            without a grouped matmul.

    Example:

    >>> from keras_moe.routing import choose_layout
    >>> choose_layout("auto", training=True, features=64,
    ...               n_assignments=4096, n_experts=16)
    'blocks'
    >>> choose_layout("auto", capacity_factor=1.25)
    'capacity'
    """
    layout = check_layout(layout, capacity_factor)
    if layout != "auto":
        if layout == "grouped" and not has_grouped_matmul:
            raise ValueError(
                "`layout='grouped'` needs a backend grouped matmul, which the "
                f"{keras.backend.backend()!r} backend cannot run here (JAX has "
                "one, and PyTorch outside `torch.compile`). "
                "Received: layout='grouped'"
            )
        return layout
    if capacity_factor is not None:
        return "capacity"
    if prefers_grouped_matmul is None:
        prefers_grouped_matmul = has_grouped_matmul
    if has_grouped_matmul and prefers_grouped_matmul:
        return "grouped"
    block = default_block_size(n_assignments, n_experts or 1)
    narrow = features is not None and features <= 2 * block
    if training and not distributed and narrow:
        return "blocks"
    return "tiers"


def sparse_mixture(
    tokens,
    experts,
    weights,
    n_experts,
    expert_bank,
    capacity_factor=None,
    mask=None,
    layout="auto",
    dropless_capacity_factors=DROPLESS_CAPACITY_FACTORS,
    training=None,
    expert_axis=None,
):
    """Runs each token through its chosen experts only and mixes the results.

    `y[t] = sum_j w[t, j] * expert_{e[t, j]}(x[t])`, with the expert bank
    applied once to every expert's gathered tokens in a static-shaped layout
    (no loop over experts; see `keras_moe.routing.layouts`).

    Args:
        tokens: `(n, d)` inputs of the experts.
        experts: `(n, k)` int32 chosen experts (from `top_k_gates`).
        weights: `(n, k)` weights of the chosen experts.
        n_experts: Python int.
        expert_bank: The experts: a layer called as
            `expert_bank(rows, layout=plan)` on the rows a plan gathered,
            which returns their outputs in the same layout
            (`keras_moe.layers.FeedForwardExperts`, or any layer that
            multiplies its per-expert weights through the layout's `select`,
            `matmul` and `broadcast`).
        capacity_factor: `None` (dropless) or a positive float: each expert
            takes `ceil(capacity_factor * n * k / e)` assignments (at most
            `n`: `expert_capacity`), the rest are dropped (zero). Under a
            `keras.distribution` with a batch axis, `n` is the tokens of one
            batch shard: each shard routes its own tokens
            (`distribution_groups`).
        mask: Optional `(n,)` bool; masked tokens are not dispatched, their
            output is zero and they are not counted in `group_sizes`.
        layout: One of `LAYOUTS` (`choose_layout` resolves `"auto"`).
        dropless_capacity_factors: The capacity tiers of `"tiers"`.
        training: Whether this is a training call (for `"auto"`; the
            outputs are the same).
        expert_axis: Under a `keras.distribution`, the mesh axis the experts
            are split over (`keras_moe.distribution.expert_axis()`), which
            the capacity buffers are laid out on; None: none.

    Returns:
        `(outputs, group_sizes, dropped_fraction)`: `(n, m)` outputs, `(e,)`
        int32 assignments per expert, float32 dropped share of the routed
        assignments (0 in dropless mode, and when nothing was routed).
    """
    layout = check_layout(_renamed_layout(layout, capacity_factor), capacity_factor)
    run_experts = dispatch_runner(expert_bank)
    if experts.shape[0] == 0:
        empty = EmptyLayout(experts.shape[-1])
        outputs = empty.run(tokens, run_experts)
        return outputs, ops.zeros((n_experts,), "int32"), empty.dropped_fraction
    plan, group_sizes = plan_dispatch(
        tokens,
        experts,
        weights,
        n_experts,
        capacity_factor=capacity_factor,
        mask=mask,
        layout=layout,
        dropless_capacity_factors=dropless_capacity_factors,
        training=training,
        expert_axis=expert_axis,
    )
    return plan.run(tokens, run_experts), group_sizes, plan.dropped_fraction


def plan_dispatch(
    tokens,
    experts,
    weights,
    n_experts,
    capacity_factor=None,
    mask=None,
    layout="auto",
    dropless_capacity_factors=DROPLESS_CAPACITY_FACTORS,
    training=None,
    expert_axis=None,
):
    """The plan of one dispatch (`sparse_mixture`'s arguments, without the
    bank): `(plan, group_sizes)`, the plan of the layout `choose_layout`
    names: a `CapacityLayout` (`"capacity"`), `TieredPlan` (`"tiers"`),
    `BlockLayout` (`"blocks"`) or `RowLayout` (`"grouped"`).
    `plan.run(tokens, run_experts)` runs it."""
    n_tokens, top_k = experts.shape
    total = n_tokens * top_k if isinstance(n_tokens, int) else None
    distributed = keras.distribution.distribution() is not None
    matmul, preferred = grouped_matmul()
    name = choose_layout(
        layout,
        capacity_factor=capacity_factor,
        training=training,
        features=tokens.shape[-1],
        n_assignments=total,
        n_experts=n_experts,
        has_grouped_matmul=matmul is not None,
        distributed=distributed,
        prefers_grouped_matmul=preferred,
    )
    if name == "grouped":
        a = Assignments(experts, weights, n_experts, mask)
        return RowLayout(a, matmul), a.group_sizes
    if name == "blocks":
        # Dropless without capacity buffers: one routing over every token
        # gives what routing groups would, and the blocks' experts stay real.
        a = Assignments(experts, weights, n_experts, mask)
        return BlockLayout(a), a.group_sizes
    a, groups, constrain = _grouped_assignments(
        experts, weights, n_experts, mask, expert_axis
    )
    group_sizes = a.group_sizes
    if groups > 1:
        group_sizes = ops.sum(ops.reshape(group_sizes, (groups, n_experts)), axis=0)
    # Tokens per group: a scalar tensor for a dynamic batch (TensorFlow's
    # graph mode), which never has groups.
    group_tokens = a.n_tokens // groups
    if name == "capacity":
        capacity = expert_capacity(group_tokens, a.top_k, n_experts, capacity_factor)
        return CapacityLayout(a, capacity, groups, constrain), group_sizes
    factors = tuple(dropless_capacity_factors)
    if distributed:
        # Under a distribution the blocks would copy every block's expert
        # weights onto each device (an all-reduce of expert weights). The last
        # tier is instead a buffer that holds every assignment (an expert
        # takes each token at most once: `n` slots), sharded like the others.
        factors = factors + (n_experts / a.top_k,)
    tiers = [
        expert_capacity(group_tokens, a.top_k, n_experts, factor) for factor in factors
    ]
    return TieredPlan(a, tiers, groups, constrain), group_sizes


def _grouped_assignments(experts, weights, n_experts, mask, expert_axis):
    """`(assignments, groups, constrain)`: the assignments sorted by routing
    group and expert (`distribution_groups`)."""
    groups, constrain = distribution_groups(experts.shape[0], expert_axis)
    if groups > 1:
        # Each batch shard routes its own tokens (GShard's groups): group `g`'s
        # assignments to expert `e` go to the virtual expert `g * e_count + e`,
        # so one sort makes a `(groups, experts, capacity)` buffer whose
        # blocks live where both the group's tokens and the expert's weights
        # are.
        per_group = experts.shape[0] // groups
        group = ops.arange(experts.shape[0], dtype="int32") // per_group
        experts = experts + ops.expand_dims(group * n_experts, 1)
    return Assignments(experts, weights, groups * n_experts, mask), groups, constrain


class TieredPlan:
    """Dropless capacity tiers: the smallest capacity buffer that holds every
    expert's group, chosen at run time (`ops.cond`), else padded blocks.

    The run-time choice needs a static token count: a dynamic one (as in
    TensorFlow's graph mode) goes straight to the blocks.
    """

    def __init__(self, assignments, capacities, groups=1, constrain=None):
        self.assignments = assignments
        self.capacities = capacities
        self.groups = groups
        self.constrain = constrain
        self.dropped_fraction = ops.zeros((), "float32")

    def run(self, tokens, run_experts):
        a = self.assignments

        def layout_run(layout):
            return lambda: layout.run(tokens, run_experts)

        def tiers(capacities):
            if not capacities or not isinstance(a.total, int):
                return layout_run(BlockLayout(a))
            capacity = capacities[0]
            layout = CapacityLayout(a, capacity, self.groups, self.constrain)
            if isinstance(capacity, int) and capacity >= a.n_tokens // self.groups:
                return layout_run(layout)
            return lambda: ops.cond(
                a.max_group_size <= capacity, layout_run(layout), tiers(capacities[1:])
            )

        return tiers(self.capacities)()


def dispatch_runner(expert_bank):
    """`run(layout, rows)` of an expert bank: a layer (or a function) called
    as `expert_bank(rows, layout=layout)`; 0.2.0's `expert_fn(layout, rows)`
    (a function without a `layout` keyword, or whose first argument is
    `layout`) still works, with a warning, on 0.2.0's layout interface."""
    if isinstance(expert_bank, keras.layers.Layer):
        return lambda layout, rows: expert_bank(rows, layout=layout)
    if not callable(expert_bank):
        raise TypeError(
            "`expert_bank` must be a layer (or a function) called as "
            "`expert_bank(rows, layout=...)`, such as "
            "`keras_moe.layers.FeedForwardExperts`. "
            f"Received: expert_bank={expert_bank!r}"
        )
    parameters = inspect.signature(expert_bank).parameters
    names = list(parameters)
    takes_layout = ("layout" in parameters and names[0] != "layout") or any(
        p.kind is p.VAR_KEYWORD for p in parameters.values()
    )
    if takes_layout:
        return lambda layout, rows: expert_bank(rows, layout=layout)
    utils.warn_deprecated(
        "an expert function `expert_fn(layout, rows)`",
        "an expert bank layer called as `expert_bank(rows, layout=...)` "
        "(`keras_moe.layers.FeedForwardExperts`)",
        removed_in="0.4.0",
        stacklevel=3,
    )
    return lambda layout, rows: expert_bank(LegacyLayout(layout), rows)


class LegacyLayout:
    """keras-moe 0.2.0's layout interface over a layout, for 0.2.0's expert
    functions: `matmul(x, kernel, expert_axis=0)` and `add_bias(x, bias)` of
    every expert's weights (the layout selects the ones its rows need)."""

    def __init__(self, layout):
        self.layout = layout

    def matmul(self, x, kernel, expert_axis=0):
        if expert_axis != 0:
            kernel = ops.moveaxis(kernel, expert_axis, 0)
        kernel = ops.cast(self.layout.select(kernel), x.dtype)
        return self.layout.matmul(x, kernel)

    def add_bias(self, x, bias):
        bias = ops.cast(self.layout.select(bias), x.dtype)
        return x + self.layout.broadcast(bias)
