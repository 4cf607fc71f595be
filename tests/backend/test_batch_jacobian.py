import keras
import numpy as np

from keras_moe import backend
from tests.conftest import to_numpy


def test_jacobian_of_a_linear_layer_is_its_kernel():
    layer = keras.layers.Dense(5, bias_initializer="random_normal")
    x = keras.random.normal((7, 3), seed=1)
    jacobian = to_numpy(backend.batch_jacobian(layer, x))
    kernel = to_numpy(layer.kernel)
    assert jacobian.shape == (7, 5, 3)
    for sample in jacobian:
        np.testing.assert_allclose(sample, kernel.T, rtol=1e-6, atol=1e-6)


def test_jacobian_of_a_relu_layer_masks_rows_per_sample():
    layer = keras.layers.Dense(6, activation="relu")
    x = keras.random.normal((4, 3), seed=2)
    jacobian = to_numpy(backend.batch_jacobian(layer, x))
    active = to_numpy(layer(x)) > 0
    expected = active[:, :, None] * to_numpy(layer.kernel).T[None]
    np.testing.assert_allclose(jacobian, expected, rtol=1e-6, atol=1e-6)
