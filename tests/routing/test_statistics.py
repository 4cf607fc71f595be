"""`RoutingStatistics`: the named float32 variables every router (and
`SoftMoE`) keeps its routing statistics in: record, last, mean, reset, the
frozen rule, and 0.2.0's packed vectors."""

import keras
import numpy as np
import pytest

from keras_moe import routing
from tests.conftest import to_numpy

E = 3
LOADS = [np.array([0.5, 0.25, 0.25]), np.array([0.0, 1.0, 0.0])]


def built(**kwargs):
    statistics = routing.RoutingStatistics(E, **kwargs)
    statistics.build()
    return statistics


def test_named_variables_in_saved_order():
    statistics = built()
    names = [v.name for v in statistics.variables]
    assert names == [
        "expert_load",
        "dropped_fraction",
        "router_entropy",
        "expert_load_sum",
        "dropped_fraction_sum",
        "router_entropy_sum",
        "steps",
    ]
    assert statistics.trainable_variables == []
    shapes = {v.name: tuple(v.shape) for v in statistics.variables}
    assert shapes["expert_load"] == shapes["expert_load_sum"] == (E,)
    assert shapes["steps"] == shapes["router_entropy"] == ()


def test_record_last_mean_reset():
    statistics = built()
    assert statistics.mean() is None
    for i, load in enumerate(LOADS):
        statistics.record(
            expert_load=load,
            dropped_fraction=0.1 * (i + 1),
            router_entropy=1.0 + i,
            training=True,
        )
    last = statistics.last()
    np.testing.assert_allclose(last["expert_load"], LOADS[1])
    assert last["dropped_fraction"] == pytest.approx(0.2)
    assert last["router_entropy"] == 2.0
    assert isinstance(last["router_entropy"], float)
    mean = statistics.mean()
    assert mean["steps"] == 2
    np.testing.assert_allclose(mean["expert_load"], (LOADS[0] + LOADS[1]) / 2)
    assert mean["dropped_fraction"] == pytest.approx(0.15)
    assert mean["router_entropy"] == pytest.approx(1.5)
    # An inference call reports, and adds nothing to the sums.
    statistics.record(expert_load=LOADS[0], router_entropy=0.5, training=False)
    assert statistics.last()["router_entropy"] == 0.5
    assert statistics.mean()["steps"] == 2
    assert statistics.mean()["router_entropy"] == pytest.approx(1.5)
    statistics.reset()
    assert statistics.mean() is None
    for name in ("expert_load_sum", "dropped_fraction_sum", "router_entropy_sum"):
        np.testing.assert_array_equal(to_numpy(getattr(statistics, name)), 0.0)
    # The last values survive a reset.
    assert statistics.last()["router_entropy"] == 0.5


def test_a_statistic_left_out_keeps_its_value_and_steps_count_routings():
    """A router that reports its dropped fraction after the routing (in its
    dispatch) records it alone: no step counted, the loads kept."""
    statistics = built()
    statistics.record(expert_load=LOADS[0], router_entropy=0.7, training=True)
    statistics.record(dropped_fraction=0.25, training=True)
    last = statistics.last()
    np.testing.assert_allclose(last["expert_load"], LOADS[0])
    assert last["router_entropy"] == pytest.approx(0.7)
    assert last["dropped_fraction"] == 0.25
    mean = statistics.mean()
    assert mean["steps"] == 1
    assert mean["dropped_fraction"] == 0.25


@pytest.mark.parametrize("policy", ["bfloat16", "float16", "mixed_bfloat16"])
def test_float32_under_every_dtype_policy(policy):
    statistics = built(dtype=policy)
    for v in statistics.variables:
        assert v.dtype == "float32", v.name
    # 257 steps: bfloat16 holds 256 but not 257 (float16: 2049).
    statistics.steps.assign(2048.0)
    load = keras.ops.cast(LOADS[0], "bfloat16")
    statistics.record(expert_load=load, router_entropy=0.1, training=True)
    assert statistics.mean()["steps"] == 2049
    assert to_numpy(statistics.expert_load).dtype == np.float32
    np.testing.assert_allclose(statistics.last()["expert_load"], LOADS[0])


def test_a_frozen_layer_keeps_its_sums_and_reports_its_last_values():
    statistics = built()
    statistics.record(expert_load=LOADS[0], router_entropy=0.3, training=True)
    statistics.trainable = False
    statistics.record(
        expert_load=LOADS[1], dropped_fraction=0.5, router_entropy=0.9, training=True
    )
    last = statistics.last()
    np.testing.assert_allclose(last["expert_load"], LOADS[1])
    assert last["dropped_fraction"] == 0.5
    mean = statistics.mean()
    assert mean["steps"] == 1
    np.testing.assert_allclose(mean["expert_load"], LOADS[0])
    assert mean["dropped_fraction"] == 0.0


def test_assign_packed_reads_the_0_2_0_vectors():
    """0.2.0 packed `[loads, dropped, entropy]` and
    `[their sums, steps]` into two vectors."""
    statistics = built()
    last = np.array([0.2, 0.3, 0.5, 0.125, 1.25], "float32")
    sums = np.array([0.8, 1.2, 2.0, 0.5, 5.0, 4.0], "float32")
    statistics.assign_packed(last, sums)
    got = statistics.last()
    np.testing.assert_allclose(got["expert_load"], last[:E])
    assert got["dropped_fraction"] == 0.125
    assert got["router_entropy"] == 1.25
    mean = statistics.mean()
    assert mean["steps"] == 4
    np.testing.assert_allclose(mean["expert_load"], sums[:E] / 4)
    assert mean["dropped_fraction"] == pytest.approx(0.125)
    assert mean["router_entropy"] == pytest.approx(1.25)


def test_config_round_trip():
    statistics = routing.RoutingStatistics(5, name="stats")
    clone = routing.RoutingStatistics.from_config(statistics.get_config())
    assert clone.n_experts == 5
    assert clone.get_config() == statistics.get_config()


def test_before_build_last_is_a_clear_error_and_mean_is_none():
    statistics = routing.RoutingStatistics(E)
    with pytest.raises(ValueError, match="before it is built"):
        statistics.last()
    assert statistics.mean() is None
    statistics.reset()  # nothing to reset: no error


@pytest.mark.parametrize(
    "n_experts, error",
    [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)],
)
def test_bad_n_experts(n_experts, error):
    with pytest.raises(error, match=r"`n_experts` must be a positive integer"):
        routing.RoutingStatistics(n_experts)
