"""Loss-free balancing by a router bias: the biased selection and the bias
update against NumPy, and `TopKRouter(balance_bias_rate=...)` against them.
(A collapsed router rebalancing under `fit` with frozen weights:
tests/layers/test_moe_feed_forward_routers.py.)"""

import keras
import numpy as np
import pytest

from keras_moe import routing
from tests.conftest import to_numpy
from tests.routing.test_dispatch import np_softmax
from tests.routing.test_dispatch import np_top_k_gates

E, D = 4, 3


def np_delta(counts, rate):
    counts = np.asarray(counts, "float64")
    return rate * np.sign(counts.mean() - counts)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_selection_is_biased_and_weights_are_not(k, normalize):
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(13, E)).astype("float32")
    bias = np.array([-1.5, 0.0, 0.7, 0.2], "float32")
    weights, experts, probs = routing.balanced_top_k_gates(logits, bias, k, normalize)
    ref_weights, ref_experts = np_top_k_gates(logits, k, normalize, bias)
    np.testing.assert_array_equal(to_numpy(experts), ref_experts)
    np.testing.assert_allclose(to_numpy(weights), ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(probs), np_softmax(logits), rtol=1e-5)
    # The bias changed the choice of some token (else this tests nothing).
    unbiased = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    assert np.any(unbiased != ref_experts)


def test_without_a_bias_it_is_top_k_gates():
    logits = np.random.default_rng(3).normal(size=(9, E)).astype("float32")
    for got, expected in zip(
        routing.balanced_top_k_gates(logits, None, 2, True),
        routing.top_k_gates(logits, 2, True),
    ):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(expected))


@pytest.mark.parametrize(
    "counts",
    [
        [10, 0, 3, 3],
        [4, 4, 4, 4],  # balanced: nothing moves
        [0, 0, 0, 0],  # nothing routed: nothing moves
        [1, 2, 3, 2],  # one expert exactly at the mean stays
        [7, 1, 1, 0],
    ],
)
def test_bias_update_matches_numpy(counts):
    rate = 0.25
    delta = to_numpy(routing.balance_bias_delta(np.array(counts, "int32"), rate))
    np.testing.assert_array_equal(delta, np_delta(counts, rate))
    bias = keras.Variable(np.array([0.5, -0.5, 0.0, 1.0], "float32"), trainable=False)
    routing.update_balance_bias(bias, np.array(counts, "int32"), rate)
    np.testing.assert_allclose(
        to_numpy(bias), np.array([0.5, -0.5, 0.0, 1.0]) + np_delta(counts, rate)
    )


def test_repeated_updates_follow_numpy():
    """Ten steps of choose, count, update on fixed logits, step by step."""
    logits = np.random.default_rng(4).normal(size=(32, E)).astype("float32")
    logits[:, 0] += 2.0  # expert 0 is everyone's favourite
    rate = 0.1
    bias = keras.Variable(np.zeros(E, "float32"), trainable=False)
    ref_bias = np.zeros(E)
    for _ in range(10):
        _, experts, _ = routing.balanced_top_k_gates(logits, bias.value, 1)
        counts = routing.expert_counts(experts, E)
        routing.update_balance_bias(bias, counts, rate)
        _, ref_experts = np_top_k_gates(logits, 1, True, ref_bias)
        ref_counts = np.bincount(ref_experts.ravel(), minlength=E)
        np.testing.assert_array_equal(to_numpy(counts), ref_counts)
        ref_bias = ref_bias + np_delta(ref_counts, rate)
        np.testing.assert_allclose(to_numpy(bias), ref_bias, atol=1e-6)
    assert ref_bias[0] < 0 < ref_bias[1:].min()


def test_top_k_router_chooses_with_its_bias_and_moves_it_in_training():
    logits_kernel = np.random.default_rng(6).normal(size=(D, E)).astype("float32")
    x = np.random.default_rng(7).normal(size=(11, D)).astype("float32")
    router = routing.TopKRouter(E, top_k=2, balance_bias_rate=0.5)
    router.build((None, D))
    router.kernel.assign(logits_kernel)
    bias = np.array([2.0, 0.0, -2.0, 0.5], "float32")
    router.balance_bias.assign(bias)
    weights, experts = router(x)  # inference: the bias stays
    ref_weights, ref_experts = np_top_k_gates(x @ logits_kernel, 2, True, bias)
    np.testing.assert_array_equal(to_numpy(experts), ref_experts)
    np.testing.assert_allclose(to_numpy(weights), ref_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(router.routing_stats["balance_bias"], bias)
    router(x, training=True)
    counts = np.bincount(ref_experts.ravel(), minlength=E)
    np.testing.assert_allclose(
        to_numpy(router.balance_bias), bias + np_delta(counts, 0.5), atol=1e-6
    )
    config = router.get_config()
    assert config["balance_bias_rate"] == 0.5
    assert routing.TopKRouter.from_config(config).get_config() == config
    assert routing.TopKRouter(E).get_config()["balance_bias_rate"] == 0.0
