"""Tiny KerasHub MoE models of every family `sparsify` supports, for tests.

One decoder layer, `d=16`, four experts, top-2 (Qwen3-MoE top-3), random
weights (KerasHub initialises some to zero or one, which would hide a wrong
weight: Gemma 4's experts are zeros), and inputs with padding.
"""

import keras
import keras_hub
import numpy as np

FAMILIES = ["mixtral", "qwen_moe", "qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4"]
VOCAB = 40
D = 16


def backbone(family, dtype=None):
    models = keras_hub.models
    common = {
        "vocabulary_size": VOCAB,
        "num_layers": 1,
        "num_query_heads": 2,
        "num_key_value_heads": 1,
        "hidden_dim": D,
        "dtype": dtype,
    }
    if family == "mixtral":
        return models.MixtralBackbone(
            intermediate_dim=12,
            num_experts=4,
            top_k=2,
            sliding_window=4,
            router_aux_loss_coef=0.1,
            **common,
        )
    if family == "qwen_moe":
        return models.QwenMoeBackbone(
            intermediate_dim=12,
            moe_intermediate_dim=6,
            shared_expert_intermediate_dim=10,
            num_experts=4,
            top_k=2,
            norm_top_k_prob=False,
            router_aux_loss_coefficient=0.1,
            **common,
        )
    if family == "qwen3_moe":
        return models.Qwen3MoeBackbone(
            intermediate_dim=12,
            moe_intermediate_dim=6,
            num_experts=4,
            top_k=3,
            norm_top_k_prob=True,
            head_dim=8,
            router_aux_loss_coefficient=0.1,
            **common,
        )
    if family == "qwen3_5_moe":
        # Full attention only: the linear-attention layers (GatedDeltaNet)
        # have nothing to do with the MoE blocks and are slow in eager mode.
        return models.Qwen3_5MoeBackbone(
            head_dim=8,
            moe_intermediate_dim=6,
            shared_expert_intermediate_size=10,
            num_experts=4,
            top_k=2,
            layer_types=["full_attention", "full_attention"],
            router_aux_loss_coefficient=0.1,
            **common,
        )
    if family == "gpt_oss":
        return models.GptOssBackbone(
            intermediate_dim=6, num_experts=4, top_k=2, head_dim=8, **common
        )
    if family == "gemma4":
        return models.Gemma4Backbone(
            image_size=None,
            intermediate_dim=12,
            head_dim=8,
            sliding_window_size=4,
            enable_moe_block=True,
            num_experts=4,
            expert_intermediate_dim=6,
            num_experts_per_token=2,
            **common,
        )
    raise ValueError(f"unknown family {family!r}")


def causal_lm(family, dtype=None):
    classes = {
        "mixtral": keras_hub.models.MixtralCausalLM,
        "qwen_moe": keras_hub.models.QwenMoeCausalLM,
        "qwen3_moe": keras_hub.models.Qwen3MoeCausalLM,
        "qwen3_5_moe": keras_hub.models.Qwen3_5MoeCausalLM,
        "gpt_oss": keras_hub.models.GptOssCausalLM,
        "gemma4": keras_hub.models.Gemma4CausalLM,
    }
    return classes[family](backbone=backbone(family, dtype), preprocessor=None)


def randomize(model, seed=0, scale=0.3):
    """Random weights: matrices around zero, vectors (norms, biases, scales)
    around their initial values."""
    rng = np.random.default_rng(seed)
    for variable in model.trainable_weights:
        noise = rng.normal(size=variable.shape) * scale
        base = keras.ops.convert_to_numpy(variable) if len(variable.shape) < 2 else 0.0
        variable.assign((base + noise).astype(variable.dtype))


def inputs(family, batch=2, length=6, seed=1):
    """Token ids with the second sequence padded after 4 tokens."""
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, VOCAB, size=(batch, length)).astype("int32")
    padding_mask = np.ones((batch, length), "int32")
    padding_mask[1:, 4:] = 0
    token_ids[padding_mask == 0] = 0
    x = {"token_ids": token_ids, "padding_mask": padding_mask}
    if family == "gemma4":
        x["position_ids"] = np.tile(np.arange(length, dtype="int32"), (batch, 1))
    return x
