"""TopKRouter on its own: Keras's layer harness, its decisions, losses and
statistics against NumPy, masking, noise, dispatch, config and errors."""

import numpy as np
import pytest
from keras import ops
from keras.src import testing

from keras_moe import routing
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.routing.test_dispatch import np_softmax
from tests.routing.test_dispatch import np_top_k_gates

E, D = 5, 6


class TopKRouterLayerTest(testing.TestCase):
    def test_layer_harness(self):
        # The routing statistics: 3 last values, their sums, steps.
        run_harness(
            self,
            routing.TopKRouter,
            {"n_experts": E, "top_k": 2, "use_bias": True},
            ((7, D), ((7, 2), (7, 2))),
            (2, 7, 0, 0),
            run_training_check=False,  # integer outputs have no gradient
            run_mixed_precision_check=False,  # checked below: float32 router
        )

    def test_layer_harness_noisy_with_losses(self):
        run_harness(
            self,
            routing.TopKRouter,
            {
                "n_experts": E,
                "top_k": 1,
                "noisy_gating": True,
                "load_balance_weight": 0.1,
                "router_z_loss_weight": 0.01,
                "seed": 3,
            },
            ((7, D), ((7, 1), (7, 1))),
            (2, 7, 1, None),
            run_training_check=False,  # integer outputs have no gradient
            run_mixed_precision_check=False,  # checked below: float32 router
        )


def randomized_router(**kwargs):
    router = routing.TopKRouter(E, use_bias=True, **kwargs)
    router.build((None, D))
    rng = np.random.default_rng(0)
    router.kernel.assign(rng.normal(size=(D, E)).astype("float32"))
    router.bias.assign(rng.normal(size=(E,)).astype("float32"))
    return router


@pytest.mark.parametrize("k", [1, 2, E])
@pytest.mark.parametrize("normalize", [True, False])
def test_decisions_losses_and_statistics_match_numpy(k, normalize):
    router = randomized_router(
        top_k=k,
        normalize_top_k=normalize,
        load_balance_weight=0.5,
        router_z_loss_weight=0.25,
    )
    x = np.random.default_rng(1).normal(size=(11, D)).astype("float32")
    weights, experts = router(x, training=True)
    logits = x.astype("float64") @ to_numpy(router.kernel) + to_numpy(router.bias)
    ref_weights, ref_experts = np_top_k_gates(logits, k, normalize)
    np.testing.assert_array_equal(to_numpy(experts), ref_experts)
    np.testing.assert_allclose(to_numpy(weights), ref_weights, rtol=1e-5, atol=1e-6)
    balance, z = (float(to_numpy(v)) for v in router.losses)
    f = np.bincount(ref_experts.ravel(), minlength=E) / ref_experts.size
    probs = np_softmax(logits)
    assert balance == pytest.approx(0.5 * E * np.sum(f * probs.mean(0)), rel=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    assert z == pytest.approx(0.25 * np.mean(lse**2), rel=1e-5)
    stats = router.routing_stats
    np.testing.assert_allclose(stats["expert_load"], f, rtol=1e-6)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert router.routing_stats_mean()["steps"] == 1
    router(x)  # inference: no loss, no running sum
    assert router.losses == []
    assert router.routing_stats_mean()["steps"] == 1
    router.reset_routing_stats()
    assert router.routing_stats_mean() is None


def test_masked_tokens_count_nowhere():
    router = randomized_router(top_k=2, load_balance_weight=1.0)
    x = np.random.default_rng(2).normal(size=(9, D)).astype("float32")
    mask = np.arange(9) < 6
    router(x, mask=mask, training=True)
    masked = (float(to_numpy(router.losses[0])), router.routing_stats)
    router(x[:6], training=True)
    assert float(to_numpy(router.losses[0])) == pytest.approx(masked[0], rel=1e-6)
    np.testing.assert_allclose(
        router.routing_stats["expert_load"], masked[1]["expert_load"], rtol=1e-6
    )


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_runs_the_experts_and_reports_drops(capacity_factor):
    router = randomized_router(top_k=2, capacity_factor=capacity_factor)
    x = np.random.default_rng(3).normal(size=(10, D)).astype("float32")
    kernel = np.random.default_rng(4).normal(size=(E, D, 3)).astype("float32")

    def expert_bank(rows, layout):
        return layout.matmul(rows, layout.select(ops.convert_to_tensor(kernel)))

    weights, experts = router(x, training=True)
    y = to_numpy(router.dispatch(x, weights, experts, expert_bank, training=True))
    w, e = to_numpy(weights), to_numpy(experts)
    ref = np.zeros((10, 3))
    served = np.zeros(E, int)
    capacity = None if capacity_factor is None else int(np.ceil(0.5 * 10 * 2 / E))
    for slot in range(2):
        for t in range(10):
            if capacity is not None and served[e[t, slot]] >= capacity:
                continue
            served[e[t, slot]] += 1
            ref[t] += w[t, slot] * (x[t] @ kernel[e[t, slot]])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    dropped = 1.0 - served.sum() / 20.0
    assert router.routing_stats["dropped_fraction"] == pytest.approx(dropped)
    assert router.routing_stats_mean()["dropped_fraction"] == pytest.approx(dropped)
    if capacity_factor is not None:
        assert dropped > 0  # the case really overflows


def test_config_round_trip():
    router = routing.TopKRouter(
        E,
        top_k=3,
        normalize_top_k=False,
        capacity_factor=1.25,
        layout="capacity",
        noisy_gating=True,
        load_balance_weight=0.1,
        router_z_loss_weight=0.2,
        use_bias=True,
        kernel_initializer="zeros",
        kernel_regularizer="l2",
        seed=4,
    )
    clone = routing.TopKRouter.from_config(router.get_config())
    assert clone.get_config() == router.get_config()


# Bad arguments every router refuses: `(kwargs, error, match)`.
ROUTER_BAD_ARGUMENTS = [
    ({"n_experts": 0}, ValueError, "`n_experts` must be an integer >= 1"),
    ({"n_experts": 4, "top_k": 5}, ValueError, "top_k=5, n_experts=4"),
    ({"n_experts": 4, "top_k": 1.5}, TypeError, "`top_k` must be an integer"),
    ({"n_experts": 4, "capacity_factor": 0}, ValueError, "capacity_factor"),
    ({"n_experts": 4, "use_bias": "yes"}, TypeError, "`use_bias` must be a bool"),
]


@pytest.mark.parametrize(
    "kwargs, error, match",
    ROUTER_BAD_ARGUMENTS
    + [
        ({"n_experts": 4, "load_balance_weight": -1}, ValueError, "load_balance"),
        ({"n_experts": 4, "seed": -1}, ValueError, "`seed`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        routing.TopKRouter(**kwargs)


def test_statistics_before_build_are_a_clear_error():
    with pytest.raises(ValueError, match="before it is built"):
        _ = routing.TopKRouter(E).routing_stats


def test_outputs_are_float32_and_int32():
    router = routing.TopKRouter(E, top_k=2)
    weights, experts = router(ops.ones((3, D)))
    assert str(to_numpy(weights).dtype) == "float32"
    assert str(to_numpy(experts).dtype) == "int32"
