"""The routers' state (routing statistics, the balance bias) is float32 under
every dtype policy: a half-precision count stops at 256 (bfloat16) or 2048
(float16), and a bias step of 0.01 from 4.0 rounds to 0 or 0.0156."""

import keras
import numpy as np
import pytest

from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe.routing import ExpertChoiceRouter
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy

POLICIES = ["bfloat16", "float16", "mixed_bfloat16"]
D, E = 8, 4

LAYERS = {
    "top_k_router": (lambda p: TopKRouter(E, balance_bias_rate=0.01, dtype=p), (6, D)),
    "expert_choice_router": (lambda p: ExpertChoiceRouter(E, dtype=p), (6, D)),
    "moe_feed_forward": (
        lambda p: MoEFeedForward(8, E, balance_bias_rate=0.01, dtype=p),
        (2, 3, D),
    ),
    "expert_choice": (
        lambda p: MoEFeedForward(
            8, E, routing="expert_choice", capacity_factor=1.0, dtype=p
        ),
        (2, 3, D),
    ),
    "dense_moe": (lambda p: DenseMoE(8, E, top_k=2, dtype=p), (6, D)),
    "soft_moe": (lambda p: SoftMoE(8, E, dtype=p), (2, 3, D)),
}


def state_holder(layer):
    """The layer that keeps the routing state (a host's router)."""
    router = getattr(layer, "router", None)
    return router if router is not None else layer


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_state_is_float32_and_counts_past_half_precision(kind, policy):
    make, shape = LAYERS[kind]
    layer = make(policy)
    x = inputs(shape)
    layer(x, training=True)
    state = [v for v in layer.weights if not v.trainable]
    statistics = state_holder(layer).statistics
    assert {v.path for v in state} >= {v.path for v in statistics.variables}
    assert {v.name for v in statistics.variables} >= {
        "expert_load_sum",
        "router_entropy_sum",
        "steps",
    }
    for v in state:
        assert v.dtype == "float32", v.path
        assert keras.backend.standardize_dtype(v.value.dtype) == "float32"
    # As after 256 training calls, then one more: bfloat16 holds 256 but not
    # 257 (float16: 2048 but not 2049, checked below).
    load = to_numpy(statistics.expert_load_sum)
    statistics.expert_load_sum.assign(load * 256)
    statistics.steps.assign(256.0)
    layer(x, training=True)
    assert layer.routing_stats_mean()["steps"] == 257
    statistics.steps.assign(2048.0)
    layer(x, training=True)
    assert layer.routing_stats_mean()["steps"] == 2049
    stats = layer.routing_stats
    assert stats["expert_load"].dtype == np.float32
    assert sum(stats["expert_load"]) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_257_calls_count_257_steps(policy):
    router = TopKRouter(E, dtype=policy)
    x = inputs((3, D))
    for _ in range(257):
        router(x, training=True)
    assert router.routing_stats_mean()["steps"] == 257


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("host", [False, True])
def test_balance_bias_step_is_exact(policy, host):
    """A step of 0.01 from 4.0 is 4.0 +- 0.01 in float32 (bfloat16: 4.0 or
    4.03125). On TensorFlow the bfloat16 training call crashed in the bias
    update (a bfloat16 variable plus a float32 step)."""
    if host:
        layer = MoEFeedForward(8, E, top_k=1, balance_bias_rate=0.01, dtype=policy)
        x = inputs((2, 5, D), seed=1)
    else:
        layer = TopKRouter(E, top_k=1, balance_bias_rate=0.01, dtype=policy)
        x = inputs((10, D), seed=1)
    layer.build(x.shape)
    router = state_holder(layer)
    router.balance_bias.assign(np.full((E,), 4.0, "float32"))
    layer(x, training=True)
    load = router.routing_stats["expert_load"]
    step = np.float32(0.01) * np.sign(np.float32(1.0 / E) - load).astype("float32")
    expected = np.float32(4.0) + step
    assert np.any(step != 0)
    np.testing.assert_array_equal(to_numpy(router.balance_bias), expected)
