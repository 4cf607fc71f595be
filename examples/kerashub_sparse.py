"""A KerasHub MoE language model, sparsified: the same generations, faster steps.

Run: `python examples/kerashub_sparse.py` (any backend: set `KERAS_BACKEND`).
Options: `--family` (`mixtral`, `qwen_moe`, `qwen3_moe`, `qwen3_5_moe`,
`gpt_oss`, `gemma4`), `--experts E` (default 8), `--preset NAME` (a KerasHub
preset available locally, instead of a tiny random model), `--steps S`.

It builds a small KerasHub causal LM of the family (2 layers, d=64, random
weights) and a second one with the same weights, sparsifies the second with
`keras_moe.kerashub.sparsify`, and shows that both generate the same tokens
greedily. Then it times training steps of both, side by side in this process
(`train_on_batch` compiled as Keras does by default: XLA on JAX and
TensorFlow, eager on PyTorch; the first call excluded), and prints the
speed-up: KerasHub computes every expert on every token, the sparsified model
only each token's top-k. Exit status 0 when the generations are identical.
"""

import argparse
import sys
import time

import keras
import keras_hub
import numpy as np

from keras_moe.kerashub import sparsify

FAMILIES = {
    "mixtral": ("MixtralBackbone", "MixtralCausalLM"),
    "qwen_moe": ("QwenMoeBackbone", "QwenMoeCausalLM"),
    "qwen3_moe": ("Qwen3MoeBackbone", "Qwen3MoeCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeBackbone", "Qwen3_5MoeCausalLM"),
    "gpt_oss": ("GptOssBackbone", "GptOssCausalLM"),
    "gemma4": ("Gemma4Backbone", "Gemma4CausalLM"),
}
VOCAB, WIDTH, HIDDEN = 256, 64, 128


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    return parser.parse_args(argv)


def backbone_kwargs(family, experts):
    common = {
        "vocabulary_size": VOCAB,
        "num_layers": 2,
        "num_query_heads": 4,
        "num_key_value_heads": 2,
        "hidden_dim": WIDTH,
    }
    if family == "mixtral":
        return {**common, "intermediate_dim": HIDDEN, "num_experts": experts}
    if family == "qwen_moe":
        return {
            **common,
            "intermediate_dim": HIDDEN,
            "moe_intermediate_dim": HIDDEN,
            "shared_expert_intermediate_dim": HIDDEN,
            "num_experts": experts,
        }
    if family == "qwen3_moe":
        return {
            **common,
            "intermediate_dim": HIDDEN,
            "moe_intermediate_dim": HIDDEN,
            "num_experts": experts,
            "head_dim": 16,
        }
    if family == "qwen3_5_moe":
        return {
            **common,
            "head_dim": 16,
            "moe_intermediate_dim": HIDDEN,
            "shared_expert_intermediate_size": HIDDEN,
            "num_experts": experts,
            "layer_types": ["full_attention", "full_attention"],
        }
    if family == "gpt_oss":
        return {
            **common,
            "intermediate_dim": HIDDEN,
            "num_experts": experts,
            "head_dim": 16,
        }
    return {
        **common,
        "image_size": None,
        "intermediate_dim": HIDDEN,
        "head_dim": 16,
        "enable_moe_block": True,
        "num_experts": experts,
        "expert_intermediate_dim": HIDDEN,
        "num_experts_per_token": 2,
    }


def causal_lm(args):
    backbone_name, task_name = FAMILIES[args.family]
    task = getattr(keras_hub.models, task_name)
    if args.preset:
        return task.from_preset(args.preset, preprocessor=None)
    backbone = getattr(keras_hub.models, backbone_name)(
        **backbone_kwargs(args.family, args.experts)
    )
    model = task(backbone=backbone, preprocessor=None)
    # KerasHub initialises some expert weights to zeros; random ones show
    # that the sparse model computes with every one of them.
    rng = np.random.default_rng(0)
    for variable in model.trainable_weights:
        if len(variable.shape) >= 2:
            variable.assign(rng.normal(size=variable.shape) * 0.1)
    return model


def batch(args, vocabulary_size):
    rng = np.random.default_rng(1)
    shape = (args.batch, args.length)
    x = {
        "token_ids": rng.integers(1, vocabulary_size, shape).astype("int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    if args.family == "gemma4":
        x["position_ids"] = np.tile(
            np.arange(args.length, dtype="int32"), (shape[0], 1)
        )
    return x, rng.integers(0, vocabulary_size, shape)


def prompt(x, length):
    """The batch's first `length` tokens, the rest left to generate."""
    p = {key: value.copy() for key, value in x.items() if key != "position_ids"}
    p["padding_mask"][:, length:] = 0
    p["token_ids"][:, length:] = 0
    return p


def step_seconds(model, x, y, steps):
    """Median seconds of one `train_on_batch` after the compiling call."""
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None):
    args = parse_args(argv)
    dense = causal_lm(args)
    sparse = causal_lm(args)
    sparse.set_weights(dense.get_weights())
    sparsify(sparse)
    for model in (dense, sparse):
        model.compile(
            optimizer=keras.optimizers.SGD(1e-3), sampler="greedy", jit_compile="auto"
        )
    vocabulary_size = dense.backbone.vocabulary_size
    x, y = batch(args, vocabulary_size)
    p = prompt(x, 8)
    dense_tokens = keras.ops.convert_to_numpy(
        dense.generate(p, stop_token_ids=None)["token_ids"]
    )
    sparse_tokens = keras.ops.convert_to_numpy(
        sparse.generate(p, stop_token_ids=None)["token_ids"]
    )
    same = bool(np.array_equal(dense_tokens, sparse_tokens))
    print(f"backend {keras.backend.backend()}, {args.family}, {args.experts} experts")
    print(f"greedy generations identical: {same}")
    print("first generated row:", sparse_tokens[0, :16].tolist())
    dense_s = step_seconds(dense, x, y, args.steps)
    sparse_s = step_seconds(sparse, x, y, args.steps)
    print(
        f"train step (median of {args.steps}): KerasHub {dense_s * 1e3:.1f} ms, "
        f"sparsified {sparse_s * 1e3:.1f} ms, speed-up {dense_s / sparse_s:.2f}x"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
