"""The expert banks of the sparsified KerasHub blocks: keras-moe's
`FeedForwardExperts` with KerasHub's variable names, order and shapes.

`sparsify` replaces each MoE block's KerasHub expert bank (Mixtral's
`MixtralMoeExperts`, the Qwen families' `*MoeExperts`, GPT-OSS's
`GptOssExperts`, Gemma 4's `Gemma4MoEBlock`) by one of the classes here: a
`FeedForwardExperts` subclass whose `weight_names` are KerasHub's variable
names in KerasHub's creation order. It is made with its public constructor
and built with `build` in the old bank's name scope, so its variables have
the old ones' names, paths, shapes and order; their values are assigned
from the old variables, and it takes the old bank's place (the same
attribute of the block, the same position among the block's sublayers).
The old bank and its variables are then no longer part of the model: the
model has as many weights as before, in the same order, and saved files
(`save_weights`, `.keras`) are the same as KerasHub's own model writes.

Being a real, tracked keras-moe layer that owns its variables, the bank is
where keras-moe's features for experts reach a KerasHub model: it declares
its expert weights (`keras_moe.expert_parallel_layout_map` lays them out
when they are created under a `keras.distribution`), and it is the layer a
quantization or LoRA of the experts acts on.

Everything this module knows of KerasHub's banks (their attributes and
their variables' names) is here; the blocks are in `_blocks.py`.
"""

import keras
from keras import ops

from keras_moe import routing
from keras_moe import utils
from keras_moe.layers.feed_forward_experts import FeedForwardExperts


class KerasHubExperts(FeedForwardExperts):
    """A `FeedForwardExperts` in a KerasHub block, which also mixes tokens.

    Called as a `FeedForwardExperts` (`bank(rows, layout=plan)`) it runs
    its experts on the rows of a dispatch. Called by a sparsified block
    with `gates=(weights, experts)`, each token's top-k weights and
    experts, it runs each token through its chosen experts only
    (`keras_moe.routing.sparse_mixture`, dropless, calling itself on the
    plan's rows) and returns the mixed `(tokens, d)` outputs. `training`
    picks the dispatch layout; Keras fills it from the outer call when the
    block's own `call` has none (GPT-OSS's, Gemma 4's decoder's call of
    its bank).
    """

    def call(self, inputs, layout=None, gates=None, training=None):
        if gates is None:
            return super().call(inputs, layout=layout)
        weights, experts = gates
        outputs, _, _ = routing.sparse_mixture(
            inputs, experts, weights, self.n_experts, self, training=training
        )
        return outputs


class KerasHubMixtralExperts(KerasHubExperts):
    """Mixtral's experts (`MixtralMoeExperts`): gated, no biases."""

    weight_names = {
        "gate_kernel": "expert_feedforward_gate_dense",
        "up_kernel": "expert_feedforward_intermediate_dense",
        "down_kernel": "expert_feedforward_output_dense",
    }


class KerasHubQwenExperts(KerasHubExperts):
    """The Qwen families' experts (`QwenMoeExperts`, `Qwen3MoeExperts`,
    `Qwen3_5MoeExperts`): one fused `[gate | up]` kernel, no biases."""

    weight_names = {
        "gate_up_kernel": "expert_feedforward_gate_dense",
        "down_kernel": "expert_feedforward_output_dense",
    }


class KerasHubGptOssExperts(KerasHubExperts):
    """GPT-OSS's experts (`GptOssExperts`): interleaved gate and up with
    biases, clamped SwiGLU."""

    weight_names = {
        "gate_up_kernel": "gate_up_proj",
        "gate_up_bias": "gate_up_proj_bias",
        "down_kernel": "down_proj",
        "down_bias": "down_proj_bias",
    }


class KerasHubGemma4Experts(KerasHubExperts):
    """Gemma 4's experts (`Gemma4MoEBlock`): gated GELU (tanh), a learned
    output scale per expert, called by Gemma 4's decoder as
    `bank(tokens, dispatch_weights)`.

    Args:
        top_k: The experts per token: the non-zero entries per row of the
            router's `(tokens, experts)` dispatch weights, which are the
            chosen experts and their weights.
        *args, **kwargs: `FeedForwardExperts`'s.
    """

    weight_names = {
        "gate_kernel": "gate_proj",
        "up_kernel": "up_proj",
        "down_kernel": "down_proj",
        "scale": "per_expert_scale",
    }

    def __init__(self, *args, top_k=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.top_k = utils.check_top_k(top_k, self.n_experts)

    def call(self, inputs, dispatch_weights=None, layout=None, training=None):
        if dispatch_weights is None:
            return super().call(inputs, layout=layout)
        weights, experts = ops.top_k(dispatch_weights, self.top_k)
        gates = (weights, ops.cast(experts, "int32"))
        return super().call(inputs, gates=gates, training=training)

    def get_config(self):
        return {**super().get_config(), "top_k": self.top_k}


def mixtral_experts(bank):
    """The bank that takes a `MixtralMoeExperts`' place (not built)."""
    return KerasHubMixtralExperts(
        bank.intermediate_dim,
        bank.num_experts,
        activation=bank.activation,
        gated=True,
        use_bias=False,
        # KerasHub computes the gate's activation in float32.
        activation_dtype="float32",
        **_layer_options(bank),
    )


def qwen_experts(bank, activation_dtype=None):
    """The bank that takes a Qwen family's bank's place (not built);
    Qwen3.5-MoE's computes its SiLU in float32 (`activation_dtype`)."""
    return KerasHubQwenExperts(
        bank.intermediate_dim,
        bank.num_experts,
        # Qwen1.5/2-MoE's and Qwen3-MoE's banks take no activation: SiLU.
        activation=getattr(bank, "activation", "silu"),
        gated=True,
        use_bias=False,
        gate_up_layout="concatenated",
        activation_dtype=activation_dtype,
        **_layer_options(bank),
    )


def gpt_oss_experts(bank):
    """The bank that takes a `GptOssExperts`' place (not built)."""
    return KerasHubGptOssExperts(
        bank.intermediate_dim,
        bank.num_experts,
        gated=True,
        use_bias=True,
        gate_up_layout="interleaved",
        swiglu_limit=bank.limit,
        swiglu_alpha=bank.alpha,
        **_layer_options(bank),
    )


def gemma4_experts(bank, top_k):
    """The bank that takes a `Gemma4MoEBlock`'s place (not built)."""
    return KerasHubGemma4Experts(
        bank.expert_intermediate_dim,
        bank.num_experts,
        top_k=top_k,
        activation="gelu_tanh",
        gated=True,
        use_bias=False,
        activation_dtype="float32",
        output_scale=True,
        **_layer_options(bank),
    )


def _layer_options(bank):
    """The old bank's name, dtype policy and trainability. The kernels start
    at zeros (drawing random values is wasted work): `replace_bank` assigns
    them the old bank's values."""
    return {
        "kernel_initializer": "zeros",
        "name": bank.name,
        "dtype": bank.dtype_policy,
        "trainable": bank.trainable,
    }


def replace_bank(holder, attribute, bank):
    """Builds `bank` with the values of `holder.<attribute>` and puts it there.

    Args:
        holder: The layer that holds KerasHub's bank (the block; Gemma 4's
            decoder).
        attribute: The attribute that holds it (`"expert_bank"`,
            `"experts"`, `"moe_expert_bank"`).
        bank: A `KerasHubExperts`, not built.

    Returns:
        `[(new variable, old variable)]`, for `forget_old_variables`.
    """
    old = getattr(holder, attribute)
    # The old bank's name scope: the new variables get the old paths.
    scope_parent, _, scope_name = old.path.rpartition("/")[0].rpartition("/")
    if scope_name:
        with keras.name_scope(scope_name, override_parent=scope_parent):
            bank.build((None, old.hidden_dim))
    else:
        bank.build((None, old.hidden_dim))
    pairs = _matching_variables(old, bank)
    for new_variable, old_variable in pairs:
        new_variable.assign(old_variable.value)
    # Keras has no public way to replace a built layer's sublayer: its
    # tracker swaps the two in place, so the holder's sublayers (and the
    # model's weights) keep their order.
    holder._tracker.replace_tracked_value("layers", old, bank)
    setattr(holder, attribute, bank)
    return pairs


def _matching_variables(old, bank):
    """`[(new variable, old variable)]` by name; a clear error when KerasHub's
    bank has other variables than the one replacing it."""
    old_variables = {v.name: v for v in old.weights}
    new_variables = {v.name: v for v in bank.weights}
    shapes = {name: tuple(v.shape) for name, v in old_variables.items()}
    new_shapes = {name: tuple(v.shape) for name, v in new_variables.items()}
    if shapes != new_shapes or len(old.weights) != len(bank.weights):
        raise ValueError(
            f"`sparsify` cannot replace `{old.path}` ({type(old).__name__}): its "
            f"variables {shapes} are not those of {type(bank).__name__} "
            f"({new_shapes}). KerasHub's layers may have changed; please "
            "report this."
        )
    return [(v, old_variables[v.name]) for v in bank.weights]


def forget_old_variables(layers, replaced):
    """Tells the layers that hold a replaced bank, directly or not, that its
    variables are the new bank's.

    A Keras layer may keep a record of its sublayers' variables, made when
    it was built (PyTorch's: its parameters, by path, which
    `model.parameters()` lists and which keep the old values alive); Keras
    updates it through these two hooks when a layer's own variables change.

    Args:
        layers: Every layer that may contain a holder (the model's, the
            model included).
        replaced: `[(holder, pairs)]`, `pairs` as `replace_bank` returns.
    """
    parents = {}
    for parent in layers:
        for child in parent._flatten_layers(include_self=False, recursive=False):
            parents.setdefault(id(child), parent)
    for holder, pairs in replaced:
        layer = holder
        while layer is not None:
            for new_variable, old_variable in pairs:
                layer._post_untrack_variable(old_variable)
                layer._post_track_variable(new_variable)
            layer = parents.get(id(layer))
