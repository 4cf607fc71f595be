"""The one routing core of keras-moe.

Every layer computes its experts' inputs and its gate logits and hands both to
this module, which owns the mixture: gate logits -> gate weights -> combine.
No layer re-derives any of it.

Router arithmetic (logits, activations, auxiliary losses) runs in float32
whatever the layer's dtype policy; the mixed expert outputs are cast back to
the layer's compute dtype.

Einsum legend: `n` tokens (flattened leading axes), `e` experts, `u` units,
`b` batch, `s` flattened spatial positions, `f` filters, `k` experts per filter.
"""

import math

import keras
from keras import ops

from keras_moe import backend
from keras_moe import utils


def gate_logits(inputs, kernel, bias=None):
    """Router logits `z = x . V + b` in float32.

    Args:
        inputs: `(n, d)` tensor, any float dtype.
        kernel: `(d, g)` float32 gating kernel (`g` gates).
        bias: optional `(g,)` float32 gating bias.

    Returns:
        `(n, g)` float32 logits.
    """
    logits = ops.matmul(ops.cast(inputs, "float32"), ops.cast(kernel, "float32"))
    if bias is not None:
        logits = logits + ops.cast(bias, "float32")
    return logits


def gate_values(logits, activation):
    """The gate values `g(z)` of the soft mixture, in float32.

    `activation` acts on the last axis (the experts), so `"softmax"` gives
    gates that sum to one over the experts of each token or filter.
    """
    return ops.cast(activation(ops.cast(logits, "float32")), "float32")


def soft_mixture(expert_outputs, gates):
    """Soft mixture over all experts: `y[n, u] = sum_e g[n, e] * h[n, e, u]`.

    Args:
        expert_outputs: `(n, e, u)` expert outputs in the compute dtype.
        gates: `(n, e)` gate values.
    """
    gates = ops.cast(gates, expert_outputs.dtype)
    fast = _backend_function("soft_mixture")
    if fast is not None:
        return fast(expert_outputs, gates)
    # Multiply-and-sum, not an einsum: XLA (TensorFlow) fuses it with the
    # experts' bias and activation like the original formulation, where the
    # einsum compiles to a transposed copy of `h` and a batched mat-vec
    # (`python -m benchmarks.soft_mixing`: TensorFlow forward 1.13x the
    # original against 1.00x; PyTorch forward+backward 1.03x against 0.90x).
    return ops.sum(expert_outputs * ops.expand_dims(gates, -1), axis=1)


def soft_mixture_per_filter(expert_outputs, gates):
    """Per-filter soft mixture of convolutional experts.

    `y[b, *s, f] = sum_k g[b, (*s,) f, k] * h[b, *s, f, k]`.

    Args:
        expert_outputs: `(b, *spatial, f, k)` expert outputs in the compute
            dtype.
        gates: `(b, f, k)` gates shared by every position, or gates per
            position of the same shape as `expert_outputs`.
    """
    gates = ops.cast(gates, expert_outputs.dtype)
    # Broadcast multiply-and-sum over the spatial axes as they are (no
    # flattening, no einsum): measured faster forward and forward+backward
    # on TensorFlow and JAX (benchmarks/README.md).
    while len(gates.shape) < len(expert_outputs.shape):
        gates = ops.expand_dims(gates, 1)
    return ops.sum(expert_outputs * gates, axis=-1)


# ---------------------------------------------------------------------------
# Sparse top-k routing.
#
# A token's `k` chosen experts make `k` assignments. The assignments are
# sorted by expert (a sort of `tokens * k` integer keys, no one-hot over the
# experts), so the tokens of each expert are contiguous; each expert then runs
# on its own tokens only, in one batched matmul over a static-shaped layout:
#
# - capacity mode (`capacity_factor` a float): an `(e, c, d)` buffer, `c`
#   slots per expert; assignments past an expert's capacity are dropped.
# - dropless mode (`capacity_factor=None`): each expert's group is padded to a
#   multiple of a block of `b` rows (MegaBlocks' idea), `(blocks, b, d)` rows,
#   each block owned by one expert, at most `tokens * k + (e - 1) * b` rows in
#   all; or, where the backend has a grouped matmul, the `tokens * k` sorted
#   rows themselves.
#
# Compute and memory grow with `k`, not with the number of experts.
# ---------------------------------------------------------------------------

# Dropless mode first tries capacity buffers of these factors (exact, as long
# as every expert's group fits, which `ops.cond` checks at run time) and falls
# back to the padded blocks only for the rare batch that overflows them all.
DROPLESS_CAPACITY_FACTORS = (1.25, 1.5, 2.0)


def _lookup_backend_function(name):
    try:
        return getattr(backend, name)
    except NotImplementedError:
        return None


# Looked up once at import: `torch.compile` cannot trace the lookup's
# `try`/`except`.
_BACKEND_FUNCTIONS = {
    name: _lookup_backend_function(name)
    for name in (
        "gather_rows",
        "grouped_matmul",
        "grouped_matmul_usable",
        "soft_mixture",
    )
}


def _backend_function(name):
    return _BACKEND_FUNCTIONS.get(name)


def _gather_rows(x, indices):
    """`x[indices]` along axis 0, through the backend's `gather_rows` where it
    has one (TensorFlow: a dense gradient that XLA compiles)."""
    gather_rows = _backend_function("gather_rows")
    if gather_rows is not None:
        return gather_rows(x, indices)
    return ops.take(x, indices, axis=0)


def top_k_gates(logits, top_k, normalize_top_k=True):
    """Top-k selection over the gate logits and the chosen experts' weights.

    With `normalize_top_k=True` the weights are the softmax over the `top_k`
    chosen logits (they sum to one); with `False` they are the full softmax's
    values at the chosen experts.

    Args:
        logits: `(n, e)` gate logits.
        top_k: Python int, experts per token.
        normalize_top_k: Python bool.

    Returns:
        `(weights, experts, probs)`: `(n, top_k)` float32 weights, `(n, top_k)`
        int32 expert indices (best first) and the `(n, e)` float32 full
        softmax.
    """
    logits = ops.cast(logits, "float32")
    probs = ops.softmax(logits, axis=-1)
    top_logits, experts = ops.top_k(logits, top_k)
    experts = ops.cast(experts, "int32")
    if normalize_top_k and top_k == 1:
        weights = ops.ones_like(top_logits)
    elif normalize_top_k:
        weights = ops.softmax(top_logits, axis=-1)
    else:
        weights = ops.take_along_axis(probs, experts, axis=-1)
    return weights, experts, probs


def noisy_logits(logits, inputs, noise_kernel, seed_generator):
    """Noisy top-k gating (Shazeer et al. 2017), for training only.

    `z + N(0, 1) * softplus(x . W_noise)`, in float32, with the noise drawn
    from `seed_generator` (a `keras.random.SeedGenerator`).
    """
    std = ops.softplus(gate_logits(inputs, noise_kernel))
    noise = keras.random.normal(ops.shape(logits), seed=seed_generator)
    return ops.cast(logits, "float32") + noise * std


def _token_weights(mask):
    if mask is None:
        return None
    return ops.cast(ops.reshape(mask, (-1,)), "float32")


def _masked_mean(values, token_weights):
    """Mean over the tokens (axis 0), counting only unmasked tokens."""
    if token_weights is None:
        return ops.mean(values, axis=0)
    if len(values.shape) > 1:
        token_weights = ops.expand_dims(token_weights, -1)
    total = ops.sum(values * token_weights, axis=0)
    return total / ops.maximum(ops.sum(token_weights), 1.0)


def load_balance_loss(probs, group_sizes, mask=None):
    """Load-balancing loss `E * sum_i f_i * P_i`, in float32 (1.0 at balance).

    `f_i` is expert `i`'s share of the `tokens * k` assignments and `P_i` the
    mean full-softmax probability of expert `i`, both over unmasked tokens
    only. Only `P` carries a gradient.

    Args:
        probs: `(n, e)` full softmax of the gate logits.
        group_sizes: `(e,)` assignments per expert (unmasked tokens only).
        mask: optional `(n,)` bool mask, `False` for tokens to ignore.
    """
    n_experts = probs.shape[-1]
    group_sizes = ops.stop_gradient(ops.cast(group_sizes, "float32"))
    f = group_sizes / ops.maximum(ops.sum(group_sizes), 1.0)
    p = _masked_mean(ops.cast(probs, "float32"), _token_weights(mask))
    return n_experts * ops.sum(f * p)


def router_z_loss(logits, mask=None):
    """Router z-loss (ST-MoE): mean over tokens of `logsumexp(z)^2`, float32."""
    z = ops.logsumexp(ops.cast(logits, "float32"), axis=-1)
    return _masked_mean(ops.square(z), _token_weights(mask))


def router_entropy(logits, mask=None):
    """Mean over tokens of the entropy (nats) of the full softmax."""
    logits = ops.cast(logits, "float32")
    entropy = -ops.sum(ops.softmax(logits) * ops.log_softmax(logits), axis=-1)
    return _masked_mean(entropy, _token_weights(mask))


def expert_capacity(n_tokens, top_k, n_experts, capacity_factor):
    """`ceil(capacity_factor * tokens * k / n_experts)` slots per expert.

    A Python int when `n_tokens` is one, else a scalar tensor (a dynamic batch
    size under TensorFlow's graph mode).
    """
    if isinstance(n_tokens, int):
        return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))
    capacity = ops.ceil(
        ops.cast(n_tokens, "float32") * (capacity_factor * top_k / n_experts)
    )
    return ops.maximum(ops.cast(capacity, "int32"), 1)


def _ceil_div(a, b):
    return -(-a // b)


def default_block_size(n_assignments, n_experts):
    """Rows per block of the dropless layout.

    The padding costs up to `(n_experts - 1) * b` extra rows, and small
    blocks make many small matmuls (slow per FLOP on CPU); `b` near
    `sqrt(128 * n / e)`, a power of two between 8 and 512, balances the two.
    Measured on CPU (JAX, 8192 assignments, forward+backward): 128 rows were
    1.6x faster than 64 at 64 experts and on par with 256 at 16 experts.
    """
    if not isinstance(n_assignments, int):
        return 128
    best = math.sqrt(128.0 * n_assignments / max(1, n_experts - 1))
    return int(min(512, max(8, 2 ** round(math.log2(max(best, 1.0))))))


class Assignments:
    """The `tokens * k` assignments sorted by expert: the shared part of a plan.

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

    def combine(self, expert_outputs, out_pos, kept):
        """`y[t] = sum_j w[t, j] * h[row of (t, j)]` over the kept assignments."""
        units = expert_outputs.shape[-1]
        rows = ops.reshape(expert_outputs, (-1, units))
        h = _gather_rows(rows, out_pos)
        weights = ops.reshape(ops.transpose(self.weights), (-1,))
        if kept is not None:
            # `where`, not a product: a dropped or masked row may hold anything.
            h = ops.where(ops.expand_dims(kept, 1), h, 0)
            weights = ops.where(kept, weights, 0.0)
        h = ops.reshape(h, (self.top_k, -1, units))
        weights = ops.reshape(ops.cast(weights, h.dtype), (self.top_k, -1))
        # k chosen experts, n tokens, m units.
        return ops.einsum("knm,kn->nm", h, weights)


class CapacityLayout:
    """`(e, c, d)` buffer: `c` slots per expert, overflow dropped.

    The layer's expert function receives the layout and its gathered inputs
    and uses `matmul` (per-expert kernel `(e, d, m)`) and `add_bias`
    (per-expert bias `(e, m)`); any elementwise function applies as is.
    """

    groups = 1

    def __init__(self, assignments, capacity, groups=1, constrain=None):
        a = assignments
        self.assignments = a
        self.groups = groups
        if constrain is not None:
            self._constrain = constrain
        slots = ops.arange(capacity, dtype="int32")
        src = ops.minimum(ops.expand_dims(a.starts[:-1], 1) + slots, a.total - 1)
        self._rows_token = ops.reshape(ops.take(a.sorted_token, src), (-1,))
        self._shape = (a.n_experts, capacity)
        if groups > 1:
            self._shape = (groups, a.n_experts // groups, capacity)
        kept = a.rank < capacity
        self._kept = kept if a.valid is None else ops.logical_and(a.valid, kept)
        self._out_pos = a.expert * capacity + ops.minimum(a.rank, capacity - 1)
        served = ops.sum(ops.cast(ops.minimum(a.group_sizes, capacity), "float32"))
        routed = ops.sum(ops.cast(a.group_sizes, "float32"))
        self.dropped_fraction = 1.0 - served / ops.maximum(routed, 1.0)

    def _constrain(self, x):
        return x

    def gather(self, tokens):
        rows = _gather_rows(tokens, self._rows_token)
        return self._constrain(ops.reshape(rows, self._shape + (tokens.shape[-1],)))

    def matmul(self, x, kernel, expert_axis=0):
        """Each expert's rows times its kernel, `(e, d, m)` (or `(d, e, m)`
        with `expert_axis=1`)."""
        # g groups, e experts, c capacity slots, d inputs, m outputs.
        equation = "ecd,edm->ecm" if expert_axis == 0 else "ecd,dem->ecm"
        if self.groups > 1:
            equation = "g" + equation.replace("->", "->g")
        return self._constrain(ops.einsum(equation, x, ops.cast(kernel, x.dtype)))

    def add_bias(self, x, bias):
        bias = ops.expand_dims(ops.cast(bias, x.dtype), 1)
        if self.groups > 1:
            bias = ops.expand_dims(bias, 0)
        return x + bias

    def combine(self, expert_outputs):
        return self.assignments.combine(expert_outputs, self._out_pos, self._kept)


class BlockLayout(CapacityLayout):
    """Dropless `(blocks, b, d)` rows: each expert's group padded to `b` rows.

    At most `ceil(tokens * k / b) + e - 1` blocks, each owned by one expert.
    """

    def __init__(self, assignments, block_size=None):
        a = assignments
        self.assignments = a
        e = a.n_experts
        block = block_size or default_block_size(a.total, e)
        if isinstance(a.total, int):
            n_blocks = _ceil_div(a.total, block) + e - 1
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
        self._rows_token = ops.take(a.sorted_token, ops.clip(src, 0, a.total - 1))
        self._shape = (n_blocks, block)
        self._kept = a.valid
        self._out_pos = ops.take(padded_starts, a.expert) + a.rank
        self.dropped_fraction = ops.zeros((), "float32")

    def _owned(self, weights, equation, dtype):
        # Each block's expert weights through a one-hot product, not a gather:
        # a gather's gradient is sparse (`IndexedSlices` on TensorFlow, which
        # XLA-compiled optimizers reject) and a scatter-add on CPU.
        owner = ops.one_hot(self._owner, self.assignments.n_experts, dtype=dtype)
        return ops.einsum(equation, owner, ops.cast(weights, dtype))

    def matmul(self, x, kernel, expert_axis=0):
        # n blocks of b rows, e experts, d inputs, m outputs.
        kernel = self._owned(
            kernel, "ne,edm->ndm" if expert_axis == 0 else "ne,dem->ndm", x.dtype
        )
        return ops.einsum("nbd,ndm->nbm", x, kernel)

    def add_bias(self, x, bias):
        return x + ops.expand_dims(self._owned(bias, "ne,em->nm", x.dtype), 1)


class RowLayout(CapacityLayout):
    """Dropless: the `tokens * k` sorted rows, for a backend grouped matmul."""

    def __init__(self, assignments, grouped_matmul):
        a = assignments
        self.assignments = a
        self._grouped_matmul = grouped_matmul
        self._rows_token = a.sorted_token
        self._group_ends = a.starts[1:]
        self._row_expert = ops.minimum(a.sorted_expert, a.n_experts - 1)
        self._kept = a.valid
        self._out_pos = a.position
        self.dropped_fraction = ops.zeros((), "float32")

    def gather(self, tokens):
        return _gather_rows(tokens, self._rows_token)

    def matmul(self, x, kernel, expert_axis=0):
        if expert_axis != 0:
            kernel = ops.moveaxis(kernel, expert_axis, 0)
        return self._grouped_matmul(x, ops.cast(kernel, x.dtype), self._group_ends)

    def add_bias(self, x, bias):
        return x + ops.take(ops.cast(bias, x.dtype), self._row_expert, axis=0)


def sparse_mixture(
    tokens,
    experts,
    weights,
    n_experts,
    expert_fn,
    capacity_factor=None,
    mask=None,
):
    """Runs each token through its chosen experts only and mixes the results.

    `y[t] = sum_j w[t, j] * expert_{e[t, j]}(x[t])`, with `expert_fn`
    applied once to every expert's gathered tokens in a static-shaped layout
    (no loop over experts). In dropless mode (`capacity_factor=None`) every
    assignment is computed: the plan uses a backend grouped matmul where
    there is one, else the smallest capacity buffer of
    `DROPLESS_CAPACITY_FACTORS` that holds every expert's group (checked at
    run time with `ops.cond`), else padded blocks (under a
    `keras.distribution`, a buffer of `n` slots per expert instead, which
    holds any routing and keeps the expert weights where they are sharded).

    Args:
        tokens: `(n, d)` inputs of the experts.
        experts: `(n, k)` int32 chosen experts (from `top_k_gates`).
        weights: `(n, k)` float32 weights of the chosen experts.
        n_experts: Python int.
        expert_fn: `fn(layout, x) -> h`: the experts applied to the gathered
            rows `x`, using `layout.matmul(x, kernel)` for `(e, d, m)`
            kernels and `layout.add_bias(x, bias)` for `(e, m)` biases.
        capacity_factor: `None` (dropless) or a positive float: each expert
            takes `ceil(capacity_factor * n * k / e)` assignments, the rest
            are dropped (they contribute zero). Under a `keras.distribution`
            with a batch axis, `n` is the tokens of one batch shard: each
            shard routes its own tokens (`distribution_groups`).
        mask: optional `(n,)` bool; masked tokens are not dispatched, their
            output is zero and they are not counted in `group_sizes`.

    Returns:
        `(outputs, group_sizes, dropped_fraction)`: `(n, m)` outputs, `(e,)`
        int32 assignments per expert, float32 dropped share.
    """
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

    def run(layout):
        return layout.combine(expert_fn(layout, layout.gather(tokens)))

    def capacity_layout(capacity):
        return CapacityLayout(a, capacity, groups, constrain)

    if capacity_factor is not None:
        capacity = expert_capacity(group_tokens, a.top_k, n_experts, capacity_factor)
        layout = capacity_layout(capacity)
        return run(layout), group_sizes, layout.dropped_fraction
    dropped = ops.zeros((), "float32")
    grouped_matmul = _backend_function("grouped_matmul")
    usable = _backend_function("grouped_matmul_usable")
    if grouped_matmul is not None and (usable is None or usable()):
        return run(RowLayout(a, grouped_matmul)), group_sizes, dropped

    factors = DROPLESS_CAPACITY_FACTORS
    if keras.distribution.distribution() is not None:
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

    return exact(factors)(), group_sizes, dropped


def distribution_groups(n_tokens):
    """`(groups, constrain)`: how `sparse_mixture` splits its tokens.

    Without a `keras.distribution` (or with a batch axis of one device, or a
    token count it does not divide): `(1, None)`, one routing over every
    token. Under a distribution with a batch axis of `g` devices: `g` groups,
    the tokens of each batch shard routed among themselves, and `constrain`
    lays a `(groups, experts, ...)` tensor out over the batch axis and, where
    the distribution's layout map is `expert_parallel_layout_map`'s, its
    expert axis, so each device runs its experts on its own group's rows.
    """
    distribution = keras.distribution.distribution()
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if distribution is None or batch_axis is None or not isinstance(n_tokens, int):
        return 1, None
    mesh = distribution.device_mesh
    groups = mesh.shape[list(mesh.axis_names).index(batch_axis)]
    if groups <= 1 or n_tokens % groups:
        return 1, None
    layout_map = getattr(distribution, "_layout_map", None)
    expert_axis = getattr(layout_map, "expert_axis", None)

    def constrain(x):
        axes = (batch_axis, expert_axis) + (None,) * (len(x.shape) - 2)
        layout = keras.distribution.TensorLayout(axes, mesh)
        return keras.distribution.distribute_tensor(x, layout)

    return groups, constrain


def routing_statistics(group_sizes, dropped_fraction, logits, mask=None):
    """`(e + 2,)` float32: each expert's share of the assignments, the dropped
    fraction and the mean router entropy (nats), without gradient."""
    sizes = ops.cast(group_sizes, "float32")
    load = sizes / ops.maximum(ops.sum(sizes), 1.0)
    scalars = ops.stack(
        [ops.cast(dropped_fraction, "float32"), router_entropy(logits, mask)]
    )
    return ops.stop_gradient(ops.concatenate([load, scalars]))


class SparseRouter:
    """Mixin giving a layer top-k routing, its losses and its statistics.

    The layer (with a `n_experts` attribute) calls `_init_sparse_router` in
    `__init__` (`top_k=None` for a layer that may also be a soft mixture),
    `_build_sparse_router` in `build`, `_sparse_route` in `call` and adds
    `_sparse_router_config()` to its config. Routing statistics are kept in
    two non-trainable float32 variables, updated at every call (so they work
    under `jit_compile` and in `stateless_call` on every backend):
    `routing_stats_last` (the last call) and `routing_stats_sum` (running
    sums over the training calls since `reset_routing_stats`).
    """

    def _init_sparse_router(
        self,
        top_k,
        normalize_top_k,
        noisy_gating,
        capacity_factor,
        load_balance_weight,
        router_z_loss_weight,
        seed,
    ):
        self.top_k = top_k
        if top_k is not None:
            self.top_k = utils.check_positive_int("top_k", top_k)
        if top_k is not None and self.top_k > self.n_experts:
            raise ValueError(
                "`top_k` must be an integer from 1 to `n_experts`. "
                f"Received: top_k={top_k}, n_experts={self.n_experts}"
            )
        self.normalize_top_k = utils.check_bool("normalize_top_k", normalize_top_k)
        self.noisy_gating = utils.check_bool("noisy_gating", noisy_gating)
        self.capacity_factor = (
            None
            if capacity_factor is None
            else utils.check_positive_float("capacity_factor", capacity_factor)
        )
        self.load_balance_weight = utils.check_non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.router_z_loss_weight = utils.check_non_negative_float(
            "router_z_loss_weight", router_z_loss_weight
        )
        if seed is not None:
            seed = utils.check_positive_int("seed", seed, minimum=0)
        self.seed = seed
        if self.top_k is None:
            # The soft mixture over all experts has none of these.
            for name in (
                "noisy_gating",
                "capacity_factor",
                "load_balance_weight",
                "router_z_loss_weight",
            ):
                value = getattr(self, name)
                if value:
                    raise ValueError(
                        f"`{name}` applies only to sparse routing (an integer "
                        f"`top_k`). Received: {name}={value!r}, top_k=None"
                    )
        self.seed_generator = None
        if self.noisy_gating:
            self.seed_generator = keras.random.SeedGenerator(seed)

    def _build_sparse_router(self, input_dim):
        n_experts = self.n_experts
        self.router_noise_kernel = None
        if self.noisy_gating:
            # Zero-initialised as in Shazeer et al.: softplus(0) noise at first.
            self.router_noise_kernel = self.add_weight(
                name="router_noise_kernel",
                shape=(input_dim, n_experts),
                initializer="zeros",
                autocast=False,
            )
        self.routing_stats_last = self.add_weight(
            name="routing_stats_last",
            shape=(n_experts + 2,),
            initializer="zeros",
            trainable=False,
            autocast=False,
        )
        self.routing_stats_sum = self.add_weight(
            name="routing_stats_sum",
            shape=(n_experts + 3,),
            initializer="zeros",
            trainable=False,
            autocast=False,
        )

    def _sparse_route(self, tokens, logits, expert_fn, mask=None, training=None):
        """Top-k routing of `tokens` with float32 `logits`; returns `(n, m)`."""
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        if self.noisy_gating and training:
            logits = noisy_logits(
                logits, tokens, self.router_noise_kernel, self.seed_generator
            )
        weights, experts, probs = top_k_gates(logits, self.top_k, self.normalize_top_k)
        outputs, group_sizes, dropped = sparse_mixture(
            tokens,
            experts,
            weights,
            self.n_experts,
            expert_fn,
            capacity_factor=self.capacity_factor,
            mask=mask,
        )
        if training:
            if self.load_balance_weight:
                loss = load_balance_loss(probs, group_sizes, mask)
                self.add_loss(self.load_balance_weight * loss)
            if self.router_z_loss_weight:
                self.add_loss(self.router_z_loss_weight * router_z_loss(logits, mask))
        stats = routing_statistics(group_sizes, dropped, logits, mask)
        self.routing_stats_last.assign(stats)
        if training:
            ones = ops.ones((1,), "float32")
            self.routing_stats_sum.assign_add(ops.concatenate([stats, ones]))
        return outputs

    def _stats_dict(self, values):
        n = self.n_experts
        return {
            "expert_load": values[:n],
            "dropped_fraction": float(values[n]),
            "router_entropy": float(values[n + 1]),
        }

    @property
    def routing_stats(self):
        """Statistics of the last call, as NumPy: `expert_load` (each
        expert's share of the assignments), `dropped_fraction` and
        `router_entropy` (mean entropy in nats of the full softmax)."""
        if not self.built:
            raise ValueError(
                f"`{type(self).__name__}` has no routing statistics before it is "
                "built and called. Received: built=False"
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
        self.routing_stats_sum.assign(ops.zeros(self.routing_stats_sum.shape))

    def _sparse_router_config(self):
        return {
            "top_k": self.top_k,
            "normalize_top_k": self.normalize_top_k,
            "noisy_gating": self.noisy_gating,
            "capacity_factor": self.capacity_factor,
            "load_balance_weight": self.load_balance_weight,
            "router_z_loss_weight": self.router_z_loss_weight,
            "seed": self.seed,
        }
