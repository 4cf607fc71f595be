"""keras_moe.compat: the original layers' weights give the original outputs."""

import json

import h5py
import keras
import numpy as np
import pytest

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import compat
from tests.conftest import to_numpy

LAYERS = {
    "DenseMoE": DenseMoE,
    "Conv1DMoE": Conv1DMoE,
    "Conv2DMoE": Conv2DMoE,
    "Conv3DMoE": Conv3DMoE,
}


def load_cases(directory):
    data = np.load(directory / "layer_vectors.npz")
    meta = json.loads(bytes(data["meta"]))
    cases = []
    for i, case in enumerate(meta):
        arrays = [data[f"c{i}_w{j}"] for j in range(case["n_weights"])]
        cases.append((case, data[f"c{i}_x"], arrays, data[f"c{i}_y"]))
    return cases


def original_layer(case):
    return LAYERS[case["layer"]](**case["kwargs"])


# ---------------------------------------------------------------- layer vectors


@pytest.mark.seed_compat
@pytest.mark.parametrize("prebuilt", [False, True], ids=["unbuilt", "built"])
def test_layer_vectors_match_the_original_outputs(seed_compat_dir, prebuilt):
    cases = load_cases(seed_compat_dir)
    assert {case["layer"] for case, *_ in cases} >= {"DenseMoE", "Conv2DMoE"}
    for case, x, arrays, y in cases:
        assert [list(a.shape) for a in arrays] == case["weight_shapes"]
        layer = original_layer(case)
        if prebuilt:
            layer.build((None,) + tuple(case["input_shape"]))
        assert compat.load_seed_weights(layer, arrays) is layer
        np.testing.assert_allclose(
            to_numpy(layer(x)),
            y,
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"{case['layer']} {case['kwargs']}",
        )


@pytest.mark.seed_compat
def test_loaded_layer_serialises_and_keeps_the_outputs(seed_compat_dir, tmp_path):
    for case, x, arrays, y in load_cases(seed_compat_dir):
        inputs = keras.Input(tuple(case["input_shape"]))
        layer = original_layer(case)
        model = keras.Model(inputs, layer(inputs))
        compat.load_seed_weights(layer, arrays)
        path = tmp_path / f"{layer.name}.keras"
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_allclose(to_numpy(restored(x)), y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- CIFAR network


def cifar_moe_small():
    """The original CIFAR-10 MoE network at 12x12, from keras-moe + Keras layers."""
    moe = {"expert_activation": "relu", "gating_activation": "softmax"}
    return keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            Conv2DMoE(4, 2, (3, 3), padding="same", **moe),
            Conv2DMoE(4, 2, (3, 3), **moe),
            keras.layers.MaxPooling2D(2),
            keras.layers.Dropout(0.25),
            Conv2DMoE(6, 2, (3, 3), padding="same", **moe),
            Conv2DMoE(6, 2, (3, 3), **moe),
            keras.layers.MaxPooling2D(2),
            keras.layers.Dropout(0.25),
            keras.layers.Flatten(),
            DenseMoE(16, 2, **moe),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10),
            keras.layers.Activation("softmax"),
        ]
    )


@pytest.mark.seed_compat
def test_cifar_network_reproduces_the_original_predictions(seed_compat_dir):
    io = np.load(seed_compat_dir / "cifar_moe_small_io.npz")
    model = cifar_moe_small()
    assert compat.load_seed_h5(model, seed_compat_dir / "cifar_moe_small.h5") is model
    y = to_numpy(model(io["x"], training=False))
    np.testing.assert_allclose(y, io["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.seed_compat
def test_cifar_h5_into_a_different_architecture_is_rejected(seed_compat_dir):
    model = keras.Sequential(
        [keras.Input((12, 12, 3)), keras.layers.Flatten(), DenseMoE(16, 2)]
    )
    with pytest.raises(
        ValueError, match=r"file has 6 layers with weights.*model has 1"
    ):
        compat.load_seed_h5(model, seed_compat_dir / "cifar_moe_small.h5")


@pytest.mark.seed_compat
def test_cifar_h5_with_a_wrong_standard_layer_is_rejected(seed_compat_dir):
    model = cifar_moe_small()
    model.pop()
    model.pop()
    model.add(keras.layers.Dense(7))
    with pytest.raises(ValueError, match=r"expects weights of shapes.*\(16, 7\)"):
        compat.load_seed_h5(model, seed_compat_dir / "cifar_moe_small.h5")


# ---------------------------------------------------------------- bad inputs


def dense_arrays(d=6, units=5, n_experts=3):
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(d, units, n_experts)).astype("float32"),
        rng.normal(size=(d, n_experts)).astype("float32"),
        rng.normal(size=(units, n_experts)).astype("float32"),
        rng.normal(size=(n_experts,)).astype("float32"),
    ]


def test_load_seed_weights_converts_the_dense_layout():
    arrays = dense_arrays()
    layer = compat.load_seed_weights(DenseMoE(5, 3), arrays)
    np.testing.assert_array_equal(
        to_numpy(layer.expert_kernel), np.transpose(arrays[0], (0, 2, 1))
    )
    np.testing.assert_array_equal(to_numpy(layer.expert_bias), arrays[2].T)
    np.testing.assert_array_equal(to_numpy(layer.gating_kernel), arrays[1])


def test_load_seed_weights_without_biases():
    arrays = dense_arrays()[:2]
    layer = DenseMoE(5, 3, use_expert_bias=False, use_gating_bias=False)
    compat.load_seed_weights(layer, arrays)
    assert len(layer.weights) == 2


def test_load_seed_weights_conv3d_with_expert_bias():
    # The original Conv3DMoE could not be called with an expert bias; its
    # weights (bias of rank 5) still load and are used.
    rng = np.random.default_rng(1)
    arrays = [
        rng.normal(size=(2, 2, 2, 3, 4)).astype("float32"),
        rng.normal(size=(3, 3, 3, 3, 2, 2)).astype("float32"),
        rng.normal(size=(1, 1, 1, 2, 2)).astype("float32"),
        rng.normal(size=(2, 2)).astype("float32"),
    ]
    layer = compat.load_seed_weights(Conv3DMoE(2, 2, 2), arrays)
    np.testing.assert_array_equal(to_numpy(layer.expert_bias), arrays[2][0, 0, 0])
    assert tuple(layer(np.ones((1, 3, 3, 3, 3), "float32")).shape) == (1, 2, 2, 2, 2)


BAD_WEIGHTS = [
    (
        lambda a: a[:3],
        ValueError,
        r"`arrays` must hold 4 arrays \(expert_kernel, gating_kernel, expert_bias, "
        r"gating_bias\).*Received: 3 arrays",
    ),
    (
        lambda a: a + [a[-1]],
        ValueError,
        r"`arrays` must hold 4 arrays.*Received: 5 arrays",
    ),
    (
        lambda a: [a[0], a[1][:, :2], a[2], a[3]],
        ValueError,
        r"`gating_kernel`.*\(6, 2\).*expects \(6, 3\)",
    ),
    (
        lambda a: [a[0], a[1], a[2][:4], a[3]],
        ValueError,
        r"`expert_bias`.*expects \(3, 5\)",
    ),
    (
        lambda a: [a[0][:, :, 0], a[1], a[2], a[3]],
        ValueError,
        r"`expert_kernel`.*rank 3.*Received: arrays shapes",
    ),
]


@pytest.mark.parametrize("change, error, match", BAD_WEIGHTS)
@pytest.mark.parametrize("prebuilt", [False, True], ids=["unbuilt", "built"])
def test_load_seed_weights_rejects_bad_arrays(change, error, match, prebuilt):
    layer = DenseMoE(5, 3)
    if prebuilt:
        layer.build((None, 6))
    with pytest.raises(error, match=match):
        compat.load_seed_weights(layer, change(dense_arrays()))


def test_load_seed_weights_rejects_wrong_conv_shapes():
    rng = np.random.default_rng(2)
    arrays = [
        rng.normal(size=(3, 3, 3, 8)).astype("float32"),
        rng.normal(size=(8, 8, 3, 4, 2)).astype("float32"),
        rng.normal(size=(1, 1, 4, 2)).astype("float32"),
        rng.normal(size=(4, 2)).astype("float32"),
    ]
    # A kernel of 5x5 where the layer has 3x3.
    bad = [rng.normal(size=(5, 5, 3, 8)).astype("float32")] + arrays[1:]
    with pytest.raises(ValueError, match=r"`expert_kernel`.*\(5, 5, 3, 8\)"):
        compat.load_seed_weights(Conv2DMoE(4, 2, 3, padding="same"), bad)
    # Weights of a layer with 3 experts per filter.
    with pytest.raises(ValueError, match=r"`expert_kernel`.*expects \(3, 3, 3, 12\)"):
        compat.load_seed_weights(Conv2DMoE(4, 3, 3, padding="same"), arrays)
    # Gating kernel of a 1D input given to a 2D layer.
    flat = [arrays[0], arrays[1].reshape(64, 3, 4, 2)] + arrays[2:]
    with pytest.raises(ValueError, match=r"`gating_kernel`.*rank 5.*Received: arrays"):
        compat.load_seed_weights(Conv2DMoE(4, 2, 3, padding="same"), flat)


@pytest.mark.parametrize(
    "layer",
    [keras.layers.Dense(3), keras.layers.Conv2D(2, 3), "DenseMoE"],
    ids=["Dense", "Conv2D", "str"],
)
def test_load_seed_weights_rejects_non_moe_layers(layer):
    with pytest.raises(
        TypeError, match=r"`layer` must be a keras-moe.*Received: layer="
    ):
        compat.load_seed_weights(layer, dense_arrays())


def test_load_seed_h5_rejects_a_keras3_weights_file(tmp_path):
    model = keras.Sequential([keras.Input((4,)), DenseMoE(2, 2)])
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    with pytest.raises(ValueError, match=r"Keras 2 weights file.*Received: path="):
        compat.load_seed_h5(model, path)


def test_load_seed_h5_rejects_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("not an HDF5 file")
    model = keras.Sequential([keras.Input((4,)), DenseMoE(2, 2)])
    with pytest.raises(
        ValueError, match=r"`path`.*Keras 2 weights file.*Received: path=.*weights.h5"
    ):
        compat.load_seed_h5(model, path)


def test_load_seed_h5_round_trip_of_a_keras2_style_file(tmp_path):
    # A file in Keras 2's layout written here: the loader matches by order.
    arrays = dense_arrays(d=4, units=2, n_experts=3)
    rng = np.random.default_rng(3)
    dense_kernel = rng.normal(size=(2, 3)).astype("float32")
    path = tmp_path / "keras2.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense_mo_e", b"dropout", b"dense"]
        names = ["expert_kernel", "gating_kernel", "expert_bias", "gating_bias"]
        group = f.create_group("dense_mo_e")
        group.attrs["weight_names"] = [f"dense_mo_e/{n}:0".encode() for n in names]
        for name, value in zip(names, arrays):
            group[f"dense_mo_e/{name}:0"] = value
        f.create_group("dropout").attrs["weight_names"] = []
        group = f.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0"]
        group["dense/kernel:0"] = dense_kernel
    model = keras.Sequential(
        [
            keras.Input((4,)),
            DenseMoE(2, 3),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(3, use_bias=False),
        ]
    )
    compat.load_seed_h5(model, path)
    np.testing.assert_array_equal(to_numpy(model.layers[-1].kernel), dense_kernel)
    np.testing.assert_array_equal(to_numpy(model.layers[0].gating_kernel), arrays[1])
