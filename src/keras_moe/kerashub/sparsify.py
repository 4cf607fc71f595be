"""`sparsify`: KerasHub's MoE models with keras-moe's sparse routing."""

import keras

from keras_moe import utils
from keras_moe.routing.gates import ROUTER_DTYPES

try:
    import keras_hub
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(
        "`keras_moe.kerashub` needs keras-hub 0.32: `pip install "
        f"keras-moe[kerashub]`. Received: {error}"
    ) from error

SUPPORTED_KERAS_HUB = ">=0.32,<0.33"
"""The keras-hub versions whose MoE blocks `sparsify` reproduces (checked
against their code, see `keras_moe/kerashub/_blocks.py`); the `kerashub`
extra pins the same range and `sparsify` refuses any other version."""
_SUPPORTED_MINOR = (0, 32)

# The families, for the error that lists them.
FAMILIES = (
    "Mixtral (`MixtralBackbone`)",
    "Qwen1.5/2-MoE (`QwenMoeBackbone`)",
    "Qwen3-MoE (`Qwen3MoeBackbone`)",
    "Qwen3.5-MoE (`Qwen3_5MoeBackbone`)",
    "GPT-OSS (`GptOssBackbone`)",
    "Gemma 4 with MoE blocks (`Gemma4Backbone(enable_moe_block=True)`)",
)


def check_keras_hub_version(version=None):
    """Raise a clear error unless keras-hub is a version `sparsify` supports."""
    version = keras_hub.__version__ if version is None else version
    try:
        minor = tuple(int(part) for part in str(version).split(".")[:2])
    except ValueError:
        minor = None
    if minor != _SUPPORTED_MINOR:
        raise ValueError(
            "`keras_moe.kerashub.sparsify` reproduces the MoE blocks of keras-hub "
            f"{SUPPORTED_KERAS_HUB} (it replaces their computation, so it "
            "must know it); install such a version (`pip install "
            "keras-moe[kerashub]`). Received: keras_hub.__version__="
            f"{version!r}"
        )


def sparsify(model, router_dtype="compute"):
    """Runs every MoE block of a KerasHub model on its tokens' experts only.

    KerasHub's MoE models compute every expert on every token and weight the
    results by the router's sparse weights, zero for all but the top-k. This
    replaces, in place, the computation of each MoE block of `model` by
    keras-moe's sparse routing: each token's `top_k` chosen experts run on it
    and no other (`keras_moe.routing.sparse_mixture`, dropless), with
    `MoEFeedForward`'s experts on the block's own variables. Compute and
    memory of the experts then grow with `top_k`, not with the number of
    experts.

    Supported (keras-hub 0.32, the `kerashub` extra): Mixtral, Qwen1.5/2-MoE
    (`QwenMoe*`), Qwen3-MoE, Qwen3.5-MoE, GPT-OSS and Gemma 4's MoE blocks
    (`enable_moe_block=True`), as backbones or task models
    (`MixtralCausalLM`, ...).

    What stays the same:

    - The weights: no variable is added, removed or copied; their number and
      paths do not change, and a checkpoint (`save_weights`/`load_weights`)
      moves between the sparsified model and an unsparsified one both ways.
    - Each block's contract: what it returns (Mixtral's and Qwen's
      `(outputs, router_logits)`, GPT-OSS's `(outputs, router_scores)`,
      Gemma 4's dispatch weights and mixed outputs), how the padding mask
      reaches it, and its auxiliary loss, computed by KerasHub's own function
      (padding excluded from the loss, not zeroed in the outputs), and
      Mixtral's router jitter as KerasHub defines it (KerasHub 0.32's own
      block fails with it: it calls `ops.random`, which Keras lacks; the
      sparse block draws with `keras.random.uniform`, unseeded, so not
      inside a compiled JAX function).
    - The outputs: what the all-experts block computes, up to the order of
      the additions (float32: within 1e-5 relative; greedy generation gives
      the same tokens), with the same experts chosen. With
      `router_dtype="compute"` (the default) the router computes exactly as
      KerasHub's (in the compute dtype), so under `"mixed_bfloat16"` the
      same experts are picked too.

    The model is sparsified, not redefined: its config and saved files are
    KerasHub's own. A `.keras` file or preset saved from it reloads as the
    original KerasHub model, with the all-experts blocks and the same
    outputs; call `sparsify` again after loading. This keeps the files
    loadable where keras-moe is not installed, and keeps KerasHub's classes
    (and their configs) the only definition of the model.

    A model that was already compiled and run traces its train, predict and
    generate functions anew at their next call (`sparsify` drops them); a
    model that contains `model`, built before, must be recompiled.

    Under a `keras.distribution` (JAX), call it after creating the model in
    the distribution's scope and before `compile`: the expert weights of the
    sparsified blocks are then laid out again by the distribution's layout
    map, which for `keras_moe.expert_parallel_layout_map` shards them along
    their experts axis (each bank declares its expert weights with
    `expert_weight_axes()`).

    Args:
        model: A KerasHub backbone or task model (`keras_hub.models.Backbone`
            or `keras_hub.models.Task`) with MoE blocks. Sparsifying a model
            again (another `router_dtype`) is allowed.
        router_dtype: `"compute"` (the default): the router's logits,
            softmax and top-k in the model's compute dtype, as KerasHub
            computes them (exact parity under mixed precision). `"float32"`:
            the router runs in float32 (keras-moe's default for its own
            layers, steadier for mixed-precision training); the router
            logits the blocks return and their auxiliary losses are then
            float32, and under `"mixed_bfloat16"` a few tokens pick other
            experts than KerasHub's model would. Identical in float32. A
            quantized (int8, int4) or LoRA router `Dense`, before or after
            `sparsify`, is computed as the layer computes it, in float32.

    Returns:
        `model`, sparsified.

    Raises:
        TypeError: `model` is not a KerasHub backbone or task model, or holds
            a subclass of a KerasHub MoE block (whose computation `sparsify`
            cannot know).
        ValueError: `model` has no MoE block `sparsify` knows, `router_dtype`
            is not one of its values (or is `"float32"` with a router
            quantized in a mode other than int8 and int4), or keras-hub is
            an unsupported version.

    Example:

    ```python
    import keras_hub
    from keras_moe.kerashub import sparsify

    causal_lm = keras_hub.models.MixtralCausalLM.from_preset("mixtral_8_7b_en")
    sparsify(causal_lm)
    causal_lm.generate("What is a mixture of experts?", max_length=64)
    ```
    """
    check_keras_hub_version()
    if not isinstance(model, (keras_hub.models.Backbone, keras_hub.models.Task)):
        raise TypeError(
            "`model` must be a KerasHub backbone or task model "
            "(`keras_hub.models.Backbone` or `keras_hub.models.Task`), e.g. "
            "a `MixtralBackbone` or `MixtralCausalLM`. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    router_dtype = utils.check_choice("router_dtype", router_dtype, ROUTER_DTYPES)
    # After the version check: KerasHub's internals are those of 0.32.
    from keras_moe.kerashub import _blocks

    banks = []
    for layer in model._flatten_layers(include_self=False):
        cls = _blocks.SPARSE_CLASSES.get(type(layer), type(layer))
        sparsifier = _blocks.SPARSIFIERS.get(cls)
        if sparsifier is None:
            for known in _blocks.SPARSIFIERS:
                if isinstance(layer, known):
                    raise TypeError(
                        "`sparsify` replaces the computation of KerasHub's own "
                        f"`{known.__name__}`; `model` holds a subclass of it, "
                        "whose computation it cannot know. Received: layer "
                        f"{layer.name!r} of type {type(layer).__name__}"
                    )
            continue
        banks += sparsifier(layer, router_dtype)
    if not banks:
        raise ValueError(
            "`model` has no MoE block that `sparsify` knows. It sparsifies "
            f"these KerasHub families: {', '.join(FAMILIES)}. Received: "
            f"model of type {type(model).__name__}"
        )
    _lay_out_experts(model, banks)
    _forget_compiled_functions(model)
    return model


def _forget_compiled_functions(model):
    """Drops the model's traced train/test/predict/generate functions, which
    captured the blocks' computation as it was: the next call traces anew."""
    for layer in model._flatten_layers(include_self=True):
        if not isinstance(layer, keras.Model):
            continue
        for name in ("train_function", "test_function", "predict_function"):
            setattr(layer, name, None)
        if hasattr(layer, "generate_function"):
            layer.generate_function = None


def _lay_out_experts(model, banks):
    """Lays the expert weights out again under the current distribution.

    The model's variables were laid out when they were created, when the
    expert banks did not declare their expert weights yet. Each one is now
    asked of the distribution again (the layout map finds its bank among
    the model's layers) and moved where that layout puts it.
    """
    distribution = keras.distribution.distribution()
    if distribution is None or not banks:
        return
    with keras.name_scope(model.name, caller=model):
        for bank in banks:
            names = bank.expert_weight_axes()
            for variable in bank.weights:
                if variable.path.rpartition("/")[2] not in names:
                    continue
                layout = distribution.get_tensor_layout(variable.path)
                if layout is None:
                    continue
                # Keras keeps a variable's layout in `_layout` and applies it
                # on every assignment; there is no public way to change it.
                variable._layout = layout
                variable.assign(variable.value)
