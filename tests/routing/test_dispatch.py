"""The routing core: top-k gates, sparse dispatch in every layout, capacity,
auxiliary losses and statistics, against NumPy references."""

import collections
import math

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_moe import backend
from keras_moe import routing
from tests.conftest import to_numpy

N_EXPERTS = 5


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_top_k_gates(logits, k, normalize, bias=0.0):
    """Reference: experts by decreasing `logits + bias`, softmax weights of
    the logits (float64)."""
    logits = logits.astype("float64")
    experts = np.argsort(-(logits + bias), axis=-1, kind="stable")[:, :k]
    chosen = np.take_along_axis(logits, experts, axis=-1)
    if normalize:
        weights = np_softmax(chosen)
    else:
        weights = np.take_along_axis(np_softmax(logits), experts, axis=-1)
    return weights, experts


def np_kept(experts, capacity=None, mask=None):
    """The assignments `(token, slot, expert)` that are served: slot-major
    (every token's first choice, in token order, before any second choice),
    an expert's assignments past `capacity` dropped, masked tokens routed
    nowhere. Returns them and the fraction of the routed ones dropped."""
    n, k = experts.shape
    served = collections.Counter()
    kept, routed = [], 0
    for slot in range(k):
        for t in range(n):
            if mask is not None and not mask[t]:
                continue
            e = experts[t, slot]
            routed += 1
            if capacity is None or served[e] < capacity:
                served[e] += 1
                kept.append((t, slot, e))
    return kept, (routed - len(kept)) / max(routed, 1)


def np_sparse_mixture(x, experts, weights, kernel, bias, capacity=None, mask=None):
    """Reference: a loop over the served assignments (`np_kept`)."""
    out = np.zeros((experts.shape[0], kernel.shape[-1]))
    kept, dropped = np_kept(experts, capacity, mask)
    for t, slot, e in kept:
        out[t] += weights[t, slot] * np.tanh(x[t] @ kernel[e] + bias[e])
    return out, dropped


def random_case(seed, n=23, d=6, m=7, skew=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    kernel = rng.normal(size=(N_EXPERTS, d, m)).astype("float32") / math.sqrt(d)
    bias = rng.normal(size=(N_EXPERTS, m)).astype("float32")
    logits = rng.normal(size=(n, N_EXPERTS)).astype("float32")
    logits[:, 0] += skew
    return x, kernel, bias, logits


def tanh_bank(kernel, bias):
    """An expert bank `tanh(x . W_e + b_e)`, as a function of `(rows, layout)`
    that multiplies through the layout's `select`, `matmul` and `broadcast`."""
    kernel = ops.convert_to_tensor(kernel)
    bias = ops.convert_to_tensor(bias)

    def bank(rows, layout):
        h = layout.matmul(rows, layout.select(kernel))
        return ops.tanh(h + layout.broadcast(layout.select(bias)))

    return bank


def run_sparse(
    x,
    logits,
    kernel,
    bias,
    k,
    normalize=True,
    capacity_factor=None,
    mask=None,
    layout="auto",
    factors=routing.DROPLESS_CAPACITY_FACTORS,
    training=None,
):
    weights, experts, _ = routing.top_k_gates(logits, k, normalize)
    out, sizes, dropped = routing.sparse_mixture(
        x,
        experts,
        weights,
        N_EXPERTS,
        tanh_bank(kernel, bias),
        capacity_factor,
        mask,
        layout=layout,
        dropless_capacity_factors=factors,
        training=training,
    )
    return to_numpy(out), to_numpy(sizes), float(to_numpy(dropped))


def run_top_2(x, kernel, bias, logits, capacity_factor, path, mask=None):
    """`run_sparse` at top-2 of a `random_case`, on a path of `DROPLESS_PATHS`."""
    return run_sparse(
        x,
        logits,
        kernel,
        bias,
        2,
        capacity_factor=capacity_factor,
        mask=mask,
        **DROPLESS_PATHS[path],
    )


# The dropless layouts `sparse_mixture` can take here: its arguments.
DROPLESS_PATHS = {
    "default": {},
    "blocks": {"layout": "blocks"},
    "tiers_fast_path": {"layout": "tiers", "factors": (1.0, 1.5)},
    "tiers_then_blocks": {"layout": "tiers", "factors": ()},
}
if backend.grouped_matmul_available():  # JAX, PyTorch
    DROPLESS_PATHS["grouped"] = {"layout": "grouped"}

# Every dropless path, and a capacity.
CAPACITY_AND_PATHS = [(None, path) for path in sorted(DROPLESS_PATHS)] + [
    (1.0, "default")
]

# The plan `plan_dispatch` makes for each layout `choose_layout` names.
PLANS = {
    "capacity": routing.CapacityLayout,
    "tiers": routing.TieredPlan,
    "blocks": routing.BlockLayout,
    "grouped": routing.RowLayout,
}


@pytest.mark.parametrize("k", [1, 2, 3, N_EXPERTS])
@pytest.mark.parametrize("normalize", [True, False])
def test_top_k_gates_match_numpy(k, normalize):
    _, _, _, logits = random_case(0)
    weights, experts, probs = routing.top_k_gates(logits, k, normalize)
    ref_weights, ref_experts = np_top_k_gates(logits, k, normalize)
    np.testing.assert_array_equal(to_numpy(experts), ref_experts)
    np.testing.assert_allclose(to_numpy(weights), ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(probs), np_softmax(logits), rtol=1e-5)
    assert to_numpy(weights).dtype == np.float32


@pytest.mark.parametrize(
    "k, normalize, path",
    [
        (k, normalize, "default")
        for k in (1, 2, 3, N_EXPERTS)
        for normalize in (True, False)
    ]
    + [
        (k, True, path)
        for k in (1, 3)
        for path in sorted(set(DROPLESS_PATHS) - {"default"})
    ],
)
def test_dropless_mixture_matches_numpy(k, normalize, path):
    x, kernel, bias, logits = random_case(k, skew=1.0)
    out, sizes, dropped = run_sparse(
        x, logits, kernel, bias, k, normalize, **DROPLESS_PATHS[path]
    )
    weights, experts = np_top_k_gates(logits, k, normalize)
    ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sizes, np.bincount(experts.ravel(), minlength=5))
    assert dropped == 0.0


def plan_of(x, logits, k, capacity_factor=None, mask=None, **kwargs):
    """`(plan, choose_layout's name)` of a dispatch of these tokens."""
    weights, experts, _ = routing.top_k_gates(logits, k)
    plan, _ = routing.plan_dispatch(
        x,
        experts,
        weights,
        N_EXPERTS,
        capacity_factor=capacity_factor,
        mask=mask,
        **kwargs,
    )
    name = routing.choose_layout(
        kwargs.get("layout", "auto"),
        capacity_factor=capacity_factor,
        training=kwargs.get("training"),
        features=x.shape[-1],
        n_assignments=len(x) * k,
        n_experts=N_EXPERTS,
        has_grouped_matmul=backend.grouped_matmul_available(),
        distributed=keras.distribution.distribution() is not None,
        prefers_grouped_matmul=backend.grouped_matmul_preferred(),
    )
    return plan, name


@pytest.mark.parametrize("training, d", [(True, 6), (False, 6), (True, 80)])
def test_auto_layout_follows_training(training, d):
    """Dropless `"auto"` where the backend prefers no grouped matmul: the
    blocks for a training call (no `ops.cond`, whose gradient keeps every
    branch's intermediates) on tokens of at most twice the block size's
    features (here 32 rows: 64), the capacity tiers otherwise; where it
    prefers one (PyTorch), the sorted rows always. The same outputs either
    way."""
    assert routing.default_block_size(23 * 2, N_EXPERTS) == 32
    x, kernel, bias, logits = random_case(2, d=d, skew=1.0)
    plan, name = plan_of(x, logits, 2, training=training)
    if backend.grouped_matmul_preferred():
        expected = routing.RowLayout
    elif training and d <= 64:
        expected = routing.BlockLayout
    else:
        expected = routing.TieredPlan
    assert type(plan) is expected is PLANS[name]
    out, _, _ = run_sparse(x, logits, kernel, bias, 2, training=training)
    weights, experts = np_top_k_gates(logits, 2, True)
    ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


SETTINGS = [
    {"layout": layout, "capacity_factor": factor, "training": training}
    for layout, factor in [
        ("auto", None),
        ("tiers", None),
        ("blocks", None),
        ("grouped", None),
        ("auto", 0.75),
        ("capacity", 0.75),
    ]
    for training in (False, True)
    if layout != "grouped" or backend.grouped_matmul_available()
]


@pytest.mark.parametrize("d", [6, 80])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_plan_dispatch_makes_the_plan_choose_layout_names(setting, d):
    """`plan_dispatch` runs `choose_layout` on the call's sizes and this
    backend's grouped matmul, and makes that layout's plan, which runs the
    experts as the NumPy reference does."""
    setting = dict(setting)
    capacity_factor = setting.pop("capacity_factor")
    x, kernel, bias, logits = random_case(3, d=d)
    plan, name = plan_of(x, logits, 2, capacity_factor, **setting)
    assert type(plan) is PLANS[name]
    if setting["layout"] != "auto":
        assert name == setting["layout"]
    out, _, _ = run_sparse(
        x, logits, kernel, bias, 2, capacity_factor=capacity_factor, **setting
    )
    weights, experts = np_top_k_gates(logits, 2, True)
    capacity = None
    if capacity_factor is not None:
        capacity = routing.expert_capacity(len(x), 2, N_EXPERTS, capacity_factor)
    ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias, capacity)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_skewed_routing_takes_the_exact_fallback():
    """Everything to expert 0: no capacity buffer holds it, nothing is dropped."""
    x, kernel, bias, logits = random_case(3, skew=50.0)
    out, sizes, dropped = run_sparse(x, logits, kernel, bias, 1, layout="tiers")
    weights, experts = np_top_k_gates(logits, 1, True)
    assert sizes[0] == len(x)
    ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert dropped == 0.0


def test_under_a_distribution_the_exact_fallback_is_a_full_buffer(monkeypatch):
    """Under a `keras.distribution` the dropless tiers end in a capacity
    buffer of `n` slots per expert, which holds every assignment, so they
    never reach the blocks (whose per-block weight copies would move sharded
    expert weights between devices); `"auto"` never takes the blocks."""
    monkeypatch.setattr(keras.distribution, "distribution", lambda: object())
    for k in (1, 2):
        x, kernel, bias, logits = random_case(3, skew=50.0)
        plan, _ = plan_of(x, logits, k, layout="tiers")
        assert isinstance(plan, routing.TieredPlan)
        assert plan.capacities[-1] == len(x)
        # One tier more than `DROPLESS_CAPACITY_FACTORS`: the full one.
        assert len(plan.capacities) == len(routing.DROPLESS_CAPACITY_FACTORS) + 1
        out, sizes, dropped = run_sparse(x, logits, kernel, bias, k, layout="tiers")
        weights, experts = np_top_k_gates(logits, k, True)
        assert sizes[0] == len(x)
        ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        assert dropped == 0.0
        plan, name = plan_of(x, logits, k, training=True)
        assert name != "blocks" and not isinstance(plan, routing.BlockLayout)


class _FakeMesh:
    shape = (2, 1)
    axis_names = ("batch", "expert")


class _FakeDistribution:
    """What `routing.distribution_groups` reads of a distribution: a batch
    axis of 2 devices (the layouts themselves are checked on 8 simulated
    devices in tests/test_distribution.py)."""

    batch_dim_name = "batch"
    device_mesh = _FakeMesh()


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_routing_under_a_distribution(k, monkeypatch):
    """Under a distribution with a batch axis of 2, each half of the tokens is
    routed on its own: dropless equals one routing over all tokens, and a
    capacity holds per group (GShard's semantics)."""
    monkeypatch.setattr(keras.distribution, "distribution", _FakeDistribution)
    constrained = []

    def distribute_tensor(x, layout):
        constrained.append((tuple(x.shape), tuple(layout.axes)))
        return x

    monkeypatch.setattr(keras.distribution, "distribute_tensor", distribute_tensor)
    monkeypatch.setattr(
        keras.distribution,
        "TensorLayout",
        lambda axes, mesh: type("L", (), {"axes": axes}),
    )
    assert routing.distribution_groups(12)[0] == 2
    assert routing.distribution_groups(13) == (1, None)
    x, kernel, bias, logits = random_case(4, n=24, skew=1.0)
    weights, experts = np_top_k_gates(logits, k, True)
    out, sizes, dropped = run_sparse(x, logits, kernel, bias, k, layout="tiers")
    ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sizes, np.bincount(experts.ravel(), minlength=5))
    assert dropped == 0.0
    # (groups, experts, capacity, features) buffers over (batch, expert axis).
    assert constrained and all(
        shape[:2] == (2, N_EXPERTS) and axes[:2] == ("batch", None)
        for shape, axes in constrained
    )
    # A capacity per group: each half against its own NumPy reference.
    out, _, dropped = run_sparse(x, logits, kernel, bias, k, capacity_factor=0.5)
    half = len(x) // 2
    capacity = math.ceil(0.5 * half * k / N_EXPERTS)
    total_dropped = 0.0
    for rows in (slice(0, half), slice(half, None)):
        ref, ref_dropped = np_sparse_mixture(
            x[rows], experts[rows], weights[rows], kernel, bias, capacity
        )
        np.testing.assert_allclose(out[rows], ref, rtol=1e-4, atol=1e-5)
        total_dropped += ref_dropped / 2
    np.testing.assert_allclose(dropped, total_dropped, rtol=1e-5)


@pytest.mark.parametrize(
    "layout", sorted({"blocks", *DROPLESS_PATHS.get("grouped", {}).values()})
)
def test_explicit_dropless_layouts_under_a_distribution(layout, monkeypatch):
    """An explicit `"blocks"` or `"grouped"` under a distribution with a batch
    axis of 2: one routing over every token (dropless, the same as routing
    groups would give), on the experts' own weights. (They ran the virtual
    experts of the groups, `2 * E` of them, on the `E` experts' weights.)"""
    monkeypatch.setattr(keras.distribution, "distribution", _FakeDistribution)
    assert routing.distribution_groups(24)[0] == 2
    x, kernel, bias, logits = random_case(5, n=24, skew=1.0)
    weights, experts = np_top_k_gates(logits, 2, True)
    out, sizes, dropped = run_sparse(x, logits, kernel, bias, 2, layout=layout)
    ref, _ = np_sparse_mixture(x, experts, weights, kernel, bias)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sizes, np.bincount(experts.ravel(), minlength=5))
    assert dropped == 0.0


@pytest.mark.parametrize("k", [1, 2])
def test_large_capacity_equals_dropless(k):
    x, kernel, bias, logits = random_case(5, skew=2.0)
    dropless, _, _ = run_sparse(x, logits, kernel, bias, k)
    capped, _, dropped = run_sparse(x, logits, kernel, bias, k, capacity_factor=10.0)
    np.testing.assert_allclose(capped, dropless, rtol=1e-5, atol=1e-6)
    assert dropped == 0.0


@pytest.mark.parametrize("n", [1, 7, 64])
def test_capacity_is_capped_at_the_tokens(n):
    """An expert takes a token at most once: more than `n` slots would stay
    empty (a huge `capacity_factor` allocated a huge buffer)."""
    for factor in (1e6, 1e12):
        assert routing.expert_capacity(n, 2, 4, factor) == n
        # A dynamic token count (TensorFlow's graph mode): no int32 overflow.
        capacity = routing.expert_capacity(ops.convert_to_tensor(n), 2, 4, factor)
        assert int(to_numpy(capacity)) == n
    assert routing.expert_capacity(n, 2, 4, 1.0) == max(1, math.ceil(n / 2))
    assert routing.expert_capacity(0, 2, 4, 1e6) == 1


def test_a_huge_capacity_factor_builds_a_buffer_of_the_tokens():
    from keras_moe import MoEFeedForward

    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype("float32")
    tokens = x.reshape(6, 6)
    logits = np.random.default_rng(1).normal(size=(6, N_EXPERTS)).astype("float32")
    plan, _ = plan_of(tokens, logits, 2, capacity_factor=1e6)
    assert isinstance(plan, routing.CapacityLayout)
    assert tuple(plan.gather(tokens).shape) == (N_EXPERTS, 6, 6)
    huge = MoEFeedForward(5, 4, top_k=2, capacity_factor=1e6)
    # E / top_k: capacity n, every assignment served.
    exact = MoEFeedForward(5, 4, top_k=2, capacity_factor=2.0)
    huge.build(x.shape)
    exact.build(x.shape)
    exact.set_weights(huge.get_weights())
    y = to_numpy(huge(x))
    np.testing.assert_allclose(y, to_numpy(exact(x)), rtol=1e-6, atol=1e-6)
    assert huge.routing_stats["dropped_fraction"] == 0.0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
@pytest.mark.parametrize("k", [1, 2])
def test_capacity_drops_overflow_like_numpy(capacity_factor, k):
    x, kernel, bias, logits = random_case(7, skew=1.5)
    out, _, dropped = run_sparse(
        x, logits, kernel, bias, k, capacity_factor=capacity_factor
    )
    weights, experts = np_top_k_gates(logits, k, True)
    capacity = math.ceil(capacity_factor * len(x) * k / N_EXPERTS)
    ref, ref_dropped = np_sparse_mixture(x, experts, weights, kernel, bias, capacity)
    assert ref_dropped > 0  # the case really overflows
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert dropped == pytest.approx(ref_dropped, abs=1e-6)


@pytest.mark.parametrize(
    "capacity_factor, path", [(None, "default"), (None, "blocks"), (1.0, "default")]
)
def test_masked_tokens_are_not_dispatched(capacity_factor, path):
    x, kernel, bias, logits = random_case(11, skew=1.0)
    mask = np.random.default_rng(0).random(len(x)) > 0.4
    out, sizes, dropped = run_top_2(
        x, kernel, bias, logits, capacity_factor, path, mask
    )
    weights, experts = np_top_k_gates(logits, 2, True)
    capacity = None
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * len(x) * 2 / N_EXPERTS)
    ref, ref_dropped = np_sparse_mixture(
        x, experts, weights, kernel, bias, capacity, mask
    )
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[~mask], 0.0)
    assert sizes.sum() == 2 * mask.sum()
    assert dropped == pytest.approx(ref_dropped, abs=1e-6)


def test_top_k_all_experts_is_the_softmax_mixture():
    x, kernel, bias, logits = random_case(13)
    out, _, _ = run_sparse(x, logits, kernel, bias, N_EXPERTS)
    h = np.tanh(np.einsum("nd,edm->nem", x, kernel) + bias)
    ref = np.einsum("nem,ne->nm", h, np_softmax(logits.astype("float64")))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def np_load_balance(logits, k, mask=None):
    keep = np.ones(len(logits), bool) if mask is None else mask
    probs = np_softmax(logits.astype("float64"))[keep]
    _, experts = np_top_k_gates(logits[keep], k, True)
    f = np.bincount(experts.ravel(), minlength=logits.shape[1]) / experts.size
    return logits.shape[1] * np.sum(f * probs.mean(axis=0))


def np_z_loss(logits, mask=None):
    keep = np.ones(len(logits), bool) if mask is None else mask
    z = logits.astype("float64")[keep]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return np.mean(lse**2)


@pytest.mark.parametrize("k", [1, 2, 3, N_EXPERTS])
@pytest.mark.parametrize("masked", [False, True])
def test_losses_match_numpy(k, masked):
    _, _, _, logits = random_case(17, skew=0.7)
    mask = np.random.default_rng(1).random(len(logits)) > 0.3 if masked else None
    _, experts, probs = routing.top_k_gates(logits, k)
    sizes = routing.expert_counts(experts, N_EXPERTS, mask)
    balance = routing.load_balance_loss(probs, sizes, mask)
    z = routing.router_z_loss(logits, mask)
    assert to_numpy(balance).dtype == np.float32
    assert float(to_numpy(balance)) == pytest.approx(
        np_load_balance(logits, k, mask), rel=1e-5
    )
    assert float(to_numpy(z)) == pytest.approx(np_z_loss(logits, mask), rel=1e-5)


def test_masked_tokens_do_not_change_the_losses():
    _, _, _, logits = random_case(19)
    mask = np.arange(len(logits)) < 15
    garbage = logits.copy()
    garbage[~mask] = 100.0 * np.arange(N_EXPERTS)
    for values in (logits, garbage):
        _, experts, probs = routing.top_k_gates(values, 2)
        sizes = routing.Assignments(experts, ops.ones(experts.shape), N_EXPERTS, mask)
        balance = float(
            to_numpy(routing.load_balance_loss(probs, sizes.group_sizes, mask))
        )
        z = float(to_numpy(routing.router_z_loss(values, mask)))
        assert balance == pytest.approx(np_load_balance(logits[mask], 2), rel=1e-5)
        assert z == pytest.approx(np_z_loss(logits[mask]), rel=1e-5)


def test_load_balance_is_one_at_perfect_balance():
    # Every expert gets the same share of the assignments and of the softmax.
    logits = np.tile(np.eye(N_EXPERTS, dtype="float32") * 3.0, (4, 1))
    _, experts, probs = routing.top_k_gates(logits, 1)
    sizes = routing.Assignments(experts, ops.ones(experts.shape), N_EXPERTS)
    loss = routing.load_balance_loss(probs, sizes.group_sizes)
    assert float(to_numpy(loss)) == pytest.approx(1.0, rel=1e-6)


def test_noisy_logits_scale_and_seed():
    _, _, _, logits = random_case(29)
    x = np.ones((len(logits), 3), "float32")
    noise_kernel = np.full((3, N_EXPERTS), -30.0, "float32")  # softplus ~ 0
    quiet = routing.noisy_logits(logits, x, noise_kernel, keras.random.SeedGenerator(1))
    np.testing.assert_allclose(to_numpy(quiet), logits, atol=1e-6)
    loud_kernel = np.full((3, N_EXPERTS), 1.0, "float32")  # softplus(3) ~ 3.05
    a = to_numpy(
        routing.noisy_logits(logits, x, loud_kernel, keras.random.SeedGenerator(1))
    )
    b = to_numpy(
        routing.noisy_logits(logits, x, loud_kernel, keras.random.SeedGenerator(1))
    )
    np.testing.assert_array_equal(a, b)
    assert np.std(a - logits) == pytest.approx(math.log1p(math.e**3), rel=0.2)


@settings(max_examples=6, deadline=None)
@given(
    n=st.sampled_from([1, 7]),
    k=st.integers(1, N_EXPERTS),
    seed=st.integers(0, 2**16),
)
def test_normalized_gates_sum_to_one_and_outputs_have_token_shape(n, k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, N_EXPERTS)).astype("float32") * 3
    weights, experts, _ = routing.top_k_gates(logits, k)
    np.testing.assert_allclose(to_numpy(weights).sum(-1), 1.0, rtol=1e-5)
    assert (np.diff(np.sort(to_numpy(experts), -1), axis=-1) > 0).all()
    x = rng.normal(size=(n, 3)).astype("float32")
    kernel = rng.normal(size=(N_EXPERTS, 3, 2)).astype("float32")
    out, sizes, _ = run_sparse(
        x, logits, kernel, np.zeros((N_EXPERTS, 2), "float32"), k
    )
    assert out.shape == (n, 2)
    assert sizes.sum() == n * k


def test_key_overflow_is_a_clear_error():
    experts = ops.zeros((2**20, 2), "int32")
    with pytest.raises(ValueError, match="n_experts=1024"):
        routing.Assignments(experts, ops.zeros((2**20, 2)), 1024)


@pytest.mark.parametrize("capacity_factor, path", CAPACITY_AND_PATHS)
def test_every_token_masked_drops_nothing(capacity_factor, path):
    """Nothing routed is nothing dropped: `dropped_fraction` 0, output 0."""
    x, kernel, bias, logits = random_case(31)
    mask = np.zeros(len(x), bool)
    out, sizes, dropped = run_top_2(
        x, kernel, bias, logits, capacity_factor, path, mask
    )
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(sizes, 0)
    assert dropped == 0.0


@pytest.mark.parametrize("capacity_factor, path", CAPACITY_AND_PATHS)
def test_an_empty_batch_gives_an_empty_output(capacity_factor, path):
    x, kernel, bias, logits = random_case(37, n=0)
    out, sizes, dropped = run_top_2(x, kernel, bias, logits, capacity_factor, path)
    assert out.shape == (0, kernel.shape[-1])
    np.testing.assert_array_equal(sizes, 0)
    assert dropped == 0.0


def test_losses_and_statistics_of_no_token_are_zero():
    logits = np.zeros((0, N_EXPERTS), "float32")
    _, experts, probs = routing.top_k_gates(logits, 2)
    sizes = routing.expert_counts(experts, N_EXPERTS)
    for value in (
        routing.load_balance_loss(probs, sizes),
        routing.router_z_loss(logits),
        routing.router_entropy(logits),
    ):
        assert float(to_numpy(value)) == 0.0
    router = routing.TopKRouter(N_EXPERTS, load_balance_weight=1.0)
    router(np.zeros((0, 3), "float32"), training=True)
    stats = router.routing_stats
    np.testing.assert_array_equal(stats["expert_load"], 0.0)
    assert stats["dropped_fraction"] == stats["router_entropy"] == 0.0
    assert float(to_numpy(router.losses[0])) == 0.0


def test_expert_counts_match_numpy():
    _, _, _, logits = random_case(41, skew=1.0)
    _, experts, _ = routing.top_k_gates(logits, 3)
    mask = np.arange(len(logits)) % 3 > 0
    counts = to_numpy(routing.expert_counts(experts, N_EXPERTS, mask))
    ref = np.bincount(to_numpy(experts)[mask].ravel(), minlength=N_EXPERTS)
    np.testing.assert_array_equal(counts, ref)


def test_layout_is_checked():
    x, kernel, bias, logits = random_case(43)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        run_sparse(x, logits, kernel, bias, 2, layout="nope")
    if not backend.grouped_matmul_available():
        with pytest.raises(ValueError, match="Received: layout='grouped'"):
            run_sparse(x, logits, kernel, bias, 2, layout="grouped")
    else:
        out, _, _ = run_sparse(x, logits, kernel, bias, 2, layout="grouped")
        ref, _, _ = run_sparse(x, logits, kernel, bias, 2, layout="blocks")
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    for n in (len(x), 0):  # an empty batch too
        with pytest.raises(ValueError, match="is a dropless layout"):
            run_sparse(
                x[:n], logits[:n], kernel, bias, 2, capacity_factor=1.0, layout="tiers"
            )
