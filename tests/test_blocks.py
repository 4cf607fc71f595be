"""keras_moe.blocks: every factory builds and runs, round-trips its config,
warns of nothing, passes its dtype and keyword arguments on, and makes the
layer that keras-moe 0.2.0's `MoEFeedForward` options made for its family
(the same sublayer configs and, with the same weights, the same outputs).
The blocks against NumPy: tests/layers/test_moe_feed_forward.py; against
KerasHub's: tests/kerashub."""

import json
import warnings

import keras
import numpy as np
import pytest

from keras_moe import MoEFeedForward
from keras_moe import blocks
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import SharedExpert
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy
from tests.layers.test_moe_feed_forward import with_same_weights

D, M, E = 6, 5, 4

# factory name -> (its arguments, the 0.2.0 `MoEFeedForward` arguments of
# the same block).
FAMILIES = {
    "mixtral": (
        {"top_k": 2},
        {
            "top_k": 2,
            "activation": "silu",
            "gated": True,
            "use_bias": False,
            "activation_dtype": "float32",
            "softmax_before_top_k": True,
        },
    ),
    "qwen_moe": (
        {"top_k": 3, "shared_intermediate_dim": 3},
        {
            "top_k": 3,
            "activation": "silu",
            "gated": True,
            "use_bias": False,
            "gate_up_layout": "concatenated",
            "softmax_before_top_k": True,
            "normalize_top_k": False,
            "shared_intermediate_dim": 3,
            "shared_expert_gate": True,
        },
    ),
    "qwen3_moe": (
        {"top_k": 2},
        {
            "top_k": 2,
            "activation": "silu",
            "gated": True,
            "use_bias": False,
            "gate_up_layout": "concatenated",
            "softmax_before_top_k": True,
        },
    ),
    "qwen3_5_moe": (
        {"top_k": 2, "shared_intermediate_dim": 3},
        {
            "top_k": 2,
            "activation": "silu",
            "gated": True,
            "use_bias": False,
            "gate_up_layout": "concatenated",
            "activation_dtype": "float32",
            "softmax_before_top_k": True,
            "shared_intermediate_dim": 3,
            "shared_expert_gate": True,
        },
    ),
    "gpt_oss": (
        {"top_k": 2},
        {
            "top_k": 2,
            "gated": True,
            "use_bias": True,
            "router_bias": True,
            "gate_up_layout": "interleaved",
            "swiglu_limit": 7.0,
        },
    ),
    "gemma4": (
        {"top_k": 2},
        {
            "top_k": 2,
            "activation": "gelu_tanh",
            "gated": True,
            "use_bias": False,
            "activation_dtype": "float32",
            "expert_output_scale": True,
            "router_input_norm": True,
            "softmax_before_top_k": True,
        },
    ),
}


def test_every_factory_is_tested():
    assert sorted(FAMILIES) == sorted(blocks.__all__)


def make_block(family, **kwargs):
    """The factory's block, asserting that it warns of nothing."""
    arguments, _ = FAMILIES[family]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block = getattr(blocks, family)(M, E, **arguments, **kwargs)
    assert [w.message for w in caught if w.category is DeprecationWarning] == []
    return block


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_factory_makes_the_block_of_0_2_0s_options(family):
    """The factory's layer is the one 0.2.0's options made: the same
    sublayers and options and, with the same weights, the same outputs (also
    of the shared expert and the router's normalised input)."""
    block = make_block(family, name="block")
    _, options = FAMILIES[family]
    with pytest.warns(DeprecationWarning):
        old = MoEFeedForward(M, E, **options, name="block")
    assert isinstance(block.experts, FeedForwardExperts)
    assert isinstance(block.router, TopKRouter)
    assert isinstance(block.shared_expert, (SharedExpert, type(None)))
    assert block.get_config() == old.get_config()
    x = with_same_weights(block, old, (2, 5, D), seed=0)
    np.testing.assert_array_equal(to_numpy(block(x)), to_numpy(old(x)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_block_builds_runs_and_round_trips_its_config(family):
    block = make_block(family)
    x = np.random.default_rng(1).normal(size=(2, 3, D)).astype("float32")
    y = block(x, training=True)
    assert tuple(y.shape) == x.shape
    assert np.isfinite(to_numpy(y)).all()
    assert len(block.losses) == 1  # the load-balancing loss (0.01)
    config = block.get_config()
    assert config["format_version"] == 2
    from_config = MoEFeedForward.from_config(config)
    from_config.build(x.shape)
    deserialized = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(block))),
        safe_mode=True,
    )
    assert deserialized.built  # from the serialised build config
    for restored in (from_config, deserialized):
        assert restored.get_config() == config
        restored.set_weights(block.get_weights())
        np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(block(x)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_factory_passes_its_options_on(family):
    block = make_block(
        family,
        load_balance_weight=0.0,
        router_z_loss_weight=0.5,
        router_dtype="compute",
        dtype="mixed_bfloat16",
        router_jitter_noise=0.1,
        seed=3,
        name="moe",
    )
    assert block.name == "moe"
    assert block.router_jitter_noise == 0.1 and block.seed == 3
    router = block.router
    assert router.load_balance_weight == 0.0
    assert router.router_z_loss_weight == 0.5
    assert router.router_dtype == "compute"
    sublayers = [block, block.experts, router, block.shared_expert]
    for layer in sublayers:
        if layer is not None:
            assert layer.dtype_policy.name == "mixed_bfloat16", layer.name
    y = block(np.ones((2, 3, D), "float32"), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert len(block.losses) == 1  # the z-loss only


@pytest.mark.parametrize(
    "family, kwargs, match",
    [
        ("mixtral", {"top_k": E + 1}, "`top_k` must be an integer from 1 to"),
        ("qwen_moe", {"shared_intermediate_dim": 0}, "`intermediate_dim`.*Received"),
        ("gpt_oss", {"swiglu_limit": -1.0}, "`swiglu_limit`.*Received"),
        ("gemma4", {"norm_epsilon": 0.0}, "`norm_epsilon`.*Received"),
        (
            "qwen3_moe",
            {"top_k": 2, "router_dtype": "float16"},
            "`router_dtype` must be one of",
        ),
    ],
)
def test_bad_arguments_of_a_factory(family, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(blocks, family)(M, E, **kwargs)
