"""MoEFeedForward's other routers: expert choice (`routing="expert_choice"`)
against a NumPy reference (masks, token counts the experts do not divide),
and loss-free bias balancing (`balance_bias_rate`): a collapsed router
rebalances with frozen weights only when the rate is positive; fit under
`jit_compile`, save/reload, `ExpertUsage`, bad arguments."""

import math

import keras
import numpy as np
import pytest

from keras_moe import MoEFeedForward
from keras_moe.callbacks import ExpertUsage
from keras_moe.layers import FeedForwardExperts
from keras_moe.routing import ExpertChoiceRouter
from tests.conftest import BACKEND
from tests.conftest import reloaded_with_same_outputs
from tests.conftest import to_numpy
from tests.layers.test_moe_feed_forward import bank_weights
from tests.layers.test_moe_feed_forward import np_expert
from tests.layers.test_moe_feed_forward import np_gelu
from tests.layers.test_moe_feed_forward import np_router_logits
from tests.layers.test_moe_feed_forward import np_silu
from tests.layers.test_moe_feed_forward import np_softmax
from tests.layers.test_moe_feed_forward import randomize

D, M, E = 6, 5, 4


def np_expert_choice_layer(layer, x, activation, mask=None):
    """Every token of the call routed together (float64): expert `e` takes
    the `c` unmasked tokens of largest `S[:, e]`, `c` counting the unmasked
    tokens only; also returns the share of unmasked tokens no expert took."""
    bank, router = layer.experts, layer.router
    w = bank_weights(bank)
    tokens = x.reshape(-1, x.shape[-1]).astype("float64")
    n = len(tokens)
    valid = np.ones(n, bool) if mask is None else np.asarray(mask, bool).ravel()
    probs = np_softmax(np_router_logits(router, tokens))
    n_valid = int(valid.sum())
    c = min(
        n_valid,
        math.ceil(router.capacity_factor * router.top_k * n_valid / router.n_experts),
    )
    out = np.zeros_like(tokens)
    taken = np.zeros(n, bool)
    for e in range(router.n_experts):
        order = [t for t in np.argsort(-probs[:, e], kind="stable") if valid[t]]
        for t in order[:c]:
            taken[t] = True
            out[t] += probs[t, e] * np_expert(w, bank, activation, e, tokens[t])
    dropped = np.sum(valid & ~taken) / max(valid.sum(), 1)
    return out.reshape(x.shape), dropped


def expert_choice(experts, router):
    """`MoEFeedForward` of `FeedForwardExperts(M, E, **experts)` and
    `ExpertChoiceRouter(E, **router)`."""
    return MoEFeedForward(
        experts=FeedForwardExperts(M, E, **experts),
        router=ExpertChoiceRouter(E, **router),
    )


@pytest.mark.parametrize(
    "make, activation, masked",
    [
        (
            lambda: MoEFeedForward(
                M, E, top_k=2, routing="expert_choice", capacity_factor=1.0
            ),
            np_gelu,
            False,
        ),
        # 2 x 5 = 10 tokens, 7 unmasked: c = ceil(2 * 7 / 4) = 4.
        (
            lambda: expert_choice(
                {"gated": True, "activation": "silu"}, {"top_k": 2, "use_bias": True}
            ),
            np_silu,
            True,
        ),
        # c = ceil(1.5 * 1 * 7 / 4) = 3, an expert scale, no biases.
        (
            lambda: expert_choice(
                {"use_bias": False, "output_scale": True},
                {"top_k": 1, "capacity_factor": 1.5},
            ),
            np_gelu,
            True,
        ),
    ],
    ids=["shorthand", "gated_router_bias", "top1_output_scale"],
)
def test_expert_choice_matches_numpy(make, activation, masked):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, D)).astype("float32")
    mask = None
    if masked:
        mask = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 0, 1]], bool)
    layer = make()
    layer.build(x.shape)
    randomize(layer)
    y = to_numpy(layer(x, mask=mask))
    expected, dropped = np_expert_choice_layer(layer, x, activation, mask)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    stats = layer.routing_stats
    assert stats["dropped_fraction"] == pytest.approx(dropped, abs=1e-6)
    np.testing.assert_allclose(stats["expert_load"], 1.0 / E, rtol=1e-6)
    # No balancing loss, also in training (the shorthand's default
    # `load_balance_weight` does not apply to expert choice).
    np.testing.assert_allclose(
        to_numpy(layer(x, mask=mask, training=True)), y, rtol=1e-6, atol=1e-6
    )
    assert layer.losses == []


@pytest.mark.parametrize("top_k, capacity_factor", [(1, 1.0), (2, 0.5)])
def test_expert_choice_padding_never_changes_the_real_tokens(top_k, capacity_factor):
    """The capacity counts the unmasked tokens of the call: 4 real tokens and
    4 masked ones, 2 experts, `top_k=1` gave each real token both experts
    (c = 4 of 8 tokens instead of 2 of 4), 11% off the unpadded outputs."""
    rng = np.random.default_rng(2)
    real = rng.normal(size=(1, 4, D)).astype("float32")
    layer = MoEFeedForward(
        M, 2, top_k=top_k, capacity_factor=capacity_factor, routing="expert_choice"
    )
    layer.build(real.shape)
    randomize(layer)
    expected = to_numpy(layer(real))
    padded = np.concatenate([real, rng.normal(size=(1, 4, D))], 1).astype("float32")
    mask = np.arange(8)[None] < 4
    y = to_numpy(layer(padded, mask=mask))
    np.testing.assert_allclose(y[:, :4], expected, rtol=1e-5, atol=1e-6)
    assert np.all(y[:, 4:] == 0.0)
    # A batch of sequences of other lengths: the real tokens of the call,
    # however padded, give the outputs of those tokens alone.
    batch = rng.normal(size=(3, 5, D)).astype("float32")
    mask = np.arange(5)[None] < np.array([[5], [2], [3]])
    alone = to_numpy(layer(batch[mask][None]))[0]
    np.testing.assert_allclose(
        to_numpy(layer(batch, mask=mask))[mask], alone, rtol=1e-5, atol=1e-6
    )
    # Under jit_compile (XLA; torch.compile takes minutes here), with the
    # mask from `Masking`: zero padding.
    inputs = keras.Input((None, D))
    model = keras.Model(inputs, layer(keras.layers.Masking(0.0)(inputs)))
    model.compile(jit_compile=BACKEND != "torch")
    zero_padded = np.concatenate([real, np.zeros((1, 4, D), "float32")], 1)
    for x in (zero_padded, np.concatenate([zero_padded, zero_padded], 1)):
        y = model.predict(x, verbose=0)
        np.testing.assert_allclose(y[:, :4], expected, rtol=1e-5, atol=1e-6)


def test_expert_choice_fits_under_jit_compile_and_reloads(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 3, D)).astype("float32")
    y = rng.normal(size=(24, 3, D)).astype("float32")
    layer = MoEFeedForward(
        M, E, top_k=1, routing="expert_choice", capacity_factor=1.0, gated=True
    )
    model = keras.Sequential([keras.Input((3, D)), layer])
    # torch.compile of this fit took 364 s on the shared 2-core machine (it
    # passed, 2026-12-02); too long for the suite, so XLA on JAX and
    # TensorFlow only.
    jit_compile = BACKEND != "torch"
    model.compile(keras.optimizers.Adam(0.01), "mse", jit_compile=jit_compile)
    history = model.fit(
        x, y, batch_size=8, epochs=1, verbose=0, callbacks=[ExpertUsage()]
    )
    assert np.isfinite(history.history["loss"]).all()
    np.testing.assert_allclose(history.history[f"{layer.name}_max_load"], 1.0)
    assert layer.routing_stats_mean()["steps"] == 3
    restored = reloaded_with_same_outputs(model, tmp_path / "ec.keras", x)
    assert restored.layers[0].get_config() == layer.get_config()
    assert isinstance(restored.layers[0].router, ExpertChoiceRouter)


def test_a_collapsed_router_rebalances_only_with_a_rate(tmp_path):
    """Two copies of one collapsed router side by side in one model, weights
    frozen (learning rate 0, no auxiliary loss): the one with a rate
    rebalances, the other stays collapsed."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 1, D)).astype("float32")
    x[..., 0] = 1.0
    kernel = rng.normal(size=(D, E)).astype("float32") * 0.2
    kernel[0, 0] = 3.0  # every token's favourite is expert 0: collapsed
    inputs = keras.Input((1, D))
    options = {"top_k": 1, "load_balance_weight": 0.0}
    fixed = MoEFeedForward(M, E, **options, name="fixed")
    balanced = MoEFeedForward(M, E, **options, balance_bias_rate=0.05, name="bal")
    model = keras.Model(inputs, keras.layers.Add()([fixed(inputs), balanced(inputs)]))
    for layer in (fixed, balanced):
        layer.router.kernel.assign(kernel)
    model(x)
    for layer in (fixed, balanced):
        np.testing.assert_array_equal(layer.routing_stats["expert_load"], [1, 0, 0, 0])
    frozen = [to_numpy(v).copy() for v in model.trainable_weights]
    # "auto": compiled on JAX and TensorFlow; 80 steps of torch.compile would
    # cost minutes (the fit under `jit_compile=True` is tested above).
    model.compile(keras.optimizers.SGD(0.0), "mse", jit_compile="auto")
    usage = ExpertUsage()
    model.fit(
        x, x, batch_size=16, epochs=20, shuffle=False, verbose=0, callbacks=[usage]
    )
    for before, after in zip(frozen, model.trainable_weights):
        np.testing.assert_array_equal(to_numpy(after), before)  # learning rate 0
    model(x)
    np.testing.assert_array_equal(fixed.routing_stats["expert_load"], [1, 0, 0, 0])
    assert "balance_bias" not in fixed.routing_stats
    load = balanced.routing_stats["expert_load"]
    bias = balanced.routing_stats["balance_bias"]
    assert load.max() * E < 1.5, load  # about balanced: no expert over 37.5%
    assert bias[0] < bias[1:].min() - 1.0, bias  # expert 0 made less attractive
    np.testing.assert_array_equal(bias, to_numpy(balanced.router.balance_bias))
    # ExpertUsage: the balanced layer's load fell and its bias is recorded.
    assert usage.loads["fixed"][-1, 0] == 1.0
    assert usage.loads["bal"][-1].max() < usage.loads["bal"][0].max()
    np.testing.assert_allclose(usage.balance_biases["bal"][-1], bias)
    assert "fixed" not in usage.balance_biases
    # The bias is saved with the model and reloaded with it.
    path = tmp_path / "balanced.keras"
    model.save(path)
    restored = keras.models.load_model(path).get_layer("bal")
    np.testing.assert_array_equal(to_numpy(restored.router.balance_bias), bias)
    assert restored.router.balance_bias_rate == 0.05
    assert restored.get_config()["router"]["config"]["balance_bias_rate"] == 0.05


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"routing": "sinkhorn"}, ValueError, "`routing` must be one of"),
        ({"router": 1}, TypeError, "Received: router=1"),
        ({"balance_bias_rate": -0.1}, ValueError, "`balance_bias_rate`.*Received"),
        (
            {"routing": "expert_choice"},
            ValueError,
            "`routing='expert_choice'` needs a number `capacity_factor`.*"
            "Received: capacity_factor=None",
        ),
        (
            {"routing": "expert_choice", "capacity_factor": 1.0},
            None,
            None,
        ),
        (
            {
                "routing": "expert_choice",
                "capacity_factor": 1.0,
                "balance_bias_rate": 0.1,
            },
            ValueError,
            "`balance_bias_rate`.*token_choice.*Received",
        ),
        (
            {"routing": "expert_choice", "capacity_factor": 1.0, "layout": "blocks"},
            ValueError,
            "`layout`.*token_choice.*Received: layout='blocks'",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    if error is None:  # the valid neighbour of the cases around it
        assert isinstance(MoEFeedForward(M, E, **kwargs).router, ExpertChoiceRouter)
        return
    with pytest.raises(error, match=match):
        MoEFeedForward(M, E, **kwargs)
