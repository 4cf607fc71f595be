"""DenseMoE with sparse top-k routing: Keras's layer harness, a NumPy reference,
`top_k=n_experts` equals the soft mixture, losses, fit under jit_compile,
save/load and bad arguments. (The soft mixture is tested in test_dense_moe.py.)"""

import keras
import numpy as np
import pytest
from keras.src import testing

from keras_moe import DenseMoE
from tests.conftest import assert_a_training_step_moves_every_weight
from tests.conftest import reloaded_with_same_outputs
from tests.conftest import to_numpy
from tests.harness import run_harness

D, U, E = 6, 5, 4


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference(layer, x):
    """Each token mixes its top-k experts' relu(W x + c) (float64)."""
    tokens = x.reshape(-1, D).astype("float64")
    kernel = to_numpy(layer.expert_kernel).astype("float64")  # (e, d, u)
    bias = to_numpy(layer.expert_bias).astype("float64")
    logits = tokens @ to_numpy(layer.gating_kernel) + to_numpy(layer.gating_bias)
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, : layer.top_k]
    chosen = np.take_along_axis(logits, experts, -1)
    if layer.normalize_top_k:
        gates = np_softmax(chosen)
    else:
        gates = np.take_along_axis(np_softmax(logits), experts, -1)
    h = np.maximum(np.einsum("nd,edu->neu", tokens, kernel) + bias, 0.0)
    out = np.einsum("nku,nk->nu", np.take_along_axis(h, experts[..., None], 1), gates)
    return out.reshape(x.shape[:-1] + (U,))


def randomized(layer, x):
    layer.build(x.shape)
    rng = np.random.default_rng(0)
    for v in layer.trainable_weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    return layer


class DenseMoETopKLayerTest(testing.TestCase):
    def test_layer_harness(self):
        # The router's statistics: last values, their sums, the steps.
        kwargs = {
            "units": 3,
            "n_experts": 4,
            "expert_activation": "relu",
            "top_k": 2,
            "load_balance_weight": 0.01,
        }
        run_harness(self, DenseMoE, kwargs, ((2, 3, 5), (2, 3, 3)), (4, 7, 0, 0))

    def test_layer_harness_noisy_capacity(self):
        kwargs = {
            "units": 3,
            "n_experts": 3,
            "top_k": 1,
            "noisy_gating": True,
            "capacity_factor": 1.0,
            "use_expert_bias": False,
        }
        run_harness(self, DenseMoE, kwargs, ((4, 5), (4, 3)), (4, 7, 1, 0))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_numpy_reference(k, normalize):
    x = np.random.default_rng(k).normal(size=(3, 4, D)).astype("float32")
    layer = randomized(
        DenseMoE(U, E, expert_activation="relu", top_k=k, normalize_top_k=normalize),
        x,
    )
    np.testing.assert_allclose(
        to_numpy(layer(x)), reference(layer, x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("capacity_factor", [None, 100.0])
def test_top_k_all_experts_equals_the_soft_mixture(capacity_factor):
    x = np.random.default_rng(1).normal(size=(7, D)).astype("float32")
    soft = randomized(
        DenseMoE(U, E, expert_activation="tanh", gating_activation="softmax"), x
    )
    sparse = DenseMoE(
        U,
        E,
        expert_activation="tanh",
        gating_activation="softmax",
        top_k=E,
        capacity_factor=capacity_factor,
    )
    sparse.build(x.shape)
    # The sparse kernel is expert-major: (e, d, u) against the soft (d, e, u).
    sparse.expert_kernel.assign(np.transpose(to_numpy(soft.expert_kernel), (1, 0, 2)))
    for name in ("expert_bias", "gating_kernel", "gating_bias"):
        getattr(sparse, name).assign(getattr(soft, name))
    np.testing.assert_allclose(
        to_numpy(sparse(x)), to_numpy(soft(x)), rtol=1e-5, atol=1e-6
    )


def test_sparse_kernel_is_expert_major_and_takes_the_original_weights():
    from keras_moe.compat import load_seed_weights

    rng = np.random.default_rng(4)
    # The original's order: (d, units, e), (d, e), (units, e), (e,).
    original = [
        rng.normal(size=(D, U, E)),
        rng.normal(size=(D, E)),
        rng.normal(size=(U, E)),
        rng.normal(size=(E,)),
    ]
    original = [a.astype("float32") for a in original]
    kwargs = {"expert_activation": "tanh", "gating_activation": "softmax"}
    soft, sparse = DenseMoE(U, E, **kwargs), DenseMoE(U, E, top_k=E, **kwargs)
    load_seed_weights(soft, original)
    load_seed_weights(sparse, original)
    assert tuple(soft.expert_kernel.shape) == (D, E, U)
    assert tuple(sparse.expert_kernel.shape) == (E, D, U)
    assert sparse.expert_weight_axes() == {"expert_kernel": 0, "expert_bias": 0}
    x = rng.normal(size=(9, D)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(sparse(x)), to_numpy(soft(x)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(sparse.expert_outputs(x)),
        to_numpy(soft.expert_outputs(x)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_soft_mixture_keeps_its_weights_and_config():
    layer = DenseMoE(U, E)
    layer.build((None, D))
    assert [v.name for v in layer.weights] == [
        "expert_kernel",
        "gating_kernel",
        "expert_bias",
        "gating_bias",
    ]
    config = layer.get_config()
    assert config["top_k"] is None and config["capacity_factor"] is None
    assert DenseMoE.from_config(config).top_k is None


def test_losses_statistics_and_gradients():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(32, D)).astype("float32")
    y = rng.normal(size=(32, U)).astype("float32")
    layer = DenseMoE(U, E, top_k=2, load_balance_weight=0.1, router_z_loss_weight=0.01)
    layer(x, training=True)
    assert len(layer.losses) == 2
    stats = layer.routing_stats
    assert stats["expert_load"].sum() == pytest.approx(1.0, rel=1e-5)
    assert stats["dropped_fraction"] == 0.0
    assert_a_training_step_moves_every_weight(layer, x, y)


def test_mixed_precision_keeps_the_router_in_float32():
    keras.config.set_dtype_policy("mixed_float16")
    x = np.random.default_rng(3).normal(size=(8, D)).astype("float32")
    layer = DenseMoE(U, E, top_k=2, router_z_loss_weight=1.0)
    y = layer(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert layer.gating_kernel.dtype == "float32"
    assert keras.backend.standardize_dtype(layer.losses[0].dtype) == "float32"


def test_fit_jit_compile_and_save_load(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(48, 2, D)).astype("float32")
    y = rng.normal(size=(48, 2, U)).astype("float32")
    model = keras.Sequential(
        [keras.Input((2, D)), DenseMoE(U, E, top_k=2, capacity_factor=0.75)]
    )
    model.compile("adam", "mse", jit_compile=True)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    mean = model.layers[0].routing_stats_mean()
    assert mean["steps"] == 3 and mean["dropped_fraction"] > 0.0
    reloaded_with_same_outputs(
        model, tmp_path / "dense_moe_top_k.keras", x, predict=True
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"top_k": 5}, ValueError, "`top_k` must be an integer from 1 to `n_experts`"),
        ({"top_k": 0}, ValueError, "`top_k`.*Received: top_k=0"),
        ({"top_k": 1.5}, TypeError, "`top_k`.*Received: top_k=1.5"),
        ({"capacity_factor": 1.0}, ValueError, "`capacity_factor` applies only"),
        ({"noisy_gating": True}, ValueError, "`noisy_gating` applies only"),
        ({"load_balance_weight": 0.1}, ValueError, "`load_balance_weight` applies"),
        ({"top_k": 2, "capacity_factor": -1.0}, ValueError, "`capacity_factor`"),
        ({"top_k": 2, "normalize_top_k": "yes"}, TypeError, "`normalize_top_k`"),
        ({"top_k": 2, "router_z_loss_weight": float("nan")}, ValueError, "z_loss"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DenseMoE(U, E, **kwargs)
