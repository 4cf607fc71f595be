"""MoEFeedForward composed of given sublayers, as `keras.layers.RNN` is of its
cell: the same layer as the shorthand, config and `.keras` round trips of
non-default and custom sublayers, any shared expert layer, and shorthand
arguments that conflict with a given sublayer refused."""

import json
import warnings

import keras
import numpy as np
import pytest

from keras_moe import MoEFeedForward
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import SharedExpert
from keras_moe.routing import ExpertChoiceRouter
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy
from tests.layers.test_moe_feed_forward import np_gelu
from tests.layers.test_moe_feed_forward import randomize
from tests.layers.test_moe_feed_forward import reference
from tests.layers.test_moe_feed_forward import with_same_weights

D, M, E = 6, 5, 4


def no_deprecation_warning(make):
    """`make()`, asserting that it warns of nothing keras-moe deprecated."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make()
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    return result


def test_given_sublayers_make_the_shorthand_layer():
    """The sublayers the shorthand builds, given: the same config and, with
    the same weights, the same outputs, losses and statistics."""
    # The options the shorthand passes on to its experts and its router.
    expert_options = {"activation": "silu", "gated": True}
    router_options = {
        "top_k": 2,
        "capacity_factor": 0.5,
        "load_balance_weight": 0.1,
        "router_z_loss_weight": 0.01,
    }
    shorthand = MoEFeedForward(M, E, **expert_options, **router_options, name="block")
    composed = no_deprecation_warning(
        lambda: MoEFeedForward(
            experts=FeedForwardExperts(M, E, **expert_options, name="experts"),
            router=TopKRouter(E, **router_options, name="router"),
            name="block",
        )
    )
    assert composed.get_config() == shorthand.get_config()
    x = with_same_weights(shorthand, composed, (2, 5, D), seed=0)
    y = to_numpy(composed(x, training=True))
    np.testing.assert_array_equal(y, to_numpy(shorthand(x, training=True)))
    assert len(composed.losses) == 2
    for a, b in zip(composed.losses, shorthand.losses):
        assert float(to_numpy(a)) == float(to_numpy(b))
    for name in ("expert_load", "dropped_fraction", "router_entropy"):
        np.testing.assert_array_equal(
            composed.routing_stats[name], shorthand.routing_stats[name]
        )
    assert composed.routing_stats["dropped_fraction"] > 0.0  # the capacity acts


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class HalvedExperts(FeedForwardExperts):
    """A custom expert bank: `FeedForwardExperts` with outputs halved."""

    def call(self, inputs, layout=None):
        return super().call(inputs, layout=layout) * 0.5


def non_default_layer():
    return MoEFeedForward(
        experts=HalvedExperts(
            M,
            E,
            activation="gelu_tanh",
            gated=True,
            use_gate_bias=True,
            kernel_regularizer="l2",
            bias_constraint="non_neg",
            name="experts",
        ),
        router=TopKRouter(
            E,
            top_k=3,
            use_bias=True,
            normalize_top_k=False,
            noisy_gating=True,
            input_norm=True,
            balance_bias_rate=0.01,
            layout="blocks",
            seed=4,
            name="router",
        ),
        shared_expert=SharedExpert(3, gated=True, output_gate=True, name="shared"),
        router_jitter_noise=0.1,
        seed=5,
        name="block",
    )


def test_config_round_trip_of_non_default_and_custom_sublayers():
    layer = non_default_layer()
    config = layer.get_config()
    assert config["experts"]["registered_name"] == "keras_moe_tests>HalvedExperts"
    assert config["router"]["config"]["layout"] == "blocks"
    assert config["format_version"] == 2
    for restored in (
        MoEFeedForward.from_config(config),
        keras.saving.deserialize_keras_object(
            json.loads(json.dumps(keras.saving.serialize_keras_object(layer))),
            safe_mode=True,
        ),
    ):
        assert type(restored) is MoEFeedForward
        assert type(restored.experts) is HalvedExperts
        assert type(restored.router) is TopKRouter
        assert type(restored.shared_expert) is SharedExpert
        assert restored.get_config() == config
    x = with_same_weights(layer, restored, (2, 3, D), seed=1)
    np.testing.assert_array_equal(to_numpy(restored(x)), to_numpy(layer(x)))


def test_keras_file_round_trip_of_a_composed_layer(tmp_path):
    """Trained (the balance bias moves), saved and loaded: the same outputs,
    configs, sublayer classes and state."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 3, D)).astype("float32")
    y = rng.normal(size=(16, 3, D)).astype("float32")
    model = keras.Sequential([keras.Input((3, D)), non_default_layer()])
    model.compile("adam", "mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    layer = model.layers[0]
    assert np.abs(to_numpy(layer.router.balance_bias)).max() > 0.0
    path = tmp_path / "composed.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    loaded = restored.layers[0]
    assert type(loaded.experts) is HalvedExperts
    assert loaded.get_config() == layer.get_config()
    for a, b in zip(loaded.weights, layer.weights):
        assert a.path.split("block/")[1] == b.path.split("block/")[1]
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(layer(x)), rtol=1e-6, atol=1e-6
    )


def test_an_expert_choice_router_given_as_a_layer():
    layer = MoEFeedForward(
        experts=FeedForwardExperts(M, E), router=ExpertChoiceRouter(E, top_k=1)
    )
    shorthand = MoEFeedForward(
        M, E, top_k=1, routing="expert_choice", capacity_factor=1.0
    )
    x = with_same_weights(layer, shorthand, (2, 4, D), seed=3)
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(shorthand(x)))
    restored = MoEFeedForward.from_config(layer.get_config())
    assert type(restored.router) is ExpertChoiceRouter
    assert restored.get_config() == layer.get_config()


def test_any_layer_as_the_shared_expert():
    """A shared expert is any layer from `(tokens, d)` to `(tokens, d)`:
    every token's output adds it to the routed experts'."""
    shared = keras.layers.Dense(D, name="shared")
    layer = MoEFeedForward(M, E, shared_expert=shared)
    x = np.random.default_rng(4).normal(size=(2, 3, D)).astype("float32")
    layer.build(x.shape)
    randomize(layer)
    tokens = x.reshape(-1, D).astype("float64")
    dense = tokens @ to_numpy(shared.kernel) + to_numpy(shared.bias)
    routed = MoEFeedForward(M, E)
    routed.build(x.shape)
    routed.set_weights(layer.get_weights()[: len(routed.weights)])
    expected = reference(routed, x, np_gelu) + dense.reshape(x.shape)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-4)
    restored = MoEFeedForward.from_config(json.loads(json.dumps(layer.get_config())))
    assert type(restored.shared_expert) is keras.layers.Dense


def experts():
    return FeedForwardExperts(M, E, name="bank")


def router():
    return TopKRouter(E, top_k=2, capacity_factor=1.0, name="gate")


# Shorthand arguments with a given sublayer: refused where they would be
# ignored (`(given sublayers, shorthand arguments, error or None, regex)`);
# None where they agree with the sublayer.
CONFLICTS = [
    ({"experts": experts}, {"intermediate_dim": M + 1}, ValueError, "intermediate_dim"),
    ({"experts": experts}, {"intermediate_dim": M}, None, None),
    ({"experts": experts}, {"n_experts": E + 1}, ValueError, "n_experts"),
    ({"experts": experts}, {"n_experts": E}, None, None),
    ({"experts": experts}, {"activation": "silu"}, ValueError, "activation"),
    ({"experts": experts}, {"gated": True}, ValueError, "gated"),
    ({"experts": experts}, {"use_bias": False}, ValueError, "use_bias"),
    (
        {"experts": experts},
        {"kernel_initializer": "zeros"},
        ValueError,
        "kernel_initializer",
    ),
    (
        {"experts": experts},
        {"bias_initializer": "ones"},
        ValueError,
        "bias_initializer",
    ),
    ({"router": router}, {"top_k": 3}, ValueError, "top_k"),
    ({"router": router}, {"top_k": 2}, None, None),
    ({"router": router}, {"capacity_factor": 2.0}, ValueError, "capacity_factor"),
    ({"router": router}, {"capacity_factor": 1.0}, None, None),
    (
        {"router": router},
        {"load_balance_weight": 0.5},
        ValueError,
        "load_balance_weight",
    ),
    (
        {"router": router},
        {"router_z_loss_weight": 0.5},
        ValueError,
        "router_z_loss_weight",
    ),
    ({"router": router}, {"balance_bias_rate": 0.1}, ValueError, "balance_bias_rate"),
    ({"router": router}, {"routing": "expert_choice"}, ValueError, "routing"),
    ({"router": router}, {"layout": "capacity"}, ValueError, "layout"),
    (
        {"router": router},
        {"router_initializer": "zeros"},
        ValueError,
        "router_initializer",
    ),
    ({"router": router}, {"n_experts": E + 1}, ValueError, "n_experts"),
]


@pytest.mark.parametrize(
    "given, shorthand, error, match",
    CONFLICTS,
    ids=[
        f"{sorted(g)[0]}-{sorted(s)[0]}={list(s.values())[0]}" for g, s, *_ in CONFLICTS
    ],
)
def test_shorthand_that_conflicts_with_a_given_sublayer_is_refused(
    given, shorthand, error, match
):
    sublayers = {name: make() for name, make in given.items()}
    arguments = {**sublayers, **shorthand}
    if "experts" not in sublayers:
        arguments = {"intermediate_dim": M, "n_experts": E, **arguments}
    if error is None:
        layer = MoEFeedForward(**arguments)
        for name, sublayer in sublayers.items():
            assert getattr(layer, name) is sublayer
        return
    sublayer = sorted(given)[0]
    with pytest.raises(
        error,
        match=rf"`{match}`.*Received: {match}=.*"
        if match != "n_experts"
        else r"`n_experts`.*Received: n_experts=",
    ) as caught:
        MoEFeedForward(**arguments)
    if match != "n_experts":
        assert f"`{sublayer}`" in str(caught.value)


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        (
            lambda: {"experts": FeedForwardExperts(M, E), "router": TopKRouter(E + 1)},
            ValueError,
            rf"`n_experts` must agree.*n_experts={E}. Received: n_experts={E + 1}",
        ),
        (
            lambda: {
                "experts": FeedForwardExperts(M, E),
                "router": keras.layers.Dense(E),
            },
            TypeError,
            "`router` must be a `keras_moe.routing.BaseRouter`.*Received: router=",
        ),
        (
            lambda: {"router": TopKRouter(E)},
            ValueError,
            "`intermediate_dim` is required. Received: intermediate_dim=None",
        ),
        (
            lambda: {"experts": FeedForwardExperts(M, E), "router": "sinkhorn"},
            ValueError,
            "`routing` must be one of",
        ),
    ],
)
def test_sublayers_that_do_not_fit_are_refused(arguments, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a router name
        with pytest.raises(error, match=match):
            MoEFeedForward(**arguments())


def test_the_layer_keeps_the_given_sublayers_and_builds_them_under_it():
    bank, gate = FeedForwardExperts(M, E), TopKRouter(E)
    layer = MoEFeedForward(experts=bank, router=gate, name="block")
    assert layer.experts is bank and layer.router is gate
    assert layer.n_experts == E and layer.top_k == 2
    layer.build((None, D))
    assert bank.built and gate.built
    assert {v.path.split("/")[0] for v in layer.weights} == {"block"}


def test_a_layer_frozen_by_its_constructor_freezes_the_given_sublayers():
    layer = MoEFeedForward(
        experts=FeedForwardExperts(M, E),
        router=TopKRouter(E, balance_bias_rate=0.1),
        shared_expert=SharedExpert(3),
        trainable=False,
    )
    model = keras.Sequential([keras.Input((3, D)), layer])
    assert model.trainable_weights == []
    x = np.random.default_rng(5).normal(size=(4, 3, D)).astype("float32")
    layer(x, training=True)
    assert layer.routing_stats_mean() is None  # the sums did not move
    np.testing.assert_array_equal(to_numpy(layer.router.balance_bias), 0.0)


def test_the_output_has_the_blocks_dtype_whatever_the_sublayers_compute_in():
    """Sublayers given with the default float32 policy in a mixed block:
    they compute in float32, the block's output is in its compute dtype, as
    its symbolic output says (it was float32 eagerly, bfloat16 symbolically)."""
    layer = MoEFeedForward(
        experts=FeedForwardExperts(M, E),
        router=TopKRouter(E),
        shared_expert=SharedExpert(3),
        dtype="mixed_bfloat16",
    )
    x = np.random.default_rng(6).normal(size=(2, 3, D)).astype("float32")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer(keras.Input((3, D))).dtype == "bfloat16"
    assert layer.experts.compute_dtype == "float32"


def test_the_experts_count_of_a_given_router():
    layer = MoEFeedForward(M, router=TopKRouter(E, top_k=1))
    assert layer.experts.n_experts == layer.n_experts == E
    assert layer.experts.intermediate_dim == M
    assert tuple(layer(np.ones((2, D), "float32")).shape) == (2, D)
