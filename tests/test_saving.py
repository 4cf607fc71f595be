"""Training with `jit_compile=True`, `.keras` files (safe mode), and `.keras`
files written on JAX loaded on the current backend."""

import io
import json
import textwrap
import zipfile

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe import blocks
from keras_moe.layers import FeedForwardExperts
from keras_moe.routing import TopKRouter
from tests.conftest import REPO
from tests.conftest import to_numpy
from tests.conftest import write_on_jax

# The same script builds the model here and in the JAX subprocess.
MODEL_SOURCE = textwrap.dedent(
    """
    import keras
    from keras_moe import Conv1DMoE, Conv2DMoE, Conv3DMoE, DenseMoE, MoEFeedForward
    from keras_moe.layers import FeedForwardExperts, SharedExpert
    from keras_moe.routing import TopKRouter

    def all_layers_model():
        inputs = keras.Input((4, 4, 4, 2))
        x = Conv3DMoE(2, 2, 2, padding="same", expert_activation="relu",
                      gating_activation="softmax")(inputs)
        x = keras.layers.Reshape((4, 4, 8))(x)
        x = Conv2DMoE(3, 2, (3, 2), padding="same", data_format="channels_first",
                      gating_activation="softmax",
                      expert_kernel_regularizer="l2")(x)
        x = keras.layers.Reshape((12, 8))(x)
        x = Conv1DMoE(2, 2, 3, padding="causal", dilation_rate=2,
                      expert_activation="tanh", use_gating_bias=False)(x)
        x = DenseMoE(3, 2, gating_activation="softmax",
                     expert_bias_initializer="ones")(x)
        # Composed of sublayers with other options than the shorthand's.
        outputs = MoEFeedForward(
            experts=FeedForwardExperts(4, 4, gated=True,
                                       gate_up_layout="interleaved",
                                       swiglu_limit=7.0, output_scale=True),
            router=TopKRouter(4, top_k=2, use_bias=True, normalize_top_k=False,
                              softmax_before_top_k=True),
            shared_expert=SharedExpert(3, gated=True, output_gate=True),
        )(x)
        return keras.Model(inputs, outputs)
    """
)
namespace = {}
exec(MODEL_SOURCE, namespace)
all_layers_model = namespace["all_layers_model"]


def data(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 4, 4, 2)).astype("float32")
    y = rng.normal(size=(n, 12, 3)).astype("float32")
    return x, y


# Every layer class and gating or routing mode, small: (layer, input shape).
EVERY_LAYER = {
    "dense_soft": (
        lambda: DenseMoE(
            3, 2, gating_activation="softmax", expert_bias_initializer="ones"
        ),
        (2, 3, 4),
    ),
    "dense_top_k": (
        lambda: DenseMoE(
            3,
            4,
            top_k=2,
            expert_activation="relu",
            capacity_factor=1.5,
            noisy_gating=True,
            load_balance_weight=0.1,
            seed=2,
        ),
        (2, 3, 4),
    ),
    "feed_forward": (lambda: MoEFeedForward(8, 4, gated=True), (2, 3, 4)),
    "feed_forward_composed": (
        lambda: MoEFeedForward(
            experts=FeedForwardExperts(8, 4, gated=True, use_gate_bias=True),
            router=TopKRouter(4, use_bias=True, normalize_top_k=False),
        ),
        (2, 3, 4),
    ),
    "feed_forward_expert_choice": (
        lambda: MoEFeedForward(8, 4, routing="expert_choice", capacity_factor=1.0),
        (2, 3, 4),
    ),
    "feed_forward_gemma4": (lambda: blocks.gemma4(8, 4), (2, 3, 4)),
    "feed_forward_qwen_moe": (
        lambda: blocks.qwen_moe(8, 4, shared_intermediate_dim=5),
        (2, 3, 4),
    ),
    "soft_moe": (lambda: SoftMoE(8, 4, slots_per_expert=2), (2, 3, 4)),
    "conv1d_flatten": (
        lambda: Conv1DMoE(
            2,
            2,
            3,
            padding="causal",
            dilation_rate=2,
            expert_activation="tanh",
            use_gating_bias=False,
        ),
        (2, 8, 3),
    ),
    "conv2d_pooled": (
        lambda: Conv2DMoE(
            3,
            2,
            (3, 2),
            padding="same",
            data_format="channels_first",
            gating_input="pooled",
            gating_activation="softmax",
            expert_kernel_regularizer="l2",
        ),
        (2, 3, 5, 4),
    ),
    "conv3d_local": (
        lambda: Conv3DMoE(
            2, 2, 2, gating_input="local", expert_activation="relu", strides=2
        ),
        (2, 4, 4, 4, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(EVERY_LAYER))
def test_every_layer_round_trips_through_its_config_with_the_same_outputs(name):
    """Each layer's config, through JSON, makes a layer that, given the
    weights, computes the same outputs."""
    make, shape = EVERY_LAYER[name]
    layer = make()
    layer.build(shape)
    rng = np.random.default_rng(3)
    for w in layer.trainable_weights:
        w.assign((0.5 * rng.normal(size=w.shape)).astype("float32"))
    x = rng.normal(size=shape).astype("float32")
    expected = to_numpy(layer(x))
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    restored = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
    assert restored.built  # from the config's `build_config`
    restored.set_weights(layer.get_weights())
    np.testing.assert_array_equal(to_numpy(restored(x)), expected)


def tiny_model():
    inputs = keras.Input((6, 2))
    x = Conv1DMoE(2, 2, 3, padding="same", gating_activation="softmax")(inputs)
    outputs = DenseMoE(2, 2, expert_activation="relu", gating_activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_fit_with_jit_compile():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=True)
    assert model.jit_compile is True
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 2)).astype("float32")
    y = rng.normal(size=(8, 6, 2)).astype("float32")
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [to_numpy(w) for w in model.trainable_weights]
    assert len(before) == len(after) == 8
    for w0, w1, variable in zip(before, after, model.trainable_weights):
        assert not np.allclose(w0, w1), f"{variable.path} did not change"


def test_keras_file_round_trip_in_safe_mode(tmp_path):
    model = all_layers_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    expected = to_numpy(model.predict(x, verbose=0))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(to_numpy(restored.predict(x, verbose=0)), expected)
    for original, loaded in zip(model.layers, restored.layers):
        assert type(loaded) is type(original)
        assert loaded.get_config() == original.get_config()
    # The optimizer state came along: training continues from the same point.
    assert restored.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()


def test_keras_file_of_mixed_precision_layers(tmp_path):
    inputs = keras.Input((5, 3))
    outputs = Conv1DMoE(2, 2, 3, dtype="mixed_bfloat16")(inputs)
    outputs = DenseMoE(2, 2, dtype="mixed_bfloat16")(outputs)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "mixed.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(1).normal(size=(2, 5, 3)).astype("float32")
    assert restored.layers[-1].dtype_policy.name == "mixed_bfloat16"
    assert restored.layers[-1].gating_kernel.dtype == "float32"
    np.testing.assert_array_equal(
        to_numpy(keras.ops.cast(restored(x), "float32")),
        to_numpy(keras.ops.cast(model(x), "float32")),
    )


JAX_WRITER = """
import sys
import numpy as np
import keras
assert keras.backend.backend() == "jax", keras.backend.backend()
{model_source}
keras.utils.set_random_seed(7)
model = all_layers_model()
rng = np.random.default_rng(3)
for w in model.weights:
    w.assign(0.5 * rng.normal(size=w.shape).astype("float32"))
x = rng.normal(size=(3, 4, 4, 4, 2)).astype("float32")
out = sys.argv[1]
model.save(out + "/model.keras")
np.savez(out + "/io.npz", x=x, y=np.asarray(model.predict(x, verbose=0)))
"""


@pytest.fixture(scope="module")
def jax_saved_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved_on_jax")
    return write_on_jax(JAX_WRITER.format(model_source=MODEL_SOURCE), out)


def test_keras_file_saved_on_jax_loads_here(jax_saved_model):
    io = np.load(jax_saved_model / "io.npz")
    model = keras.saving.load_model(jax_saved_model / "model.keras", safe_mode=True)
    assert {type(layer) for layer in model.layers} >= {
        Conv1DMoE,
        Conv2DMoE,
        Conv3DMoE,
        DenseMoE,
        MoEFeedForward,
    }
    y = to_numpy(model.predict(io["x"], verbose=0))
    np.testing.assert_allclose(y, io["y"], rtol=1e-5, atol=1e-5)
    assert np.abs(io["y"]).max() > 0.1  # not a trivially zero output


# `.keras` files written by earlier versions: 0.1.0 (on JAX, before the
# router became a sublayer) and 0.2.0 (before the expert bank and the router
# base were redesigned); each folder's make_files.py wrote them.
LEGACY = {
    version: REPO / "tests" / "data" / f"v{version}" for version in ("0.1.0", "0.2.0")
}


def saved_arrays(path):
    """Every array in the weights file of a `.keras` archive."""
    import h5py

    arrays = []
    with zipfile.ZipFile(path) as archive:
        with archive.open("model.weights.h5") as file:
            with h5py.File(io.BytesIO(file.read())) as h5:

                def collect(key):
                    if isinstance(h5[key], h5py.Dataset):
                        arrays.append(np.asarray(h5[key]))

                h5.visit(collect)
    return arrays


@pytest.mark.parametrize(
    "version, name",
    [
        (version, path.stem)
        for version, folder in LEGACY.items()
        for path in sorted(folder.glob("*.keras"))
    ],
)
def test_files_of_earlier_versions_load_with_the_same_outputs(version, name):
    """`.keras` files written by keras-moe 0.1.0 and 0.2.0 (on JAX;
    tests/data/v*/make_files.py) load on every backend and compute what they
    computed then."""
    path = LEGACY[version] / f"{name}.keras"
    model = keras.saving.load_model(path)
    # Every saved array is in a variable (read before a call updates the
    # statistics); the routing statistics, which those versions packed into
    # two vectors `(loads, dropped, entropy)` and `(their sums, steps)`, are
    # in a `RoutingStatistics` sublayer's seven variables.
    statistics = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras_moe.routing.RoutingStatistics)
    ]
    packed = set()
    values = []
    for layer in statistics:
        last = [layer.expert_load, layer.dropped_fraction, layer.router_entropy]
        sums = [layer.expert_load_sum, layer.dropped_fraction_sum]
        sums += [layer.router_entropy_sum, layer.steps]
        for group in (last, sums):
            packed.update(id(v) for v in group)
            values.append(np.concatenate([np.ravel(to_numpy(v)) for v in group]))
    values += [
        to_numpy(v)
        for v in model.weights
        if v.name != "seed_generator_state" and id(v) not in packed
    ]
    saved = saved_arrays(path)
    assert len(saved) == len(values)
    for array in saved:
        assert any(v.shape == array.shape and np.array_equal(v, array) for v in values)
    data = np.load(LEGACY[version] / f"{name}.npz")
    np.testing.assert_allclose(
        model.predict(data["x"], verbose=0), data["y"], rtol=1e-5, atol=1e-5
    )
