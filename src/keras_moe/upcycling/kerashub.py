"""Sparse upcycling of KerasHub's dense language models into their MoE models.

`upcycle(backbone, n_experts)` turns a dense KerasHub backbone into the
KerasHub mixture-of-experts backbone of the same family: the embeddings,
attention and norms are copied, and every feed-forward block becomes
`n_experts` copies of itself behind a new router (Komatsuzaki et al., 2022).
The router's top-k weights are renormalised to sum to one, so the upcycled
model computes what the dense one computed, and training continues from the
dense model's quality. `keras_moe.kerashub.upcycle_causal_lm` does the same
for a `CausalLM` and its preprocessor.

| dense backbone | MoE backbone | exact at initialisation |
| --- | --- | --- |
| `MistralBackbone` | `MixtralBackbone` | yes (not with a `head_dim` other than `hidden_dim // num_query_heads`: Mixtral has none) |
| `LlamaBackbone`, `Llama3Backbone` | `MixtralBackbone` (`sliding_window=None`, `rope_scaling_factor=1`) | yes (not with Llama 3.1's RoPE frequency scaling: Mixtral has none) |
| `Qwen3Backbone` | `Qwen3MoeBackbone` (`norm_top_k_prob=True`) | yes (see `qk_norm_epsilon`) |

Any other class is refused with an error that names it. The result is an
ordinary KerasHub model: it saves, reloads (`save_to_preset`/`from_preset`,
`.keras` files) and generates as one.
"""

import keras
import keras_hub
import numpy as np

from keras_moe import utils
from keras_moe.upcycling import _kerashub_targets
from keras_moe.upcycling.feed_forward import expert_copies

__all__ = ["upcycle"]

QK_NORM_EPSILON = ("rescale", "target")


class _Copier:
    """Assigns the target's variables from NumPy values, once each, checking shapes.

    At the end, every variable of the target must have been assigned: a
    KerasHub release that adds a weight makes upcycling fail loudly instead
    of leaving the weight at its random initialisation.
    """

    def __init__(self, target):
        self.target = target
        self.done = set()

    def assign(self, variable, value):
        value = np.asarray(value)
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"Cannot upcycle into `{variable.path}`: expected shape "
                f"{tuple(variable.shape)}, got {value.shape}. KerasHub's layers may "
                "have changed; please report this."
            )
        # `assign` casts to the variable's dtype.
        variable.assign(value)
        self.done.add(id(variable))

    def copy_layer(self, target_layer, source_layer):
        """Copies a sublayer's weights by their paths relative to the sublayer."""

        def relative(layer):
            prefix = layer.path + "/"
            return {v.path.removeprefix(prefix): v for v in layer.weights}

        targets, sources = relative(target_layer), relative(source_layer)
        if set(targets) != set(sources):
            raise ValueError(
                f"Cannot upcycle `{source_layer.path}` into `{target_layer.path}`: "
                f"their weights differ ({sorted(sources)} against {sorted(targets)}). "
                "KerasHub's layers may have changed; please report this."
            )
        for key, variable in targets.items():
            self.assign(variable, _numpy(sources[key]))

    def check_complete(self):
        missing = [v.path for v in self.target.weights if id(v) not in self.done]
        if missing:
            raise ValueError(
                f"Upcycling left weights of the target unset: {missing}. KerasHub's "
                "layers may have changed; please report this."
            )


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


# A dense KerasHub decoder's gated feed-forward block: gate, up, down.
_FFN_KERNELS = (
    "_feedforward_gate_dense",
    "_feedforward_intermediate_dense",
    "_feedforward_output_dense",
)


def _copy_experts(copier, bank, source, expert_noise, rng):
    """Fills an expert bank with copies of a dense decoder's feed-forward block."""
    n_experts = bank.num_experts
    gate, up, down = (
        expert_copies(
            _numpy(getattr(source, name).kernel), n_experts, expert_noise, rng
        )
        for name in _FFN_KERNELS
    )
    copier.assign(bank._expert_feedforward_output_dense, down)
    if hasattr(bank, "_expert_feedforward_intermediate_dense"):
        copier.assign(bank._expert_feedforward_gate_dense, gate)
        copier.assign(bank._expert_feedforward_intermediate_dense, up)
    else:
        # Qwen3-MoE fuses the two: `[gate | up]` on the last axis.
        copier.assign(
            bank._expert_feedforward_gate_dense, np.concatenate([gate, up], axis=-1)
        )


def _check_not_quantized(backbone):
    for layer in backbone._flatten_layers(include_self=True):
        mode = getattr(layer.dtype_policy, "quantization_mode", None)
        if mode is not None:
            raise ValueError(
                "`backbone` must have float weights: a quantized model cannot be "
                f"upcycled (quantize the upcycled one). Received: layer "
                f"{layer.path!r} with quantization_mode={mode!r}"
            )


def upcycle(
    backbone,
    n_experts,
    top_k=2,
    moe_layers="all",
    router_initializer=None,
    expert_noise=0.0,
    load_balance_weight=None,
    qk_norm_epsilon="rescale",
    seed=None,
):
    """The KerasHub MoE backbone upcycled from a dense KerasHub backbone.

    Every decoder layer's attention and norms, the token embedding (and the
    output projection) and the final norm are copied; every chosen layer's
    gated feed-forward block `down(silu(x . gate) * (x . up))` becomes
    `n_experts` experts that copy its kernels, behind a new router with
    renormalised top-k weights. Since `sum_j w_j = 1` and the experts are
    equal, `sum_j w_j * ffn(x) = ffn(x)`: at initialisation the upcycled
    backbone's outputs equal the dense one's (to float rounding, about
    1e-6 relative in float32), whatever the router. Pairs:

    - `MistralBackbone` -> `MixtralBackbone` (exact; refused with a `head_dim`
      other than `hidden_dim // num_query_heads`, which Mixtral cannot express).
    - `LlamaBackbone` / `Llama3Backbone` -> `MixtralBackbone` with
      `sliding_window=None` (exact; refused with Llama 3.1's RoPE frequency
      scaling). Tied embeddings are untied into Mixtral's output projection.
      Mixtral gets `rope_scaling_factor=1`: KerasHub's Llama ignores its own.
    - `Qwen3Backbone` -> `Qwen3MoeBackbone` with `norm_top_k_prob=True`
      (exact with `qk_norm_epsilon="rescale"`).

    Args:
        backbone: The dense KerasHub backbone (left unchanged).
        n_experts: Positive integer, experts per MoE layer.
        top_k: Integer from 1 to `n_experts`, experts per token.
        moe_layers: Which decoder layers become MoE: `"all"`,
            `"every_other"` (layers 1, 3, 5, ..., Qwen's
            `decoder_sparse_step=2`; an error with one decoder layer) or a
            sequence of layer indices; the
            others keep their dense block. Only `Qwen3MoeBackbone` can mix
            dense and MoE layers: for Mixtral anything but `"all"` is an
            error.
        router_initializer: Initializer of the routers' kernels `(d, E)`;
            `None` keeps the target class's own (KerasHub's
            `RandomNormal(stddev=0.02)`). The outputs at initialisation do
            not depend on it; the routing does (a constant router such as
            `"zeros"` sends every token to the same `top_k` experts, and as
            the experts are equal the router gets no gradient until they
            differ).
        expert_noise: Non-negative float: each expert's kernels get Gaussian
            noise of standard deviation `expert_noise * std(kernel)` (see
            `keras_moe.upcycling.expert_copies`). `0` keeps the model exact;
            anything else breaks the experts' symmetry and the exactness.
        load_balance_weight: The target's load-balancing loss coefficient
            (Mixtral's `router_aux_loss_coef`, Qwen3-MoE's
            `router_aux_loss_coefficient`); `None` keeps the class default.
        qk_norm_epsilon: Qwen3 only. KerasHub's `Qwen3Attention` normalises
            queries and keys with epsilon 1e-5, `Qwen3MoeAttention` with
            1e-6 (not configurable). `"rescale"` (the default) multiplies
            the query and key kernels by `sqrt(1e-6 / 1e-5)`, which makes
            the MoE model's normalised queries and keys exactly the dense
            model's (RMS normalisation is scale-invariant up to epsilon);
            `"target"` copies them unchanged and lets the target's epsilon
            apply (a relative difference of about `1e-5 / mean(q^2)` in the
            normalised queries and keys).
        seed: Optional integer seed of `expert_noise` and of
            `router_initializer` (the same on every backend for the noise).
            Every layer's router draws its own kernel: with a seed, layer
            `i`'s from `seed + i`; without, from a seed of its own.

    Returns:
        A new `MixtralBackbone` or `Qwen3MoeBackbone` with the dense
        backbone's dtype policy.

    Example:

    >>> import keras
    >>> import keras_hub
    >>> from keras_moe.kerashub import upcycle
    >>> dense = keras_hub.models.MistralBackbone(
    ...     vocabulary_size=64, num_layers=2, num_query_heads=2,
    ...     num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
    >>> moe = upcycle(dense, n_experts=4, top_k=2)
    >>> type(moe).__name__, moe.num_experts
    ('MixtralBackbone', 4)
    >>> x = {"token_ids": np.arange(10)[None], "padding_mask": np.ones((1, 10))}
    >>> out, ref = keras.ops.convert_to_numpy(moe(x)), keras.ops.convert_to_numpy(dense(x))
    >>> bool(np.allclose(out, ref, rtol=1e-5, atol=1e-5))
    True

    References:
        - Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts
          from Dense Checkpoints", ICLR 2023 (arXiv:2212.05055, 2022).
    """
    target_cls, _, _ = _kerashub_targets.family_of(backbone)
    n_experts = utils.check_positive_int("n_experts", n_experts)
    top_k = utils.check_top_k(top_k, n_experts)
    moe_layers = _kerashub_targets.check_moe_layers(moe_layers, backbone.num_layers)
    expert_noise = utils.check_non_negative_float("expert_noise", expert_noise)
    if load_balance_weight is not None:
        load_balance_weight = utils.check_non_negative_float(
            "load_balance_weight", load_balance_weight
        )
    qk_norm_epsilon = utils.check_choice(
        "qk_norm_epsilon", qk_norm_epsilon, QK_NORM_EPSILON
    )
    if seed is not None:
        seed = utils.check_positive_int("seed", seed, minimum=0)
    if router_initializer is not None:
        router_initializer = utils.get_initializer(
            "router_initializer", router_initializer
        )
    _check_not_quantized(backbone)

    if target_cls is keras_hub.models.MixtralBackbone:
        config = _kerashub_targets.mixtral_config(
            backbone, n_experts, top_k, moe_layers, load_balance_weight
        )
    else:
        config = _kerashub_targets.qwen3_moe_config(
            backbone, n_experts, top_k, moe_layers, load_balance_weight
        )
    target = target_cls(**config, dtype=backbone.dtype_policy)
    copier = _Copier(target)
    _copy_embeddings(copier, backbone, target)
    rng = np.random.default_rng(seed)
    layers = zip(backbone.transformer_layers, target.transformer_layers)
    for index, (source, decoder) in enumerate(layers):
        copier.copy_layer(decoder._self_attention_layer, source._self_attention_layer)
        if qk_norm_epsilon == "rescale":
            _rescale_qk_norm(copier, decoder, source)
        copier.copy_layer(
            decoder._self_attention_layernorm, source._self_attention_layernorm
        )
        copier.copy_layer(decoder._feedforward_layernorm, source._feedforward_layernorm)
        block = getattr(decoder, "_sparse_moe_block", None)
        if block is None:
            block = decoder.mlp
        if hasattr(block, "expert_bank"):
            router = block._sparse_feedforward_gate_dense.kernel
            if router_initializer is None:
                copier.done.add(id(router))
            else:
                value = _initial_value(router_initializer, router, seed, index)
                copier.assign(router, value)
            _copy_experts(copier, block.expert_bank, source, expert_noise, rng)
        else:
            # A layer that Qwen3-MoE keeps dense (`mlp_only_layers`).
            for name in _FFN_KERNELS:
                copier.assign(
                    getattr(block, name).kernel, _numpy(getattr(source, name).kernel)
                )
    copier.check_complete()
    return target


def _copy_embeddings(copier, backbone, target):
    """The token embedding, the output projection (untied when the target
    has its own) and the final norm."""
    source_embedding = backbone.token_embedding
    target_embedding = target.token_embedding
    copier.assign(target_embedding.embeddings, _numpy(source_embedding.embeddings))
    if not target_embedding.tie_weights:
        if source_embedding.tie_weights:
            reverse = _numpy(source_embedding.embeddings).T
        else:
            reverse = _numpy(source_embedding.reverse_embeddings)
        copier.assign(target_embedding.reverse_embeddings, reverse)
    copier.copy_layer(target.layer_norm, backbone.layer_norm)


def _initial_value(initializer, variable, seed, index):
    """Decoder layer `index`'s router kernel, drawn by its own copy of
    `initializer`: seeded `seed + index`, else `utils.initializer_for`'s."""
    config = initializer.get_config()
    if seed is not None and "seed" in config:
        initializer = type(initializer).from_config({**config, "seed": seed + index})
    else:
        initializer = utils.initializer_for(initializer, f"router_{index}")
    value = initializer(tuple(variable.shape), dtype=variable.dtype)
    return keras.ops.convert_to_numpy(value)


def _rescale_qk_norm(copier, decoder, source):
    """Matches a target's query/key RMS-norm epsilon by scaling their kernels.

    `rms(c * q; e_t) = q / sqrt(mean(q^2) + e_t / c^2)`: with
    `c = sqrt(e_t / e_s)` the target normalises as the source did.
    """
    attention, source_attention = (
        decoder._self_attention_layer,
        (source._self_attention_layer),
    )
    pairs = [
        ("_query_dense", "_query_dense_layer_norm"),
        ("_key_dense", "_key_dense_layer_norm"),
    ]
    for dense, norm in pairs:
        if not hasattr(attention, norm):
            return
        target_eps = getattr(attention, norm).epsilon
        source_eps = getattr(source_attention, norm).epsilon
        if target_eps == source_eps:
            continue
        scale = np.sqrt(target_eps / source_eps)
        kernel = getattr(attention, dense).kernel
        copier.assign(kernel, _numpy(getattr(source_attention, dense).kernel) * scale)
