"""Writes the `.keras` files of this folder: one small model per keras-moe layer
configuration, with an input and the outputs the writing version computed.

Run once, by keras-moe 0.1.0 at commit 4f15812 (before the router became a
sublayer), on the JAX backend: `KERAS_BACKEND=jax python tests/data/v0.1.0/make_files.py`.
tests/test_saving.py checks that every later version loads these files and
computes the same outputs. Never rerun it with a later version: the files are
the record of what 0.1.0 wrote.
"""

import pathlib

import keras
import numpy as np

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward

HERE = pathlib.Path(__file__).parent

CASES = {
    "dense_soft": ((3, 6), lambda: DenseMoE(4, 3, gating_activation="softmax")),
    "dense_top_k": (
        (3, 6),
        lambda: DenseMoE(4, 3, expert_activation="relu", top_k=2, capacity_factor=1.5),
    ),
    "dense_top_k_noisy_no_bias": (
        (3, 6),
        lambda: DenseMoE(
            4, 4, top_k=1, noisy_gating=True, use_expert_bias=False, seed=3
        ),
    ),
    "feed_forward": ((4, 6), lambda: MoEFeedForward(5, 4, top_k=2)),
    "feed_forward_gated_router_bias_noisy": (
        (4, 6),
        lambda: MoEFeedForward(
            5, 4, top_k=2, gated=True, use_bias=False, router_bias=True,
            noisy_gating=True, seed=1,
        ),
    ),
    "conv1d_flatten": ((7, 2), lambda: Conv1DMoE(3, 2, 3, padding="causal")),
    "conv2d_pooled": (
        (5, 5, 2),
        lambda: Conv2DMoE(3, 2, 3, gating_input="pooled", gating_activation="softmax"),
    ),
    "conv3d_local": (
        (4, 4, 4, 1),
        lambda: Conv3DMoE(2, 2, 2, gating_input="local", use_gating_bias=False),
    ),
}


def main():
    rng = np.random.default_rng(0)
    for name, (shape, make) in CASES.items():
        keras.utils.set_random_seed(len(name))
        inputs = keras.Input(shape)
        model = keras.Model(inputs, make()(inputs))
        # Non-zero biases and routing statistics, so that every variable counts.
        for variable in model.weights:
            value = rng.normal(size=variable.shape).astype("float32") * 0.5
            variable.assign(value)
        x = rng.normal(size=(2,) + shape).astype("float32")
        y = model.predict(x, verbose=0)
        model.save(HERE / f"{name}.keras")
        np.savez(HERE / f"{name}.npz", x=x, y=y)
        print(name, [v.path for v in model.weights])


if __name__ == "__main__":
    main()
