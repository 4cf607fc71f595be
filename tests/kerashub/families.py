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


# The arguments every family's backbone here shares.
SHARED = {
    "vocabulary_size": VOCAB,
    "num_layers": 1,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": D,
}

# Each family's backbone class and its own arguments beyond the shared ones
# in `backbone`. Qwen3.5-MoE runs full attention only: the linear-attention
# layers (GatedDeltaNet) have nothing to do with the MoE blocks and are slow
# in eager mode.
_AUX = {"router_aux_loss_coefficient": 0.1}
_BACKBONES = {
    "mixtral": ("Mixtral", dict(intermediate_dim=12, top_k=2, sliding_window=4)),
    "qwen_moe": ("QwenMoe", dict(intermediate_dim=12, top_k=2, **_AUX)),
    "qwen3_moe": ("Qwen3Moe", dict(intermediate_dim=12, top_k=3, head_dim=8, **_AUX)),
    "qwen3_5_moe": ("Qwen3_5Moe", dict(head_dim=8, top_k=2, **_AUX)),
    "gpt_oss": ("GptOss", dict(intermediate_dim=6, top_k=2, head_dim=8)),
    "gemma4": ("Gemma4", dict(intermediate_dim=12, head_dim=8, image_size=None)),
}


def backbone(family, dtype=None):
    if family not in _BACKBONES:
        raise ValueError(f"unknown family {family!r}")
    name, options = _BACKBONES[family]
    options = dict(options)
    if family == "mixtral":
        options["router_aux_loss_coef"] = 0.1
    if family.startswith("qwen"):
        options["moe_intermediate_dim"] = 6
    if family == "qwen_moe":
        options.update(shared_expert_intermediate_dim=10, norm_top_k_prob=False)
    if family == "qwen3_moe":
        options["norm_top_k_prob"] = True
    if family == "qwen3_5_moe":
        options["shared_expert_intermediate_size"] = 10
        options["layer_types"] = ["full_attention", "full_attention"]
    if family == "gemma4":
        options.update(sliding_window_size=4, enable_moe_block=True)
        options.update(expert_intermediate_dim=6, num_experts_per_token=2)
    model = getattr(keras_hub.models, f"{name}Backbone")
    return model(**SHARED, num_experts=4, dtype=dtype, **options)


def causal_lm(family, dtype=None):
    name = _BACKBONES[family][0]
    model = getattr(keras_hub.models, f"{name}CausalLM")
    return model(backbone=backbone(family, dtype), preprocessor=None)


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
