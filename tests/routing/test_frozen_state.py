"""A frozen layer's state does not move (as `BatchNormalization`'s): with the
MoE layer, or only its router, set `trainable=False`, `fit` moves neither
the balance bias nor the routing statistics' running sums."""

import keras
import numpy as np
import pytest

from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe.routing.statistics import FIELDS
from tests.conftest import to_numpy

D, E = 6, 4

LAYERS = {
    "balance_bias": lambda: MoEFeedForward(
        8, E, top_k=1, balance_bias_rate=0.1, capacity_factor=1.0
    ),
    # One expert per token on average: alike tokens, some taken by none.
    "expert_choice": lambda: MoEFeedForward(
        8, E, top_k=1, routing="expert_choice", capacity_factor=1.0
    ),
    "dense_moe": lambda: DenseMoE(D, E, top_k=2),
    "soft_moe": lambda: SoftMoE(8, E),
}


# The layers that never drop an assignment.
DROPLESS = {"dense_moe", "soft_moe"}

# The routing statistics of the last call, which report every call (also
# in a frozen layer's): the state that may move is their sums, `steps` and
# the balance bias.
LAST = tuple(f"/statistics/{name}" for name in FIELDS)


def state(layer):
    return {v.path: to_numpy(v).copy() for v in layer.non_trainable_weights}


def moving(paths):
    return [path for path in paths if not path.endswith(LAST)]


def fit(layer, freeze):
    """Two `fit` steps of `Dense -> layer`, the layer frozen before it is
    built (`"layer"`), after (`"built"`), only its router (`"router"`), or
    not at all (None)."""
    if freeze == "layer":
        layer.trainable = False
    rng = np.random.default_rng(0)
    # Unbalanced inputs: every token alike, so the routers favour some experts.
    x = (rng.normal(size=(16, 3, D)) * 0.1 + 1.0).astype("float32")
    y = rng.normal(size=(16, 3, D)).astype("float32")
    model = keras.Sequential([keras.Input((3, D)), keras.layers.Dense(D), layer])
    if freeze == "built":
        layer.trainable = False
    elif freeze == "router":
        layer.router.trainable = False
    model.compile(keras.optimizers.SGD(0.01), "mse")
    before = state(layer)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return before, state(layer)


@pytest.mark.parametrize(
    "kind, freeze",
    [
        (kind, freeze)
        for kind in sorted(LAYERS)
        for freeze in ("layer", "built", "router")
        # Soft MoE has no router sublayer: its routing is its own.
        if not (kind == "soft_moe" and freeze == "router")
    ],
)
def test_a_frozen_layer_keeps_its_state_in_fit(kind, freeze):
    layer = LAYERS[kind]()
    before, after = fit(layer, freeze)
    assert moving(before)
    for path in moving(before):
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert layer.routing_stats_mean() is None


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_trainable_layer_moves_its_state_in_fit(kind):
    layer = LAYERS[kind]()
    before, after = fit(layer, None)
    paths = moving(before)
    assert {path.rpartition("/")[2] for path in paths} >= {
        "expert_load_sum",
        "router_entropy_sum",
        "steps",
    }
    for path in paths:
        if path.endswith("/dropped_fraction_sum") and kind in DROPLESS:
            assert after[path] == 0.0, path  # nothing is ever dropped
            continue
        assert not np.array_equal(after[path], before[path]), path
    assert layer.routing_stats_mean()["steps"] == 2
