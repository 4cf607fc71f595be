"""Expert-choice routing: capacity, choices, mixture and statistics against a
NumPy reference (masks, uneven tokens per expert), `ExpertChoiceRouter`
through Keras's harness, and a small custom layer built on it under `fit`,
saved and reloaded."""

import math

import keras
import numpy as np
import pytest
from keras import ops
from keras.src import testing

from keras_moe import routing
from keras_moe.callbacks import ExpertUsage
from tests.conftest import reloaded_with_same_outputs
from tests.conftest import to_numpy
from tests.harness import run_harness
from tests.routing.test_dispatch import np_softmax
from tests.routing.test_router import ROUTER_BAD_ARGUMENTS

D, M = 6, 5


def np_capacity(n, k, e, factor):
    return min(n, max(1, math.ceil(factor * k * n / e)))


def np_expert_choice(x, kernel, bias, expert_kernel, expert_bias, k, factor, mask):
    """Reference (float64): each expert's column of the softmax sorted by
    score over the unmasked tokens, its first `c` taken, `c` counting the
    unmasked tokens only; `y[t]` sums `S[t, e] * tanh(x[t] W_e + b_e)` over
    the experts that took `t`. Returns the buffer's `c` of all tokens."""
    x = x.astype("float64")
    n, e = len(x), kernel.shape[1]
    probs = np_softmax(x @ kernel + bias)
    valid = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    n_valid = int(valid.sum())
    kept = np_capacity(n_valid, k, e, factor)
    out = np.zeros((n, expert_kernel.shape[-1]))
    taken = np.zeros((e, n), bool)
    for expert in range(e):
        candidates = [t for t in np.argsort(-probs[:, expert]) if valid[t]]
        for t in candidates[:kept]:
            taken[expert, t] = True
            h = np.tanh(x[t] @ expert_kernel[expert] + expert_bias[expert])
            out[t] += probs[t, expert] * h
    load = taken.sum(1) / max(taken.sum(), 1)
    dropped = np.sum(valid & ~taken.any(0)) / max(valid.sum(), 1)
    entropy = -(probs * np.log(probs)).sum(-1)[valid]
    entropy = entropy.mean() if valid.any() else 0.0
    return out, taken, (load, dropped, entropy), np_capacity(n, k, e, factor)


def random_case(n, e, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype("float32")
    kernel = rng.normal(size=(D, e)).astype("float32")
    bias = rng.normal(size=(e,)).astype("float32")
    expert_kernel = (rng.normal(size=(e, D, M)) / math.sqrt(D)).astype("float32")
    expert_bias = rng.normal(size=(e, M)).astype("float32")
    return x, kernel, bias, expert_kernel, expert_bias


def tanh_bank(kernel, bias, seen=None):
    """The experts `tanh(x . W_e + b_e)`, a function of `(rows, layout)`;
    `seen` collects the rows they ran."""
    kernel = ops.convert_to_tensor(kernel)
    bias = ops.convert_to_tensor(bias)

    def bank(rows, layout):
        if seen is not None:
            seen.append(rows)
        h = layout.matmul(rows, layout.select(kernel))
        return ops.tanh(h + layout.broadcast(layout.select(bias)))

    return bank


def router_with(kernel, bias, **kwargs):
    router = routing.ExpertChoiceRouter(kernel.shape[1], use_bias=True, **kwargs)
    router.build((None, kernel.shape[0]))
    router.kernel.assign(kernel)
    router.bias.assign(bias)
    return router


@pytest.mark.parametrize(
    "n, e, k, factor, masked",
    [
        (12, 4, 2, 1.0, False),  # n / E even: c = 6
        (11, 4, 2, 1.0, True),  # uneven: c = ceil(5.5) = 6
        (7, 3, 1, 1.25, True),  # uneven with a factor: c = ceil(2.92) = 3
        (9, 4, 1, 0.1, False),  # c = 1: most tokens dropped
        (5, 3, 3, 2.0, True),  # c capped at n: every expert takes every token
    ],
)
def test_router_and_dispatch_match_numpy(n, e, k, factor, masked):
    x, kernel, bias, expert_kernel, expert_bias = random_case(n, e, seed=n + e)
    mask = None
    if masked:
        mask = np.random.default_rng(n).random(n) < 0.6
        mask[0] = True
    router = router_with(kernel, bias, top_k=k, capacity_factor=factor)

    experts = tanh_bank(expert_kernel, expert_bias)
    weights, tokens = router(x, mask=mask, training=True)
    y = to_numpy(router.dispatch(x, weights, tokens, experts, mask=mask))
    ref, taken, (load, dropped, entropy), c = np_expert_choice(
        x, kernel, bias, expert_kernel, expert_bias, k, factor, mask
    )
    assert tuple(weights.shape) == tuple(tokens.shape) == (e, c)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    tokens, weights = to_numpy(tokens), to_numpy(weights)
    probs = np_softmax(x.astype("float64") @ kernel + bias)
    for expert in range(e):
        kept = tokens[expert][weights[expert] > 0]
        assert set(kept) == set(np.flatnonzero(taken[expert]))
        np.testing.assert_allclose(
            weights[expert][weights[expert] > 0], probs[kept, expert], rtol=1e-5
        )
        assert np.all(np.diff(weights[expert]) <= 0)  # best first
    stats = router.routing_stats
    np.testing.assert_allclose(stats["expert_load"], load, rtol=1e-6, atol=1e-7)
    assert stats["dropped_fraction"] == pytest.approx(dropped, abs=1e-7)
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-5)
    if mask is not None:
        assert np.all(y[~mask] == 0.0)


def test_masked_tokens_are_run_by_no_expert_even_with_room_to_spare():
    # 3 unmasked tokens: c = 3 of them (the buffer has 8 rows per expert):
    # every expert takes all of them and no other.
    x, kernel, bias, expert_kernel, expert_bias = random_case(8, 2, seed=5)
    mask = np.array([1, 0, 0, 1, 0, 1, 0, 0], bool)
    x[~mask] = np.nan  # whatever a masked token holds, it reaches nothing
    router = router_with(kernel, bias, top_k=2)
    weights, tokens = router(x, mask=mask)
    rows = []
    experts = tanh_bank(expert_kernel, expert_bias, seen=rows)
    y = to_numpy(router.dispatch(x, weights, tokens, experts, mask=mask))
    assert np.isfinite(y).all() and np.all(y[~mask] == 0.0)
    assert np.count_nonzero(to_numpy(weights)) == 2 * 3
    assert router.routing_stats["dropped_fraction"] == 0.0


def test_statistics_count_the_dropped_tokens():
    # Every token prefers expert 0; with c = 1 per expert, 2 of 6 are taken.
    x = np.ones((6, 2), "float32") * np.arange(1, 7, dtype="float32")[:, None]
    kernel = np.array([[1.0, 0.0], [1.0, 0.0]], "float32")
    router = router_with(kernel, np.zeros(2, "float32"), top_k=1, capacity_factor=0.3)
    weights, tokens = router(x, training=True)
    assert tuple(tokens.shape) == (2, 1)
    assert router.routing_stats["dropped_fraction"] == pytest.approx(4 / 6)
    np.testing.assert_allclose(router.routing_stats["expert_load"], [0.5, 0.5])
    assert router.routing_stats_mean()["steps"] == 1
    router(x)  # inference: no running sum
    assert router.routing_stats_mean()["steps"] == 1
    router.reset_routing_stats()
    assert router.routing_stats_mean() is None


@pytest.mark.parametrize(
    "n, k, e, factor, expected",
    [
        (12, 2, 4, 1.0, 6),
        (11, 2, 4, 1.0, 6),
        (7, 1, 3, 1.25, 3),
        (9, 1, 4, 0.1, 1),
        (5, 3, 3, 2.0, 5),
        (0, 2, 4, 1.0, 0),
    ],
)
def test_capacity(n, k, e, factor, expected):
    assert routing.expert_choice_capacity(n, k, e, factor) == expected


def test_z_loss_only_in_training():
    x, kernel, bias, *_ = random_case(10, 4, seed=6)
    router = router_with(kernel, bias, top_k=2, router_z_loss_weight=0.5)
    router(x)
    assert router.losses == []
    router(x, training=True)
    (loss,) = router.losses
    lse = np.log(np.exp(x.astype("float64") @ kernel + bias).sum(-1))
    assert float(to_numpy(loss)) == pytest.approx(0.5 * np.mean(lse**2), rel=1e-5)


def test_an_empty_batch_routes_nothing():
    router = routing.ExpertChoiceRouter(3, top_k=2)
    x = np.zeros((0, D), "float32")
    weights, tokens = router(x)
    assert tuple(tokens.shape) == (3, 0)
    experts = tanh_bank(np.ones((3, D, M), "float32"), np.zeros((3, M), "float32"))
    y = router.dispatch(x, weights, tokens, experts)
    assert tuple(y.shape) == (0, M)


class ExpertChoiceRouterLayerTest(testing.TestCase):
    def test_layer_harness(self):
        # The routing statistics: 3 last values, their sums, steps.
        run_harness(
            self,
            routing.ExpertChoiceRouter,
            {"n_experts": 4, "top_k": 2, "use_bias": True},
            ((7, D), ((4, 4), (4, 4))),
            (2, 7, 0, 0),
            run_training_check=False,  # integer outputs have no gradient
            run_mixed_precision_check=False,  # checked below: float32 router
        )


@keras.saving.register_keras_serializable(package="keras_moe_tests")
class ExpertChoiceFeedForward(keras.layers.Layer):
    """A custom layer on `ExpertChoiceRouter`: tanh experts, as a user writes one."""

    def __init__(self, units, n_experts, top_k=2, capacity_factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.supports_masking = True

    def build(self, input_shape):
        d = input_shape[-1]
        self.router = routing.ExpertChoiceRouter(
            self.n_experts, self.top_k, self.capacity_factor, name="router"
        )
        self.router.build((None, d))
        e = self.n_experts
        self.kernel = self.add_weight(name="kernel", shape=(e, d, self.units))
        self.bias = self.add_weight(
            name="bias", shape=(e, self.units), initializer="zeros"
        )

    def _experts(self, rows, layout):
        h = layout.matmul(rows, layout.select(self.kernel))
        return ops.tanh(h + layout.broadcast(layout.select(self.bias)))

    def call(self, inputs, mask=None, training=None):
        tokens = ops.reshape(inputs, (-1, inputs.shape[-1]))
        if mask is not None:
            mask = ops.reshape(mask, (-1,))
        weights, chosen = self.router(tokens, mask=mask, training=training)
        y = self.router.dispatch(tokens, weights, chosen, self._experts, mask)
        return ops.reshape(y, tuple(ops.shape(inputs)[:-1]) + (self.units,))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = {
            "units": self.units,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "capacity_factor": self.capacity_factor,
        }
        return {**super().get_config(), **config}


def test_custom_layer_fits_and_reloads(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(48, 3, D)).astype("float32")
    y = rng.normal(size=(48, 3, M)).astype("float32")
    layer = ExpertChoiceFeedForward(M, 4, top_k=1)
    model = keras.Sequential([keras.Input((3, D)), layer])
    # "auto": compiled on JAX and TensorFlow, not with torch.compile (minutes
    # on 2 cores); MoEFeedForward(router="expert_choice") is fit with
    # `jit_compile=True` in tests/layers/test_moe_feed_forward_routers.py.
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile="auto")
    before = [to_numpy(v).copy() for v in model.trainable_weights]
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[ExpertUsage()]
    )
    assert np.isfinite(history.history["loss"]).all()
    # ExpertUsage finds the router under its host's name: even load, and the
    # share of tokens no expert took.
    np.testing.assert_allclose(history.history[f"{layer.name}_max_load"], 1.0)
    assert all(0.0 < v < 1.0 for v in history.history[f"{layer.name}_dropped_fraction"])
    for old, new in zip(before, model.trainable_weights):
        assert not np.allclose(old, to_numpy(new)), new.path  # router included
    mean = layer.router.routing_stats_mean()
    assert mean["steps"] == 3  # the last epoch's (ExpertUsage resets every epoch)
    np.testing.assert_allclose(mean["expert_load"], 0.25, rtol=1e-6)
    # c = 12 of the 48 tokens of a batch per expert: some tokens get none.
    assert 0.0 < mean["dropped_fraction"] < 1.0

    restored = reloaded_with_same_outputs(model, tmp_path / "expert_choice.keras", x)
    restored_statistics = restored.layers[0].router.statistics
    for variable in layer.router.statistics.variables:
        np.testing.assert_allclose(
            to_numpy(getattr(restored_statistics, variable.name)),
            to_numpy(variable),
            err_msg=variable.path,
        )
    assert restored.layers[0].router.get_config() == layer.router.get_config()


@pytest.mark.parametrize("policy", ["mixed_float16"])
def test_mixed_precision_keeps_the_router_in_float32(policy):
    keras.config.set_dtype_policy(policy)
    x = np.random.default_rng(8).normal(size=(2, 5, D)).astype("float32")
    layer = ExpertChoiceFeedForward(M, 3, top_k=1)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    assert layer.router.kernel.dtype == "float32"
    weights, _ = layer.router(ops.reshape(x, (-1, D)))
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    assert np.isfinite(to_numpy(y).astype("float32")).all()


def test_config_round_trip():
    router = routing.ExpertChoiceRouter(
        5,
        top_k=3,
        capacity_factor=1.5,
        router_z_loss_weight=0.1,
        use_bias=True,
        kernel_initializer="zeros",
        kernel_regularizer="l2",
    )
    clone = routing.ExpertChoiceRouter.from_config(router.get_config())
    assert clone.get_config() == router.get_config()


@pytest.mark.parametrize(
    "kwargs, error, match",
    ROUTER_BAD_ARGUMENTS
    + [({"n_experts": 4, "router_z_loss_weight": -1}, ValueError, "router_z_loss")],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        routing.ExpertChoiceRouter(**kwargs)


def test_statistics_before_build_are_a_clear_error():
    with pytest.raises(ValueError, match="before it is built"):
        _ = routing.ExpertChoiceRouter(3).routing_stats
