"""Train a small model built from keras-moe layers on synthetic data.

Run: `python examples/quickstart.py` (any KERAS_BACKEND).
"""

import keras
import numpy as np

from keras_moe import Conv2DMoE
from keras_moe import DenseMoE


def make_data(n, rng):
    # Two classes: a bright blob in the left or the right half of a 16x16 image.
    x = rng.normal(0.0, 0.3, size=(n, 16, 16, 1)).astype("float32")
    y = rng.integers(0, 2, size=n)
    for i, label in enumerate(y):
        col = 3 if label == 0 else 11
        x[i, 6:10, col - 2 : col + 2, 0] += 1.5
    return x, y


def main(epochs=3):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = make_data(2048, rng)
    x_test, y_test = make_data(512, rng)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            Conv2DMoE(8, 2, 3, expert_activation="relu", gating_activation="softmax"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            DenseMoE(16, 4, expert_activation="relu", gating_activation="softmax"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    model.summary()
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, validation_split=0.1)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.3f} (backend: {keras.backend.backend()})")
    return accuracy


if __name__ == "__main__":
    main()
