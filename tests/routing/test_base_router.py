"""The `BaseRouter` subclass contract: a router written in a few lines (its
`call` and `dispatch`) works in `MoEFeedForward` as the built-in ones do:
outputs, losses, statistics, config, saving, `fit` and `ExpertUsage`."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import MoEFeedForward
from keras_moe import routing
from keras_moe.callbacks import ExpertUsage
from keras_moe.layers import FeedForwardExperts
from tests.conftest import to_numpy
from tests.routing.test_dispatch import np_softmax

D, E, M = 6, 4, 8


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class ArgmaxRouter(routing.BaseRouter):
    """Each token to its single best expert, with weight 1 (a hard router)."""

    def __init__(self, n_experts, **kwargs):
        kwargs["top_k"] = 1
        super().__init__(n_experts, **kwargs)

    def call(self, inputs, mask=None, training=None):
        logits = self.logits(inputs, training=training)
        experts = ops.cast(ops.argmax(logits, axis=-1), "int32")[:, None]
        weights = ops.ones(ops.shape(experts), "float32")
        self.add_z_loss(logits, mask, training)
        counts = ops.cast(
            routing.expert_counts(experts, self.n_experts, mask), "float32"
        )
        self.statistics.record(
            expert_load=counts / ops.maximum(ops.sum(counts), 1.0),
            dropped_fraction=ops.zeros((), "float32"),
            router_entropy=routing.router_entropy(logits, mask),
            training=training,
        )
        return weights, experts

    def dispatch(self, inputs, weights, experts, expert_bank, mask=None, training=None):
        outputs, _, _ = routing.sparse_mixture(
            inputs,
            experts,
            weights,
            self.n_experts,
            expert_bank,
            mask=mask,
            layout="blocks",
            training=training,
        )
        return outputs


def layer_with_argmax_router(**router_kwargs):
    experts = FeedForwardExperts(M, E, activation="relu", use_bias=False)
    router = ArgmaxRouter(E, use_bias=True, **router_kwargs)
    return MoEFeedForward(experts=experts, router=router)


def np_layer(layer, x):
    """Each token through its argmax expert, `relu(x . up) . down`."""
    tokens = x.reshape(-1, D).astype("float64")
    router = layer.router
    logits = tokens @ to_numpy(router.kernel) + to_numpy(router.bias)
    chosen = logits.argmax(-1)
    up, down = to_numpy(layer.experts.up_kernel), to_numpy(layer.experts.down_kernel)
    out = np.stack(
        [np.maximum(t @ up[e], 0.0) @ down[e] for t, e in zip(tokens, chosen)]
    )
    return out.reshape(x.shape), logits, chosen


def inputs(seed=0, batch=2):
    return np.random.default_rng(seed).normal(size=(batch, 5, D)).astype("float32")


def test_it_runs_in_moe_feed_forward_like_numpy():
    layer = layer_with_argmax_router(router_z_loss_weight=0.5)
    x = inputs()
    layer.build(x.shape)
    layer.router.bias.assign(np.array([0.5, 0.0, -0.5, 0.2], "float32"))
    y = to_numpy(layer(x, training=True))
    ref, logits, chosen = np_layer(layer, x)
    assert len(set(chosen)) > 1  # the case routes to several experts
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # The base's z-loss, added by the subclass, reaches the host.
    lse = np.log(np.exp(logits).sum(-1))
    ((loss),) = layer.losses
    assert float(to_numpy(loss)) == pytest.approx(0.5 * np.mean(lse**2), rel=1e-5)
    # The base's statistics, read through the host.
    stats = layer.routing_stats
    np.testing.assert_allclose(
        stats["expert_load"], np.bincount(chosen, minlength=E) / len(chosen)
    )
    probs = np_softmax(logits)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert layer.routing_stats_mean()["steps"] == 1
    layer.reset_routing_stats()
    assert layer.routing_stats_mean() is None


def test_masked_tokens_reach_no_expert():
    layer = layer_with_argmax_router()
    x = inputs(1)
    mask = np.arange(10).reshape(2, 5) % 3 != 0
    y = to_numpy(layer(x, mask=mask))
    ref, _, chosen = np_layer(layer, x)
    np.testing.assert_array_equal(y[~mask], 0.0)
    np.testing.assert_allclose(y[mask], ref[mask], rtol=1e-5, atol=1e-5)
    load = np.bincount(chosen[mask.ravel()], minlength=E) / mask.sum()
    np.testing.assert_allclose(layer.routing_stats["expert_load"], load)


def test_config_saving_and_fit_with_expert_usage(tmp_path):
    layer = layer_with_argmax_router()
    config = layer.get_config()
    clone = MoEFeedForward.from_config(config)
    assert isinstance(clone.router, ArgmaxRouter)
    assert clone.get_config() == config
    model = keras.Sequential([keras.Input((5, D)), layer])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = inputs(2, batch=8)
    usage = ExpertUsage()
    history = model.fit(x, x, batch_size=4, epochs=1, verbose=0, callbacks=[usage])
    # ExpertUsage finds a router of any `BaseRouter` subclass.
    assert usage.loads[layer.name].shape == (1, E)
    assert 1.0 <= history.history[f"{layer.name}_max_load"][0] <= E
    assert layer.routing_stats_mean()["steps"] == 2
    path = tmp_path / "argmax.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.layers[0].router, ArgmaxRouter)
    np.testing.assert_allclose(
        to_numpy(restored(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_array_equal(
        to_numpy(restored.layers[0].router.statistics.steps), 2.0
    )


def test_the_base_alone_does_not_route():
    router = routing.BaseRouter(E)
    with pytest.raises(NotImplementedError):
        router(np.ones((3, D), "float32"))
    with pytest.raises(NotImplementedError):
        router.dispatch(None, None, None, None)
