"""`FeedForwardExperts.weight_names`: a subclass that runs another model's
expert bank names its variables and the order `build` creates them in (the
order of saved files), and declares those names as its expert weights."""

import numpy as np
import pytest

from keras_moe.layers import FeedForwardExperts
from tests.layers.test_feed_forward_experts import GATED_WEIGHTS


class ReorderedExperts(FeedForwardExperts):
    """A bank with another model's names and order: gate first, scale last."""

    weight_names = {
        "gate_kernel": "gate_proj",
        "up_kernel": "up_proj",
        "down_kernel": "down_proj",
        "scale": "per_expert_scale",
    }


def test_build_creates_the_weights_in_the_order_of_weight_names():
    experts = ReorderedExperts(6, 3, gated=True, use_bias=False, output_scale=True)
    experts.build((None, 4))
    names = ["gate_proj", "up_proj", "down_proj", "per_expert_scale"]
    assert [v.name for v in experts.weights] == names
    assert [tuple(v.shape) for v in experts.weights] == [
        (3, 4, 6),
        (3, 4, 6),
        (3, 6, 4),
        (3,),
    ]
    assert experts.gate_kernel is experts.weights[0]
    assert experts.scale is experts.weights[3]
    assert experts.expert_weight_axes() == dict.fromkeys(names, 0)
    rows = np.ones((3, 2, 4), "float32")
    assert tuple(experts(rows).shape) == (3, 2, 4)


def test_the_default_order_is_unchanged():
    experts = FeedForwardExperts(6, 3, gated=True, use_gate_bias=True)
    experts.build((None, 4))
    assert [v.name for v in experts.weights] == GATED_WEIGHTS


def test_a_weight_without_a_name_is_refused():
    experts = ReorderedExperts(6, 3, gated=True, use_bias=True)
    with pytest.raises(ValueError, match=r"`ReorderedExperts.weight_names`.*up_bias"):
        experts.build((None, 4))
