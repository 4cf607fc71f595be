"""`sparse_mixture` on routings whose per-expert group sizes are chosen, in
every layout, against a float64 NumPy reference: outputs, group sizes, the
dropped share, and the gradients with respect to the tokens, the gate weights
and the experts' kernel and bias.

Random routings rarely put a group exactly at a block or a capacity edge:
every table here is written so that each layout meets groups that are
empty, exactly one block (or one capacity), one row over, and a routing where
every expert's group is off a multiple of the block by so little that the
last, partial blocks are what the padding adds (`BlockLayout`'s block count
rounded down would lose them). `test_the_tables_meet_every_edge` checks that
the tables still do.
"""

import functools
import math
import zlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend
from keras_moe import routing
from tests.conftest import to_numpy
from tests.routing.test_dispatch import np_kept

D, M = 3, 2
# JAX's `ragged_dot` runs on a CPU too when asked for (`layout="grouped"`).
HAS_GROUPED_MATMUL = backend.grouped_matmul_available()


def routing_of(sizes, k, seed, n_masked=0):
    """`(experts, mask)` whose unmasked assignments give each expert exactly
    `sizes[e]` of them, with `k` different experts per token.

    The assignments sorted by expert fill the slots slot-major (token `t`'s
    slot `j` is sorted assignment `j * n + t`), so a token's experts differ
    as long as no group exceeds `n`; then the tokens and each token's slots
    are shuffled. `n_masked` extra tokens are masked out.
    """
    e = len(sizes)
    n, rest = divmod(sum(sizes), k)
    if rest or max(sizes) > n:
        raise ValueError(f"no routing of {k} experts per token has sizes {sizes}")
    rng = np.random.default_rng(seed)
    experts = np.repeat(np.arange(e), sizes).reshape(k, n).T
    masked = [rng.permutation(e)[:k] for _ in range(n_masked)]
    experts = np.concatenate([experts, np.reshape(masked, (n_masked, k))])
    mask = np.arange(n + n_masked) < n
    order = rng.permutation(n + n_masked)
    experts = rng.permuted(experts[order], axis=1).astype("int32")
    return experts, mask[order]


def case_arrays(e, k, sizes, n_masked, seed):
    experts, mask = routing_of(sizes, k, seed, n_masked)
    n = len(experts)
    rng = np.random.default_rng(seed + 1)
    return {
        "x": rng.normal(size=(n, D)).astype("float32"),
        "weights": rng.uniform(0.2, 1.0, size=(n, k)).astype("float32"),
        "kernel": (rng.normal(size=(e, D, M)) / math.sqrt(D)).astype("float32"),
        "bias": rng.normal(size=(e, M)).astype("float32"),
        "cotangent": rng.normal(size=(n, M)).astype("float32"),
        "experts": experts,
        "mask": mask if n_masked else None,
    }


def np_mixture(x, experts, weights, kernel, bias, cotangent, mask=None, capacity=None):
    """Float64 reference of `y[t] = sum_j w[t, j] * tanh(x[t] K_e + b_e)`,
    `e = e[t, j]`, with the gradients of `sum(y * cotangent)`.

    With `capacity`, the assignments are served slot-major (every token's
    first choice, in token order, before any second choice) and those past
    an expert's capacity are dropped; masked tokens are routed nowhere.
    Returns `(y, (dx, dweights, dkernel, dbias), group_sizes, dropped)`.
    """
    x, weights, kernel, bias, cotangent = (
        np.asarray(a, "float64") for a in (x, weights, kernel, bias, cotangent)
    )
    n = experts.shape[0]
    out = np.zeros((n, kernel.shape[-1]))
    dx, dw = np.zeros_like(x), np.zeros_like(weights)
    dkernel, dbias = np.zeros_like(kernel), np.zeros_like(bias)
    kept, dropped = np_kept(experts, capacity, mask)
    for t, slot, e in kept:
        h = np.tanh(x[t] @ kernel[e] + bias[e])
        out[t] += weights[t, slot] * h
        dz = weights[t, slot] * cotangent[t] * (1.0 - h**2)
        dx[t] += kernel[e] @ dz
        dkernel[e] += np.outer(x[t], dz)
        dbias[e] += dz
        dw[t, slot] = cotangent[t] @ h
    keep = np.ones(n, bool) if mask is None else mask
    sizes = np.bincount(experts[keep].ravel(), minlength=kernel.shape[0])
    return out, (dx, dw, dkernel, dbias), sizes, dropped


ARRAYS = ("x", "weights", "kernel", "bias")

# The layouts the experts ran on, `(layout class, shape of its rows)`.
RECORDS = []


def expert_fn(layout, h, kernel, bias):
    """`tanh(x K_e + b_e)` on the layout's rows, through the layout's
    `select`, `matmul` and `broadcast` (the expert bank's interface)."""
    RECORDS.append((type(layout).__name__, tuple(h.shape)))
    h = layout.matmul(h, layout.select(kernel))
    return ops.tanh(h + layout.broadcast(layout.select(bias)))


@functools.cache
def mixture_fn(e, capacity_factor=None, **options):
    """`fn(x, weights, kernel, bias, experts, mask) -> (y, extra)`: the
    sparse mixture, with its group sizes and dropped share."""

    def fn(x, weights, kernel, bias, experts, mask):
        out, sizes, dropped = routing.sparse_mixture(
            x,
            experts,
            weights,
            e,
            lambda rows, layout: expert_fn(layout, rows, kernel, bias),
            capacity_factor=capacity_factor,
            mask=mask,
            **options,
        )
        return out, (sizes, dropped)

    return fn


@functools.cache
def block_layout_fn(e, block):
    """The same on `BlockLayout` with `block` rows per block."""

    def fn(x, weights, kernel, bias, experts, mask):
        a = routing.Assignments(experts, weights, e, mask)
        plan = routing.BlockLayout(a, block_size=block)
        out = plan.combine(expert_fn(plan, plan.gather(x), kernel, bias))
        return out, (a.group_sizes, plan.dropped_fraction)

    return fn


@functools.cache
def jax_step(fn):
    """`fn` and its gradients as one compiled program, compiled once per
    shape: JAX's op-by-op dispatch compiles every primitive anew for each
    case's shapes, several times slower."""
    import jax

    def loss(x, weights, kernel, bias, cotangent, experts, mask):
        y, extra = fn(x, weights, kernel, bias, experts, mask)
        return ops.sum(y * cotangent), (y, extra)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))


def value_and_grads(fn, case):
    """`fn` on the case on the backend: `y`, `extra` and the gradients of
    `sum(y * cotangent)` with respect to `ARRAYS`, as NumPy."""
    arrays = [case[name] for name in ARRAYS]
    routing_args = (case["experts"], case["mask"])
    name = keras.backend.backend()
    if name == "jax":
        (_, (y, extra)), grads = jax_step(fn)(*arrays, case["cotangent"], *routing_args)
    elif name == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        y, extra = fn(*tensors, *routing_args)
        ops.sum(y * torch.tensor(case["cotangent"])).backward()
        grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]
        y = y.detach()
    else:
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            y, extra = fn(*tensors, *routing_args)
            value = ops.sum(y * case["cotangent"])
        grads = [
            tf.zeros_like(t) if g is None else tf.convert_to_tensor(g)
            for t, g in zip(tensors, tape.gradient(value, tensors))
        ]
    extra = tuple(to_numpy(v) for v in extra)
    return to_numpy(y), extra, [to_numpy(g) for g in grads]


def run_mixture(case, capacity_factor=None, **options):
    """`sparse_mixture` on the case, with its gradients."""
    fn = mixture_fn(case["kernel"].shape[0], capacity_factor, **options)
    return value_and_grads(fn, case)


def check_against_numpy(case, out, extra, grads, capacity=None):
    ref, ref_grads, ref_sizes, ref_dropped = np_mixture(
        case["x"],
        case["experts"],
        case["weights"],
        case["kernel"],
        case["bias"],
        case["cotangent"],
        case["mask"],
        capacity,
    )
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for name, grad, ref_grad in zip(ARRAYS, grads, ref_grads):
        assert np.isfinite(grad).all(), name
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5, err_msg=name)
    sizes, dropped = extra
    np.testing.assert_array_equal(sizes, ref_sizes)
    assert float(dropped) == pytest.approx(ref_dropped, abs=1e-6)
    if case["mask"] is not None:
        # Masked tokens: no output, and no gradient reaches them.
        masked = ~case["mask"]
        assert masked.any()
        np.testing.assert_array_equal(out[masked], 0.0)
        np.testing.assert_array_equal(grads[0][masked], 0.0)
        np.testing.assert_array_equal(grads[1][masked], 0.0)


# The dropless cases: (e, k, group sizes, masked tokens), a few per shape
# (on JAX each shape compiles once). `sparse_mixture`'s blocks have
# `default_block_size(tokens * k, e)` rows, written in the comments; "off"
# marks a routing where every group is off a multiple of the block and the
# remainders sum to less than a block.
DROPLESS_CASES = {
    # 10 tokens, block 16.
    "e4_k1_all_off": (4, 1, (3, 2, 1, 4), 0),
    "e4_k1_one_expert": (4, 1, (0, 0, 10, 0), 0),
    # 35 tokens, block 16: one block, one row over, two blocks and one row.
    "e16_k1_block_edges": (16, 1, (16, 17) + (0,) * 13 + (2,), 0),
    "e16_k1_two_blocks_one_over": (16, 1, (33,) + (0,) * 14 + (2,), 0),
    # 17 tokens, block 16.
    "e16_k2_block_edges": (16, 2, (17, 16) + (0,) * 13 + (1,), 0),
    "e16_k2_two_full_blocks": (16, 2, (16, 16) + (0,) * 13 + (2,), 0),
    # 40 tokens, block 32.
    "e16_k2_all_off_past_a_block": (16, 2, (33, 33) + (1,) * 14, 0),
    "e16_k2_one_block_one_over": (16, 2, (32, 33) + (0,) * 13 + (15,), 0),
    "e4_k2_all_off": (4, 2, (4, 3, 2, 1), 0),  # 5 tokens, block 16
    "e5_k3_all_off": (5, 3, (6, 5, 4, 2, 1), 0),  # 6 tokens, block 32
    # 16 tokens, block 16: every group empty or one block, no padding.
    "e16_k2_only_full_blocks": (16, 2, (16, 16) + (0,) * 14, 0),
    # 17 tokens and 2 masked, block 16.
    "e16_k2_block_edges_masked": (16, 2, (17, 16) + (0,) * 13 + (1,), 2),
}

DROPLESS_LAYOUTS = {
    "blocks": {"layout": "blocks"},
}
if HAS_GROUPED_MATMUL:
    DROPLESS_LAYOUTS["grouped"] = {"layout": "grouped"}


def block_of(e, k, sizes, n_masked):
    return routing.default_block_size((sum(sizes) // k + n_masked) * k, e)


@pytest.mark.parametrize("layout", sorted(DROPLESS_LAYOUTS))
@pytest.mark.parametrize("case_id", sorted(DROPLESS_CASES))
def test_dropless_layouts_on_chosen_groups(case_id, layout):
    e, k, sizes, n_masked = DROPLESS_CASES[case_id]
    case = case_arrays(e, k, sizes, n_masked, seed=zlib.crc32(case_id.encode()))
    out, extra, grads = run_mixture(case, **DROPLESS_LAYOUTS[layout])
    check_against_numpy(case, out, extra, grads)
    assert float(extra[1]) == 0.0


# The capacity tiers' run-time choice: (e, k, group sizes, masked tokens,
# `dropless_capacity_factors`, the tier that holds every group: its index,
# or "blocks" when none does). With factors (1, 1.5, 2) over 30 assignments
# to 8 experts the tiers have 4, 6 and 8 slots; over 16 assignments (k=2),
# 2, 3 and 4 (3, 4 and 5 with one more token, masked); the blocks have 32
# and 16 rows.
TIERS = (1.0, 1.5, 2.0)
TIER_CASES = {
    "tier0_full": (8, 1, (4, 4, 4, 4, 4, 4, 4, 2), 0, TIERS, 0),
    "tier1_one_over": (8, 1, (5, 4, 4, 4, 4, 4, 4, 1), 0, TIERS, 1),
    "tier2_one_over": (8, 1, (7, 6, 0, 0, 4, 4, 4, 5), 0, TIERS, 2),
    # Past every tier: the blocks, every group off a multiple of 32.
    "blocks_all_off": (8, 1, (9, 3, 3, 3, 3, 3, 3, 3), 0, TIERS, "blocks"),
    "k2_tier1_one_over": (8, 2, (3, 1, 2, 2, 2, 2, 2, 2), 0, TIERS, 1),
    "k2_tier2_full_masked": (8, 2, (5, 0, 1, 2, 2, 2, 2, 2), 1, TIERS, 2),
    # A tier of `n` slots holds any routing: chosen without `ops.cond`.
    "static_last_tier": (8, 1, (9, 3, 3, 3, 3, 3, 3, 3), 0, (1.0, 8.0), 1),
}


def tier_capacities(e, k, sizes, n_masked, factors):
    n = sum(sizes) // k + n_masked
    return [routing.expert_capacity(n, k, e, f) for f in factors]


@pytest.mark.parametrize("case_id", sorted(TIER_CASES))
def test_capacity_tiers_choose_at_run_time(case_id):
    """The smallest tier that holds every group runs (seen on PyTorch and
    TensorFlow, whose eager `ops.cond` runs one branch; JAX compiles them
    all), and any tier gives the exact mixture."""
    e, k, sizes, n_masked, factors, tier = TIER_CASES[case_id]
    case = case_arrays(e, k, sizes, n_masked, seed=zlib.crc32(case_id.encode()))
    RECORDS.clear()
    out, extra, grads = run_mixture(
        case, layout="tiers", dropless_capacity_factors=factors
    )
    check_against_numpy(case, out, extra, grads)
    capacities = tier_capacities(e, k, sizes, n_masked, factors)
    if tier == "blocks":
        block = block_of(e, k, sizes, n_masked)
        n_blocks = -(-len(case["experts"]) * k // block) + e - 1
        expected = ("BlockLayout", (n_blocks, block, D))
    else:
        expected = ("CapacityLayout", (e, capacities[tier], D))
    if keras.backend.backend() != "jax":
        assert RECORDS == [expected]


# Capacity (`capacity_factor`): (e, k, group sizes, masked tokens, factor).
CAPACITY_CASES = {
    # 3 slots: a group of 6 (3 dropped), one full, one under.
    "k2_half_dropped": (4, 2, (6, 1, 2, 3), 0, 1.0),
    # 3 slots: two groups past it, one full, an empty group.
    "k2_two_overflow": (4, 2, (5, 4, 3, 0), 0, 1.0),
    # 3 slots: one group takes 8, one full, an empty group.
    "k1_skewed": (4, 1, (0, 8, 3, 1), 0, 1.0),
    # 5 slots: one row over, one full.
    "k3_one_over": (5, 3, (6, 5, 4, 2, 1), 0, 1.25),
    # 5 slots (9 tokens): the masked tokens take no slot.
    "k2_masked_one_over": (4, 2, (6, 5, 0, 1), 3, 1.0),
}


@pytest.mark.parametrize("case_id", sorted(CAPACITY_CASES))
def test_capacity_drops_slot_major_on_chosen_groups(case_id):
    e, k, sizes, n_masked, factor = CAPACITY_CASES[case_id]
    case = case_arrays(e, k, sizes, n_masked, seed=zlib.crc32(case_id.encode()))
    capacity = tier_capacities(e, k, sizes, n_masked, (factor,))[0]
    out, extra, grads = run_mixture(case, capacity_factor=factor)
    check_against_numpy(case, out, extra, grads, capacity=capacity)
    assert float(extra[1]) > 0.0


# `BlockLayout` with a chosen block size: (e, k, group sizes, masked, block).
BLOCK_CASES = {
    "b4_edges": (4, 1, (4, 5, 0, 3), 0, 4),
    "b4_only_full_blocks": (4, 1, (4, 0, 8, 0), 0, 4),
    "b8_all_off": (4, 1, (9, 1, 2, 3), 0, 8),
    "b3_k2_two_blocks_one_over": (4, 2, (7, 3, 2, 4), 0, 3),
    "b4_masked_edges": (4, 2, (4, 5, 0, 3), 2, 4),
}


@pytest.mark.parametrize("case_id", sorted(BLOCK_CASES))
def test_block_layout_with_a_chosen_block_size(case_id):
    e, k, sizes, n_masked, block = BLOCK_CASES[case_id]
    case = case_arrays(e, k, sizes, n_masked, seed=zlib.crc32(case_id.encode()))
    out, extra, grads = value_and_grads(block_layout_fn(e, block), case)
    check_against_numpy(case, out, extra, grads)


def edges(sizes, block):
    """Which edges of a block the groups meet."""
    sizes = np.asarray(sizes)
    return {
        "empty": (sizes == 0).any(),
        "one block": (sizes == block).any(),
        "one row over": ((sizes % block == 1) & (sizes > block)).any(),
        "every group off": (sizes % block > 0).all() and (sizes % block).sum() < block,
        "every group a multiple": (sizes % block == 0).all(),
    }


def test_the_tables_meet_every_edge():
    """The tables above still hold what their comments say."""
    met = set()
    for e, k, sizes, n_masked in DROPLESS_CASES.values():
        routing_of(sizes, k, 0, n_masked)
        block = block_of(e, k, sizes, n_masked)
        met |= {
            name
            for name, yes in edges(sizes, block).items()
            if yes and (name != "every group off" or not n_masked)
        }
    assert met == set(edges([0], 1))
    met = set()
    for _, k, sizes, n_masked, block in BLOCK_CASES.values():
        routing_of(sizes, k, 0, n_masked)
        met |= {name for name, yes in edges(sizes, block).items() if yes}
    assert met == set(edges([0], 1))
    tiers = set()
    for case_id, (e, k, sizes, n_masked, factors, tier) in TIER_CASES.items():
        capacities = tier_capacities(e, k, sizes, n_masked, factors)
        held = [i for i, c in enumerate(capacities) if max(sizes) <= c]
        assert (held[0] if held else "blocks") == tier, case_id
        if tier != "blocks" and "full" in case_id:
            assert max(sizes) == capacities[tier], case_id
        if "one_over" in case_id:
            assert max(sizes) == capacities[tier - 1] + 1, case_id
        tiers.add(tier)
    assert tiers == {0, 1, 2, "blocks"}
    e, k, sizes, n_masked, _, _ = TIER_CASES["blocks_all_off"]
    assert edges(sizes, block_of(e, k, sizes, n_masked))["every group off"]
    for case_id, (e, k, sizes, n_masked, factor) in CAPACITY_CASES.items():
        capacity = tier_capacities(e, k, sizes, n_masked, (factor,))[0]
        assert max(sizes) > capacity and capacity in sizes, case_id
