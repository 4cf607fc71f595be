"""Writes the `.keras` files of this folder: one small model per keras-moe layer
configuration, with an input and the outputs the writing version computed.

Run once, by keras-moe 0.2.0 at commit f9dcb2f (the last commit before the
expert bank and the router base were redesigned), on the JAX backend:
`KERAS_BACKEND=jax python tests/data/v0.2.0/make_files.py`.
tests/test_saving.py checks that every later version loads these files and
computes the same outputs. Never rerun it with a later version: the files are
the record of what 0.2.0 wrote.
"""

import pathlib

import keras
import numpy as np

from keras_moe import Conv2DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE

HERE = pathlib.Path(__file__).parent

SEQUENCE = (4, 6)

CASES = {
    "dense_top_k": (
        (6,),
        lambda: DenseMoE(4, 3, expert_activation="relu", top_k=2),
    ),
    "conv2d_local_same": (
        (5, 5, 2),
        lambda: Conv2DMoE(3, 2, 3, gating_input="local", padding="same"),
    ),
    "feed_forward_mixtral": (
        SEQUENCE,
        lambda: MoEFeedForward(
            5, 4, top_k=2, activation="silu", gated=True, use_bias=False,
            activation_dtype="float32", softmax_before_top_k=True,
        ),
    ),
    "feed_forward_qwen": (
        SEQUENCE,
        lambda: MoEFeedForward(
            5, 4, top_k=2, activation="silu", gated=True, use_bias=False,
            gate_up_layout="concatenated", shared_intermediate_dim=3,
            shared_expert_gate=True, softmax_before_top_k=True,
        ),
    ),
    "feed_forward_gpt_oss": (
        SEQUENCE,
        lambda: MoEFeedForward(
            5, 4, top_k=2, gated=True, use_bias=True, router_bias=True,
            gate_up_layout="interleaved", swiglu_limit=7.0,
        ),
    ),
    "feed_forward_gemma4": (
        SEQUENCE,
        lambda: MoEFeedForward(
            5, 4, top_k=2, activation="gelu_tanh", gated=True, use_bias=False,
            activation_dtype="float32", expert_output_scale=True,
            router_input_norm=True, softmax_before_top_k=True,
        ),
    ),
    "feed_forward_gate_bias_capacity": (
        SEQUENCE,
        lambda: MoEFeedForward(
            5, 4, top_k=2, gated=True, gate_bias=True, capacity_factor=1.25,
            noisy_gating=True, router_z_loss_weight=0.001, seed=2,
        ),
    ),
    "feed_forward_balance_bias": (
        SEQUENCE,
        lambda: MoEFeedForward(
            5, 4, top_k=1, balance_bias_rate=0.01, load_balance_weight=0.0
        ),
    ),
    "feed_forward_expert_choice": (
        SEQUENCE,
        lambda: MoEFeedForward(5, 4, top_k=2, router="expert_choice"),
    ),
    "soft_moe": (
        SEQUENCE,
        lambda: SoftMoE(5, 3, slots_per_expert=2, gated=True),
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
            if variable.dtype != "float32":
                value = rng.integers(0, 100, size=variable.shape)
            variable.assign(value.astype(variable.dtype))
        x = rng.normal(size=(2,) + shape).astype("float32")
        y = model.predict(x, verbose=0)
        model.save(HERE / f"{name}.keras")
        np.savez(HERE / f"{name}.npz", x=x, y=y)
        print(name, [v.path for v in model.weights])


if __name__ == "__main__":
    main()
