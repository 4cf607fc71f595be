"""Dispatch layouts: where each expert's tokens sit while the experts run.

A token's `k` chosen experts make `k` assignments. `Assignments` sorts them
by expert (a sort of `tokens * k` integer keys, no one-hot over the
experts), so the tokens of each expert are contiguous; a layout then gathers
them into a static-shaped array on which every expert runs in one batched
matmul, and combines the results back per token:

- `CapacityLayout`: an `(e, c, d)` buffer, `c` slots per expert; assignments
  past an expert's capacity are dropped.
- `BlockLayout` (dropless): each expert's group padded to a multiple of a
  block of `b` rows (MegaBlocks' idea), `(blocks, b, d)` rows, each block
  owned by one expert, at most `tokens * k + (e - 1) * b` rows in all.
- `RowLayout` (dropless): the `tokens * k` sorted rows themselves, for a
  backend grouped matmul.
- `EmptyLayout`: no token at all (an empty batch).

Compute and memory grow with `k`, not with the number of experts.

The interface between a layout and the expert bank that runs on it
(`keras_moe.layers.FeedForwardExperts`) is three operations of `Layout`:
`select(w)` picks, from a per-expert weight `(E, ...)`, what the layout's
rows need (all of it, or each block's expert's); `matmul(x, kernel)`
multiplies every row by its expert's (selected) kernel; `broadcast(v)`
lines a (selected) per-expert vector up with the rows, to add a bias or
scale an output. Anything element-wise applies to the rows as it is.

Einsum legend: `g` groups, `e` experts, `c` capacity slots, `n` blocks (or
tokens), `b` rows per block, `k` chosen experts, `d` inputs, `m` outputs.
"""

import math

from keras import ops

from keras_moe import backend


def gather_rows(x, indices):
    """`x[indices]` along axis 0, through the backend's `gather_rows` where it
    has one (TensorFlow: a dense gradient that XLA compiles)."""
    fast = backend.fast_path("gather_rows")
    if fast is not None:
        return fast(x, indices)
    return ops.take(x, indices, axis=0)


def expert_capacity(n_tokens, top_k, n_experts, capacity_factor):
    """`ceil(capacity_factor * tokens * k / n_experts)` slots per expert, at
    most `tokens` (an expert takes a token at most once, so more slots would
    stay empty) and at least 1.

    A Python int when `n_tokens` is one, else a scalar tensor (a dynamic batch
    size under TensorFlow's graph mode).
    """
    if isinstance(n_tokens, int):
        capacity = math.ceil(capacity_factor * n_tokens * top_k / n_experts)
        return max(1, min(capacity, n_tokens))
    n_tokens = ops.cast(n_tokens, "float32")
    capacity = ops.ceil(n_tokens * (capacity_factor * top_k / n_experts))
    # Capped before the cast: a huge factor would overflow int32.
    capacity = ops.minimum(capacity, n_tokens)
    return ops.maximum(ops.cast(capacity, "int32"), 1)


def default_block_size(n_assignments, n_experts):
    """Rows per block of the dropless `BlockLayout`.

    The padding costs up to `(n_experts - 1) * b` extra rows, and small
    blocks make many small matmuls (slow per FLOP on CPU) and many copies of
    the expert weights; `b` near `sqrt(128 * n / e)`, a power of two from 8
    to 128, balances the two. Measured on CPU (JAX, 8192 assignments,
    forward+backward of a gated FFN, d=256, m=512): 128 rows were on par
    with or faster than 64, 256 and 512 at 8, 16 and 64 experts.
    """
    if not isinstance(n_assignments, int):
        return 128
    best = math.sqrt(128.0 * n_assignments / max(1, n_experts - 1))
    return int(min(128, max(8, 2 ** round(math.log2(max(best, 1.0))))))


class Assignments:
    """The `tokens * k` assignments sorted by expert: the shared part of a plan.

    Args:
        experts: `(n, k)` int32 chosen experts.
        weights: `(n, k)` weights of the chosen experts.
        n_experts: Python int.
        mask: optional `(n,)` bool; masked tokens are assigned to no expert.

    Attributes:
        group_sizes: `(e,)` int32 assignments per expert (unmasked tokens).
        max_group_size: int32 scalar, the largest group.
    """

    def __init__(self, experts, weights, n_experts, mask=None):
        self.n_experts = n_experts
        self.top_k = experts.shape[-1]
        n = experts.shape[0]
        if n is None:
            n = ops.shape(experts)[0]
        self.n_tokens = n
        self.total = total = n * self.top_k
        if isinstance(total, int) and (n_experts + 1) * total >= 2**31:
            raise ValueError(
                "Sparse routing sorts int32 keys `expert * tokens * k + index`: "
                "`(n_experts + 1) * tokens * top_k` must be < 2**31. "
                f"Received: n_experts={n_experts}, tokens * top_k={total}"
            )
        self.weights = weights
        # Slot-major assignment index `a = slot * n + token`: under capacity,
        # every token's first choice is served before any second choice.
        expert = ops.reshape(ops.transpose(experts), (-1,))
        self.valid = None
        if mask is not None:
            valid = ops.reshape(ops.cast(mask, "bool"), (-1,))
            self.valid = ops.tile(valid, (self.top_k,))
            # Masked tokens go to a virtual expert `e`, sorted last, never run.
            expert = ops.where(self.valid, expert, n_experts)
        keys = expert * total + ops.arange(total, dtype="int32")
        sorted_keys = ops.sort(keys)
        self.sorted_expert = sorted_keys // total
        self.sorted_token = (sorted_keys % total) % n
        self.starts = ops.cast(
            ops.searchsorted(
                self.sorted_expert,
                ops.arange(n_experts + 1, dtype="int32"),
                side="left",
            ),
            "int32",
        )
        self.group_sizes = self.starts[1:] - self.starts[:-1]
        self.max_group_size = ops.max(self.group_sizes)
        # Where each assignment sits in the sorted order, and in its group.
        self.position = ops.cast(
            ops.searchsorted(sorted_keys, keys, side="left"), "int32"
        )
        self.rank = self.position - ops.take(self.starts, expert)
        self.expert = ops.minimum(expert, n_experts - 1)


class Layout:
    """Where each expert's rows sit while the experts run; the interface
    between a dispatch and its expert bank.

    The base class lays the rows out on an expert axis: `(..., E, c, d)`,
    every expert's `c` rows after the leading axes (a capacity buffer,
    expert choice's buffer, Soft MoE's slots). A dispatch layout also
    gathers its rows from the tokens (`gather`) and combines the outputs
    back per token (`combine`): its constructor sets `_rows_token` (the
    token of every row), `_shape` (the rows' shape before the feature axis),
    `_out_pos` (each assignment's row, slot-major), `_kept` (which
    assignments count, or None for all) and `dropped_fraction`.

    The three operations an expert bank uses for its per-expert weights:

    - `select(weights)`: from `(E, ...)` per-expert weights, those the rows
      need, in the order `matmul` and `broadcast` take them (here all of
      them; each block's expert's for `BlockLayout`).
    - `matmul(x, kernel)`: each row times its expert's selected `(., d, m)`
      kernel.
    - `broadcast(vector)`: a selected per-expert `(., m)` vector shaped to
      broadcast against the rows (to add a bias or scale an output).
    """

    def __init__(self, assignments=None):
        self.assignments = assignments
        self.dropped_fraction = ops.zeros((), "float32")

    def select(self, weights):
        """The per-expert weights the rows need (all of them here)."""
        return weights

    def matmul(self, x, kernel):
        """`(..., E, c, d)` rows times their expert's `(E, d, m)` kernel."""
        return ops.einsum("...ecd,edm->...ecm", x, kernel)

    def broadcast(self, vector):
        """`(E, m)` per-expert vectors against `(..., E, c, m)` rows."""
        return ops.expand_dims(vector, -2)

    def gather(self, tokens):
        """The layout's rows from the `(n, d)` tokens."""
        rows = gather_rows(tokens, self._rows_token)
        return ops.reshape(rows, self._shape + (tokens.shape[-1],))

    def combine(self, expert_outputs):
        """`y[t] = sum_j w[t, j] * h[row of (t, j)]` over the kept assignments."""
        a = self.assignments
        units = expert_outputs.shape[-1]
        rows = ops.reshape(expert_outputs, (-1, units))
        h = gather_rows(rows, self._out_pos)
        weights = ops.reshape(ops.transpose(a.weights), (-1,))
        if self._kept is not None:
            # `where`, not a product: a dropped or masked row may hold anything.
            h = ops.where(ops.expand_dims(self._kept, 1), h, 0)
            weights = ops.where(self._kept, weights, ops.zeros_like(weights))
        h = ops.reshape(h, (a.top_k, -1, units))
        weights = ops.reshape(ops.cast(weights, h.dtype), (a.top_k, -1))
        return ops.einsum("knm,kn->nm", h, weights)

    def run(self, tokens, run_experts):
        """`combine(run_experts(self, gather(tokens)))`; zeros when a dynamic
        token count (TensorFlow's graph mode) is 0 at run time."""
        a = self.assignments

        def compute():
            return self.combine(run_experts(self, self.gather(tokens)))

        if a is None or isinstance(a.total, int):
            return compute()
        empty = EmptyLayout(a.top_k)
        return ops.cond(a.total > 0, compute, lambda: empty.run(tokens, run_experts))


ExpertAxisLayout = Layout


class CapacityLayout(Layout):
    """`(e, c, d)` buffer: `c` slots per expert, overflow dropped.

    With `groups > 1` (GShard's groups under a `keras.distribution`, see
    `distribution_groups`) the `groups * e` virtual experts make a
    `(groups, e, c, d)` buffer, laid out by `constrain`.
    """

    def __init__(self, assignments, capacity, groups=1, constrain=None):
        super().__init__(assignments)
        a = assignments
        self.groups = groups
        self._constrain = constrain or (lambda x: x)
        slots = ops.arange(capacity, dtype="int32")
        last = ops.maximum(a.total - 1, 0)
        src = ops.minimum(ops.expand_dims(a.starts[:-1], 1) + slots, last)
        self._rows_token = ops.reshape(ops.take(a.sorted_token, src), (-1,))
        self._shape = (a.n_experts, capacity)
        if groups > 1:
            self._shape = (groups, a.n_experts // groups, capacity)
        kept = a.rank < capacity
        self._kept = kept if a.valid is None else ops.logical_and(a.valid, kept)
        self._out_pos = a.expert * capacity + ops.minimum(a.rank, capacity - 1)
        routed = ops.cast(a.group_sizes, "float32")
        served = ops.minimum(routed, ops.cast(capacity, "float32"))
        # Dropped over routed: 0 when nothing was routed (every token masked).
        self.dropped_fraction = ops.sum(routed - served) / ops.maximum(
            ops.sum(routed), 1.0
        )

    def gather(self, tokens):
        return self._constrain(super().gather(tokens))

    def matmul(self, x, kernel):
        return self._constrain(super().matmul(x, kernel))


class BlockLayout(Layout):
    """Dropless `(blocks, b, d)` rows: each expert's group padded to `b` rows.

    At most `ceil(tokens * k / b) + e - 1` blocks, each owned by one expert.
    """

    def __init__(self, assignments, block_size=None):
        super().__init__(assignments)
        a = assignments
        e = a.n_experts
        block = block_size or default_block_size(a.total, e)
        if isinstance(a.total, int):
            n_blocks = -(-a.total // block) + e - 1
        else:
            n_blocks = (a.total + block - 1) // block + e - 1
        padded = (a.group_sizes + block - 1) // block * block
        padded_ends = ops.cumsum(padded)
        padded_starts = padded_ends - padded
        owner = ops.searchsorted(
            padded_ends, ops.arange(n_blocks, dtype="int32") * block, side="right"
        )
        self._owner = ops.minimum(ops.cast(owner, "int32"), e - 1)
        row_owner = ops.reshape(
            ops.tile(ops.expand_dims(self._owner, 1), (1, block)), (-1,)
        )
        row = ops.arange(n_blocks * block, dtype="int32")
        src = ops.take(a.starts, row_owner) + row - ops.take(padded_starts, row_owner)
        last = ops.maximum(a.total - 1, 0)
        self._rows_token = ops.take(a.sorted_token, ops.clip(src, 0, last))
        self._shape = (n_blocks, block)
        self._kept = a.valid
        self._out_pos = ops.take(padded_starts, a.expert) + a.rank

    def select(self, weights):
        # Each block's expert weights, gathered with a dense gradient (a
        # scatter-add into the experts' weights; `gather_rows`).
        return gather_rows(weights, self._owner)

    def matmul(self, x, kernel):
        return ops.einsum("nbd,ndm->nbm", x, kernel)


class RowLayout(Layout):
    """Dropless: the `tokens * k` sorted rows, for a backend grouped matmul.

    Args:
        assignments: the `Assignments`.
        grouped_matmul: `fn(rows, kernel, group_ends)`, `(r, d)` rows sorted
            by expert times their expert's `(e, d, m)` kernel.
    """

    def __init__(self, assignments, grouped_matmul):
        super().__init__(assignments)
        a = assignments
        self._grouped_matmul = grouped_matmul
        self._rows_token = a.sorted_token
        self._group_ends = a.starts[1:]
        self._row_expert = ops.minimum(a.sorted_expert, a.n_experts - 1)
        self._kept = a.valid
        self._out_pos = a.position
        # Masked assignments sort last, past every group: the grouped matmul
        # leaves their rows undefined, any value, even inf or NaN, in its
        # outputs and in its inputs' gradients. `gather` and `matmul` zero
        # them (outputs, and inputs' gradients through `where`), so that they
        # reach no value and no gradient: a zero upstream gradient does not
        # suffice, as `0 * NaN` is NaN (an activation's gradient at an
        # undefined row, a bias gathered for it).
        self._row_valid = None
        if a.valid is not None:
            valid = ops.arange(a.total, dtype="int32") < a.starts[-1]
            self._row_valid = ops.expand_dims(valid, 1)

    def _defined(self, rows):
        if self._row_valid is None:
            return rows
        return ops.where(self._row_valid, rows, ops.zeros_like(rows))

    def gather(self, tokens):
        # `where`, so that the undefined gradients of the masked rows do not
        # reach their tokens.
        return self._defined(gather_rows(tokens, self._rows_token))

    def matmul(self, x, kernel):
        # A backend's grouped matmul takes tensors, not a `keras.Variable`.
        kernel = ops.convert_to_tensor(kernel)
        y = self._grouped_matmul(self._defined(x), kernel, self._group_ends)
        return self._defined(y)

    def broadcast(self, vector):
        return ops.take(vector, self._row_expert, axis=0)


class EmptyLayout(Layout):
    """No token at all: every product is an empty `(0, m)` array."""

    def __init__(self, top_k=1):
        super().__init__(None)
        self.top_k = top_k

    def gather(self, tokens):
        return tokens[:0]

    def matmul(self, x, kernel):
        return ops.zeros((0, kernel.shape[-1]), x.dtype)

    def broadcast(self, vector):
        # A constant, not `vector[:0]`: TensorFlow's graph mode crashes the
        # process (SIGFPE) multiplying the constant empty rows of `matmul`
        # by an empty slice of a variable (an expert bank's output scale).
        return ops.zeros((0,) + tuple(vector.shape[1:]), vector.dtype)

    def combine(self, expert_outputs):
        return ops.reshape(expert_outputs, (0, expert_outputs.shape[-1]))
