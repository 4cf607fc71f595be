"""Whole KerasHub MoE backbones as KerasHub runs them against the same
backbones after `keras_moe.kerashub.sparsify`: one case per family.

KerasHub's MoE blocks compute every expert on every token and weight the
results by the router's sparse weights; `sparsify` runs each token's top-k
experts only, on the same weights. Each case times both, forward and
forward+backward of the whole backbone (embedding, attention, norms, MoE
blocks), side by side in one process, at each size's `"hub"` shape: the same
layers, widths, heads, vocabulary, top-k, expert counts and batch for every
family. Each family's extras are sized in proportion: the Qwen shared expert
and Gemma 4's dense MLP get the expert intermediate width, and so does the
dense `intermediate_dim` that Qwen1.5/2-MoE and Qwen3-MoE require (unused:
every layer is an MoE layer). Qwen3.5-MoE runs full attention only (its
linear-attention layers have nothing to do with the MoE blocks).

`benchmarks.cases` registers these cases (it imports this module, so this
module does not import it).
"""

import keras
import numpy as np

from benchmarks.harness import Variant

FAMILIES = ("mixtral", "qwen_moe", "qwen3_moe", "qwen3_5_moe", "gpt_oss", "gemma4")

# The class each family's backbone is, for titles and notes.
CLASSES = {
    "mixtral": "MixtralBackbone",
    "qwen_moe": "QwenMoeBackbone",
    "qwen3_moe": "Qwen3MoeBackbone",
    "qwen3_5_moe": "Qwen3_5MoeBackbone",
    "gpt_oss": "GptOssBackbone",
    "gemma4": "Gemma4Backbone",
}

# Forward+backward, KerasHub / sparsified, on JAX, at the fewest and the most
# experts. Mixtral's are the issue's: 2.5x at the most experts, and 1.7x at
# the fewest, the figure a hand-made swap measured at 8. The other families
# have none until they are measured.
MIN_SPEEDUPS = {"mixtral": (1.7, 2.5)}


class TokenBackbone(keras.layers.Layer):
    """A KerasHub backbone called on token ids alone (no padding; positions
    `0..n-1` where the backbone takes them, as Gemma 4's does), so that the
    harness can feed it one array."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        embedding = backbone.token_embedding
        if not embedding.tie_weights:
            # The untied LM head is no part of the backbone's output: frozen,
            # as its gradient is zero (JAX) or None (TensorFlow, which the
            # harness cannot time).
            embedding.reverse_embeddings.trainable = False
        # The backbone holds its weights already: no eager call to build it
        # before the harness compiles (seconds per variant at any size).
        self.built = True

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + tuple(self.backbone.output.shape[2:])

    def call(self, token_ids, training=None):
        inputs = {
            "token_ids": token_ids,
            "padding_mask": keras.ops.ones_like(token_ids),
        }
        if "position_ids" in self.backbone.input:
            positions = keras.ops.arange(keras.ops.shape(token_ids)[1], dtype="int32")
            inputs["position_ids"] = keras.ops.broadcast_to(
                positions[None, :], keras.ops.shape(token_ids)
            )
        return self.backbone(inputs, training=training)


def backbone(family, s, n_experts):
    """A KerasHub backbone of `family` at the `"hub"` size `s`."""
    import keras_hub

    if family not in CLASSES:
        raise ValueError(f"`family` must be one of {FAMILIES}. Received: {family!r}")
    d, m, k = s["dim"], s["inter"], s["k"]
    head_dim = d // s["heads"]
    # Each family's own arguments beyond the shared ones below.
    options = {
        "mixtral": {"intermediate_dim": m, "top_k": k},
        "qwen_moe": {"intermediate_dim": m, "moe_intermediate_dim": m, "top_k": k},
        "qwen3_moe": {"intermediate_dim": m, "moe_intermediate_dim": m, "top_k": k},
        "qwen3_5_moe": {"moe_intermediate_dim": m, "top_k": k},
        "gpt_oss": {"intermediate_dim": m, "top_k": k},
        "gemma4": {"intermediate_dim": m, "num_experts_per_token": k},
    }[family]
    if family == "qwen_moe":
        options["shared_expert_intermediate_dim"] = m
    if family == "qwen3_5_moe":
        options["shared_expert_intermediate_size"] = m
        options["layer_types"] = ["full_attention"] * s["layers"]
    if family == "gemma4":
        options.update(
            image_size=None, enable_moe_block=True, expert_intermediate_dim=m
        )
    if family != "mixtral" and family != "qwen_moe":
        options["head_dim"] = head_dim
    return getattr(keras_hub.models, CLASSES[family])(
        vocabulary_size=s["vocabulary"],
        num_layers=s["layers"],
        num_query_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        hidden_dim=d,
        num_experts=n_experts,
        **options,
    )


def _min_speedup(slow, fast, ratio):
    # The dict `benchmarks.cases.target` makes, which this module cannot
    # import (`cases` imports it).
    return {
        "variant": slow,
        "over": fast,
        "mode": "forward_backward",
        "max_ratio": None,
        "min_ratio": ratio,
        "backends": ["jax"],
    }


def family_case(family, size):
    """KerasHub's `family` backbone against the sparsified one, at each of
    the size's expert counts: variants `kerashub_<e>` and `sparsified_<e>`."""
    s = size["hub"]
    b, n, d, m, k = s["batch"], s["seq"], s["dim"], s["inter"], s["k"]
    x = np.random.default_rng(0).integers(0, s["vocabulary"], (b, n)).astype("int32")
    cls = CLASSES[family]
    layers = f"{s['layers']} layer" + ("s" if s["layers"] > 1 else "")

    def build(n_experts, sparse):
        model = backbone(family, s, n_experts)
        if sparse:
            from keras_moe.kerashub import sparsify

            sparsify(model)
        return TokenBackbone(model), x

    variants, targets = [], []
    for e in s["experts"]:
        variants += [
            Variant(
                f"kerashub_{e}",
                lambda e=e: build(e, False),
                note=f"KerasHub {cls}, {e} experts (every expert runs)",
            ),
            Variant(
                f"sparsified_{e}",
                lambda e=e: build(e, True),
                note=f"the same, keras_moe.kerashub.sparsify, {e} experts",
            ),
        ]
        if family in MIN_SPEEDUPS:
            fewest, most = MIN_SPEEDUPS[family]
            ratio = most if e == max(s["experts"]) else fewest
            targets.append(_min_speedup(f"kerashub_{e}", f"sparsified_{e}", ratio))
    return {
        "name": f"kerashub_{family}",
        "title": f"KerasHub {cls}, {layers}, {b}x{n} tokens, d={d}, "
        f"m={m}, top-{k}, against the sparsified one",
        "baseline": f"kerashub_{max(s['experts'])}",
        "variants": variants,
        "targets": targets,
    }


# `{case name: case(size)}`, in `FAMILIES`' order.
CASES = {
    f"kerashub_{family}": (lambda size, family=family: family_case(family, size))
    for family in FAMILIES
}
