"""benchmarks.routers runs at a tiny size (it must not rot); never asserts a time."""

import numpy as np
import pytest
from benchmarks import routers

from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe.routing import ExpertChoiceRouter
from keras_moe.routing import TopKRouter


@pytest.fixture(autouse=True)
def _eager_torch(monkeypatch):
    # torch.compile takes minutes per variant on a small CPU.
    monkeypatch.setenv("KERAS_MOE_BENCH_TORCH", "eager")


def test_every_router_at_top_k_compute_is_timed_against_token_choice(capsys):
    made = {name: make() for name, make in routers.layers(8, 6, 4, 2).items()}
    assert isinstance(made["expert_choice"].router, ExpertChoiceRouter)
    assert isinstance(made["token_choice"].router, TopKRouter)
    assert made["token_choice_bias"].router.balance_bias_rate > 0
    assert isinstance(made["token_choice"], MoEFeedForward)
    # 2 * 8 tokens / 4 experts = 4 slots per expert: 16 rows, as top-2 runs.
    assert isinstance(made["soft_moe"], SoftMoE)
    assert made["soft_moe"].slots_per_expert == 4

    result = routers.main(
        ["--repeats", "1", "--min-sample-s", "0", "--size", "2,8,6,5,4,2"]
    )
    assert result["baseline"] == "token_choice"
    assert set(result["variants"]) == set(made)
    assert result["size"]["tokens"] == 8
    for entry in result["variants"].values():
        assert "error" not in entry, entry.get("error")
        for mode in ("forward", "forward_backward"):
            assert np.isfinite(entry[mode]["ratio"]) and entry[mode]["ratio"] > 0
    assert result["variants"]["token_choice"]["forward"]["ratio"] == 1.0
    assert "forward_backward" in capsys.readouterr().out
