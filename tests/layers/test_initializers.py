"""Every weight draws its own initial values (`utils.initializer_for`): a
Keras random initializer keeps one seed, so that one instance used for
several weights would give them all the same random stream. For every layer
that creates several weights from one initializer: the weights are pairwise
unrelated, each distributed as its initializer, and a seeded initializer
gives the same weights at every build."""

import itertools

import keras
import numpy as np
import pytest

from keras_moe import Conv2DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe import utils
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import SharedExpert
from keras_moe.routing import ExpertChoiceRouter
from keras_moe.routing import TopKRouter
from tests.conftest import to_numpy

D, M, E = 16, 24, 4


def initializers(kernel, bias):
    return {"kernel_initializer": kernel, "bias_initializer": bias}


def moe_ff(kernel, bias, **kwargs):
    # One instance for the router too: it must still draw its own values.
    options = {**initializers(kernel, bias), "router_initializer": kernel}
    return MoEFeedForward(M, E, **options, **kwargs), (None, D)


def composed(kernel, bias, shared_expert=False, **experts):
    """`MoEFeedForward` of given sublayers, one kernel initializer instance
    for all of them."""
    shared = None
    if shared_expert:
        shared, _ = gated_shared_expert(kernel, bias, name="shared_expert")
    layer = MoEFeedForward(
        experts=FeedForwardExperts(
            M, E, **initializers(kernel, bias), name="experts", **experts
        ),
        router=TopKRouter(E, kernel_initializer=kernel, name="router"),
        shared_expert=shared,
    )
    return layer, (None, D)


def feed_forward_experts(kernel, bias, **kwargs):
    layer = FeedForwardExperts(M, E, **initializers(kernel, bias), **kwargs)
    return layer, (None, E, 3, D)


def soft_moe(kernel, bias):
    # One instance for the router too: it must still draw its own values.
    options = {**initializers(kernel, bias), "router_initializer": kernel}
    return SoftMoE(M, E, gated=True, **options), (None, 5, D)


def gated_shared_expert(kernel, bias, **kwargs):
    options = {**initializers(kernel, bias), **kwargs}
    return SharedExpert(M, gated=True, output_gate=True, **options), (None, D)


def dense_moe(kernel, bias):
    # The expert and gating kernels have their own initializers; the biases
    # share one instance here.
    layer = DenseMoE(M, 32, expert_bias_initializer=bias, gating_bias_initializer=bias)
    return layer, (None, D)


def conv_moe(kernel, bias):
    layer = Conv2DMoE(
        8, 4, 3, expert_bias_initializer=bias, gating_bias_initializer=bias
    )
    return layer, (None, 6, 6, 3)


def top_k_router(kernel, bias):
    layer = TopKRouter(
        32, kernel_initializer=kernel, bias_initializer=kernel, use_bias=True
    )
    return layer, (None, D)


def expert_choice_router(kernel, bias):
    layer = ExpertChoiceRouter(
        32, kernel_initializer=kernel, bias_initializer=kernel, use_bias=True
    )
    return layer, (None, D)


CASES = {
    "moe_ff": moe_ff,
    "moe_ff_gated": lambda k, b: moe_ff(k, b, gated=True),
    "moe_ff_gate_bias": lambda k, b: composed(k, b, gated=True, use_gate_bias=True),
    "moe_ff_fused": lambda k, b: composed(
        k, b, gated=True, gate_up_layout="concatenated"
    ),
    "moe_ff_shared_expert": lambda k, b: composed(k, b, shared_expert=True, gated=True),
    "feed_forward_experts": lambda k, b: feed_forward_experts(
        k, b, gated=True, use_gate_bias=True
    ),
    "feed_forward_experts_interleaved": lambda k, b: feed_forward_experts(
        k, b, gated=True, gate_up_layout="interleaved", output_scale=True
    ),
    "soft_moe": soft_moe,
    "shared_expert": gated_shared_expert,
    "dense_moe": dense_moe,
    "conv_moe": conv_moe,
    "top_k_router": top_k_router,
    "expert_choice_router": expert_choice_router,
}

KERNEL_INITIALIZERS = {
    "glorot_uniform": lambda seed: keras.initializers.GlorotUniform(seed=seed),
    "random_normal": lambda seed: keras.initializers.RandomNormal(0.0, 1.0, seed=seed),
}


def bias_initializer(seed):
    return keras.initializers.RandomNormal(0.5, 0.1, seed=seed)


def random_weights(layer):
    """The layer's trainable weights with random initial values, by path."""
    weights = {}
    for v in layer.trainable_weights:
        value = to_numpy(v).ravel().astype("float64")
        if np.ptp(value) > 0:
            weights[v.path.split("/", 1)[1]] = value
    return weights


def build(case, kernel, bias):
    layer, shape = CASES[case](kernel, bias)
    layer.build(shape)
    return layer, random_weights(layer)


def initializer_of(layer, name):
    """The initializer the layer was given for weight `name` (None: the
    layer's own, for `DenseMoE`'s and `Conv2DMoE`'s kernels)."""
    if isinstance(layer, (DenseMoE, Conv2DMoE)):
        return layer.expert_bias_initializer if name.endswith("bias") else None
    if isinstance(layer, MoEFeedForward):
        # The sublayer's: `experts/up_kernel`, `router/kernel`, ...
        sublayer, name = name.split("/", 1)
        return initializer_of(getattr(layer, sublayer), name)
    if isinstance(layer, (TopKRouter, ExpertChoiceRouter)):
        return layer.kernel_initializer
    if isinstance(layer, SoftMoE) and name == "router_kernel":
        return layer.router_initializer
    if name.endswith("bias"):
        return layer.bias_initializer
    return layer.kernel_initializer


def assert_pairwise_unrelated(weights):
    """No two weights share their random stream: over their common prefix
    (where one stream reshaped would repeat) the values are uncorrelated."""
    assert len(weights) >= 2
    for (a, x), (b, y) in itertools.combinations(weights.items(), 2):
        n = min(x.size, y.size)
        assert n >= 16, (a, b)
        corr = np.corrcoef(x[:n], y[:n])[0, 1]
        # One stream (reshaped, rescaled): |corr| ~ 1; independent draws:
        # |corr| ~ 1 / sqrt(n) <= 0.25.
        assert abs(corr) < 0.9, (a, b, corr)


def assert_distributed_as(value, initializer, shape):
    """Mean and standard deviation as fresh draws of the initializer."""
    config = initializer.get_config()
    reference = np.concatenate(
        [
            to_numpy(type(initializer).from_config({**config, "seed": s})(shape))
            for s in range(max(1, 20000 // value.size))
        ],
        axis=None,
    )
    sd = reference.std()
    # Sampling errors: sd / sqrt(n) for the mean, about sd / sqrt(2n) for sd.
    assert abs(value.mean() - reference.mean()) < 5 * sd / np.sqrt(value.size)
    assert value.std() == pytest.approx(sd, rel=5 / np.sqrt(2 * value.size))


@pytest.mark.parametrize("init", sorted(KERNEL_INITIALIZERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_weight_draws_its_own_values(case, init):
    kernel = KERNEL_INITIALIZERS[init](None)
    layer, weights = build(case, kernel, bias_initializer(None))
    assert_pairwise_unrelated(weights)
    shapes = {v.path.split("/", 1)[1]: tuple(v.shape) for v in layer.weights}
    for name, value in weights.items():
        initializer = initializer_of(layer, name)
        if initializer is not None:
            assert_distributed_as(value, initializer, shapes[name])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_seeded_initializer_is_deterministic_and_still_distinct(case):
    def seeded():
        kernel = KERNEL_INITIALIZERS["glorot_uniform"](7)
        keras.utils.set_random_seed(np.random.randint(2**31))
        return build(case, kernel, bias_initializer(11))

    layer, first = seeded()
    _, second = seeded()
    assert sorted(first) == sorted(second)
    drawn = [name for name in first if initializer_of(layer, name) is not None]
    assert drawn
    for name in drawn:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert_pairwise_unrelated(first)


def test_initializer_for():
    seeded = keras.initializers.GlorotUniform(seed=3)
    a = utils.initializer_for(seeded, "a")
    assert (
        a is not seeded
        and a.get_config() == utils.initializer_for(seeded, "a").get_config()
    )
    assert a.get_config()["seed"] != utils.initializer_for(seeded, "b").seed
    zeros = keras.initializers.Zeros()
    assert utils.initializer_for(zeros, "a") is zeros
    generator = keras.initializers.RandomNormal(seed=keras.random.SeedGenerator(1))
    assert utils.initializer_for(generator, "a") is generator
