"""Sparse upcycling of a KerasHub `CausalLM` together with its preprocessor.

`upcycle_causal_lm(causal_lm, n_experts)` runs `keras_moe.kerashub.upcycle`
on the task's backbone and rebuilds its preprocessor as the MoE family's
class, so the result is an ordinary `MixtralCausalLM` or `Qwen3MoeCausalLM`.
"""

import tempfile

import keras_hub

from keras_moe.upcycling._kerashub_targets import families
from keras_moe.upcycling.kerashub import upcycle

__all__ = ["upcycle_causal_lm"]


def _convert_tokenizer(tokenizer, target_cls):
    """The tokenizer as `target_cls`, from its config and its assets."""
    config = tokenizer.get_config()
    config.pop("name", None)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_assets(folder)
        converted = target_cls.from_config(config)
        converted.load_assets(folder)
    return converted


def upcycle_causal_lm(
    causal_lm,
    n_experts,
    top_k=2,
    moe_layers="all",
    router_initializer=None,
    expert_noise=0.0,
    load_balance_weight=None,
    qk_norm_epsilon="rescale",
    seed=None,
):
    """The KerasHub MoE `CausalLM` upcycled from a dense one, preprocessor included.

    `upcycle` on `causal_lm.backbone` (the arguments are `upcycle`'s), and
    the preprocessor rebuilt as the MoE family's class with the same
    vocabulary, sequence length and start/end token settings, so that
    `generate("text")`, `save_to_preset` and `from_preset` work as for any
    `MixtralCausalLM` or `Qwen3MoeCausalLM`. Without a preprocessor the
    result has none either.

    Args:
        causal_lm: A `MistralCausalLM`, `LlamaCausalLM`, `Llama3CausalLM` or
            `Qwen3CausalLM` (left unchanged).
        n_experts: Number of experts per MoE block, as in `upcycle`.
        top_k: Experts per token, as in `upcycle`.
        moe_layers: Which decoder layers become MoE, as in `upcycle`.
        router_initializer: The routers' initial kernel, as in `upcycle`.
        expert_noise: Noise added to the expert copies, as in `upcycle`.
        load_balance_weight: The auxiliary loss's weight, as in `upcycle`.
        qk_norm_epsilon: Qwen3's query/key norm epsilon, as in `upcycle`.
        seed: Seed of the router initialisation and noise, as in `upcycle`.

    Returns:
        A new `MixtralCausalLM` or `Qwen3MoeCausalLM`. A Llama 3 tokenizer
        (byte-pair) has no Mixtral counterpart (SentencePiece): upcycling a
        `Llama3CausalLM` with a preprocessor is an error.

    Example:

    >>> import keras_hub
    >>> from keras_moe.kerashub import upcycle_causal_lm
    >>> backbone = keras_hub.models.MistralBackbone(
    ...     vocabulary_size=64, num_layers=1, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
    >>> dense = keras_hub.models.MistralCausalLM(backbone, preprocessor=None)
    >>> moe = upcycle_causal_lm(dense, n_experts=4)
    >>> type(moe).__name__
    'MixtralCausalLM'
    """
    if not isinstance(causal_lm, keras_hub.models.CausalLM):
        raise TypeError(
            "`causal_lm` must be a KerasHub `CausalLM`; for a backbone use "
            "`keras_moe.kerashub.upcycle`. Received: causal_lm of type "
            f"{type(causal_lm).__name__}"
        )
    tasks = {
        task: (target, target_task) for target, target_task, task in families().values()
    }
    if type(causal_lm) not in tasks:
        names = ", ".join(task.__name__ for task in tasks)
        raise ValueError(
            f"`causal_lm` must be one of {names}. Received: causal_lm of type "
            f"{type(causal_lm).__name__}"
        )
    _, target_task = tasks[type(causal_lm)]
    backbone = upcycle(
        causal_lm.backbone,
        n_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        router_initializer=router_initializer,
        expert_noise=expert_noise,
        load_balance_weight=load_balance_weight,
        qk_norm_epsilon=qk_norm_epsilon,
        seed=seed,
    )
    preprocessor = causal_lm.preprocessor
    if preprocessor is not None:
        preprocessor_cls = target_task.preprocessor_cls
        tokenizer_cls = preprocessor_cls.tokenizer_cls
        source_tokenizer = preprocessor.tokenizer
        kinds = [
            base
            for base in (
                keras_hub.tokenizers.SentencePieceTokenizer,
                keras_hub.tokenizers.BytePairTokenizer,
            )
            if issubclass(tokenizer_cls, base)
        ]
        if not kinds or not isinstance(source_tokenizer, kinds[0]):
            raise ValueError(
                f"`causal_lm`'s tokenizer must convert to `{tokenizer_cls.__name__}` "
                f"(a {kinds[0].__name__ if kinds else 'different kind'}). Received: "
                f"a {type(source_tokenizer).__name__}; upcycle the backbone with "
                "`upcycle` and keep your own preprocessing"
            )
        config = preprocessor.get_config()
        preprocessor = preprocessor_cls(
            tokenizer=_convert_tokenizer(source_tokenizer, tokenizer_cls),
            sequence_length=config["sequence_length"],
            add_start_token=config["add_start_token"],
            add_end_token=config["add_end_token"],
        )
    return target_task(backbone=backbone, preprocessor=preprocessor)
