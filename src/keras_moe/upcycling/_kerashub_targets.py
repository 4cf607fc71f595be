"""The KerasHub MoE backbone that `upcycle` makes of each dense one: which
class, and its config from the dense backbone's (KerasHub's public
backbone attributes)."""

import keras_hub

from keras_moe import utils

MOE_LAYERS = ("all", "every_other")


def families():
    """dense backbone class -> (MoE backbone class, dense CausalLM, MoE CausalLM)."""
    models = keras_hub.models
    mixtral = (models.MixtralBackbone, models.MixtralCausalLM)
    qwen3_moe = (models.Qwen3MoeBackbone, models.Qwen3MoeCausalLM)
    return {
        models.MistralBackbone: (*mixtral, models.MistralCausalLM),
        models.LlamaBackbone: (*mixtral, models.LlamaCausalLM),
        models.Llama3Backbone: (*mixtral, models.Llama3CausalLM),
        models.Qwen3Backbone: (*qwen3_moe, models.Qwen3CausalLM),
    }


def _supported():
    return ", ".join(f"{c.__name__} -> {t[0].__name__}" for c, t in families().items())


def family_of(backbone):
    if isinstance(backbone, keras_hub.models.CausalLM):
        raise TypeError(
            "`backbone` must be a KerasHub backbone; for a `CausalLM` use "
            "`keras_moe.kerashub.upcycle_causal_lm`. Received: backbone of type "
            f"{type(backbone).__name__}"
        )
    known = families()
    cls = type(backbone)
    if cls not in known:
        moe = {target for target, _, _ in known.values()}
        already = " (already a mixture of experts)" if cls in moe else ""
        raise ValueError(
            "`backbone` must be a dense KerasHub backbone that has an MoE "
            f"counterpart with the same attention: {_supported()}. Received: "
            f"backbone of type {cls.__name__}{already}"
        )
    return known[cls]


def check_moe_layers(moe_layers, num_layers):
    if isinstance(moe_layers, str):
        moe_layers = utils.check_choice("moe_layers", moe_layers, MOE_LAYERS)
        if moe_layers == "every_other" and num_layers < 2:
            raise ValueError(
                "`moe_layers` must select at least one decoder layer; "
                "'every_other' selects layers 1, 3, 5, ... Received: "
                f"moe_layers='every_other', num_layers={num_layers}"
            )
        return moe_layers
    if not isinstance(moe_layers, (list, tuple, range)) or not all(
        utils._is_int(i) for i in moe_layers
    ):
        raise TypeError(
            f"`moe_layers` must be one of {list(MOE_LAYERS)} or a sequence of "
            f"decoder layer indices. Received: moe_layers={moe_layers!r}"
        )
    layers = sorted({int(i) for i in moe_layers})
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(
            "`moe_layers` must hold at least one decoder layer index from 0 to "
            f"{num_layers - 1}. Received: moe_layers={list(moe_layers)!r}"
        )
    return layers


def mixtral_config(backbone, n_experts, top_k, moe_layers, load_balance_weight):
    name = type(backbone).__name__
    if moe_layers != "all" and moe_layers != list(range(backbone.num_layers)):
        raise ValueError(
            f"`moe_layers` must be 'all' when upcycling a `{name}`: its MoE "
            "counterpart `MixtralBackbone` makes every decoder layer a mixture of "
            f"experts and cannot mix dense and MoE layers. Received: "
            f"moe_layers={moe_layers!r}"
        )
    config = {
        "vocabulary_size": backbone.vocabulary_size,
        "num_layers": backbone.num_layers,
        "num_query_heads": backbone.num_query_heads,
        "hidden_dim": backbone.hidden_dim,
        "intermediate_dim": backbone.intermediate_dim,
        "num_key_value_heads": backbone.num_key_value_heads,
        "num_experts": n_experts,
        "top_k": top_k,
        "rope_max_wavelength": backbone.rope_max_wavelength,
        "layer_norm_epsilon": backbone.layer_norm_epsilon,
        "dropout": backbone.dropout,
    }
    if load_balance_weight is not None:
        config["router_aux_loss_coef"] = load_balance_weight
    if isinstance(backbone, keras_hub.models.MistralBackbone):
        head_dim = backbone.head_dim
        if head_dim is not None and head_dim != (
            backbone.hidden_dim // backbone.num_query_heads
        ):
            raise ValueError(
                "`backbone` must have `head_dim` None or `hidden_dim // "
                "num_query_heads`: `MixtralBackbone` has no `head_dim` argument. "
                f"Received: {name} with head_dim={head_dim}, "
                f"hidden_dim={backbone.hidden_dim}, "
                f"num_query_heads={backbone.num_query_heads}"
            )
        config["rope_scaling_factor"] = backbone.rope_scaling_factor
        config["sliding_window"] = backbone.sliding_window
    else:
        scaling = {
            key: getattr(backbone, key)
            for key in (
                "rope_frequency_adjustment_factor",
                "rope_low_freq_factor",
                "rope_high_freq_factor",
                "rope_pretraining_sequence_length",
            )
        }
        if any(value is not None for value in scaling.values()):
            raise ValueError(
                "`backbone` must not use Llama 3.1's RoPE frequency scaling: "
                "`MixtralBackbone`'s rotary embedding has none. Received: "
                f"{name} with "
                + ", ".join(f"{key}={value}" for key, value in scaling.items())
            )
        # KerasHub's `LlamaRotaryEmbedding` ignores its position scaling factor
        # (Mixtral's divides its frequencies by it): the dense model uses 1.
        config["rope_scaling_factor"] = 1.0
        config["sliding_window"] = None
    return config


def qwen3_moe_config(backbone, n_experts, top_k, moe_layers, load_balance_weight):
    config = {
        "vocabulary_size": backbone.vocabulary_size,
        "num_layers": backbone.num_layers,
        "num_query_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "hidden_dim": backbone.hidden_dim,
        "intermediate_dim": backbone.intermediate_dim,
        "moe_intermediate_dim": backbone.intermediate_dim,
        "num_experts": n_experts,
        "head_dim": backbone.head_dim,
        "top_k": top_k,
        # Renormalised top-k weights: what makes the copies exact.
        "norm_top_k_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_max_wavelength": backbone.rope_max_wavelength,
        "rope_scaling_factor": backbone.rope_scaling_factor,
        "layer_norm_epsilon": backbone.layer_norm_epsilon,
        "dropout": backbone.dropout,
        "tie_word_embeddings": backbone.tie_word_embeddings,
        "sliding_window_size": backbone.sliding_window_size,
    }
    if moe_layers == "every_other":
        # Qwen's own convention: layers 1, 3, 5, ... are sparse.
        config["decoder_sparse_step"] = 2
    elif moe_layers != "all":
        config["mlp_only_layers"] = [
            i for i in range(backbone.num_layers) if i not in moe_layers
        ]
    if load_balance_weight is not None:
        config["router_aux_loss_coefficient"] = load_balance_weight
    return config
