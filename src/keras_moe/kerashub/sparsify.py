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
    and no other (`keras_moe.routing.sparse_mixture`, dropless). Compute and
    memory of the experts then grow with `top_k`, not with the number of
    experts.

    Supported (keras-hub 0.32, the `kerashub` extra): Mixtral, Qwen1.5/2-MoE
    (`QwenMoe*`), Qwen3-MoE, Qwen3.5-MoE, GPT-OSS and Gemma 4's MoE blocks
    (`enable_moe_block=True`), as backbones or task models
    (`MixtralCausalLM`, ...).

    What happens to the weights: each block's KerasHub expert bank
    (`expert_bank`; GPT-OSS's `experts`, Gemma 4's `moe_expert_bank`) is
    replaced by a `keras_moe.layers.FeedForwardExperts` built with the same
    variable names, shapes, paths and order, which takes over the old
    variables' values and the old bank's attribute and place; the old bank
    and its variables leave the model. The routers, shared experts and all
    other weights are KerasHub's own variables, untouched. So the model has
    the same number of weights, in the same order, with the same values,
    and a checkpoint (`save_weights`/`load_weights`) moves between the
    sparsified model and an unsparsified one both ways. The experts are then
    a keras-moe layer that owns its variables.

    What stays the same:

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

    Call it before `compile`: the experts' variables are new objects, which
    an optimizer built before does not know (compile again). A model
    compiled before traces its predict and generate functions anew at their
    next call (`sparsify` drops them); a model that contains `model`, built
    before, must be recompiled.

    Under a `keras.distribution` (JAX), call it in the distribution's scope
    (or with it set globally): the experts' variables are created then, and
    the distribution's layout map lays them out as it does any keras-moe
    expert weights; `keras_moe.expert_parallel_layout_map` shards them
    along their experts axis (each bank declares its expert weights with
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
    from keras_moe.kerashub import _experts

    replaced = []
    layers = list(model._flatten_layers(include_self=True))
    for layer in layers[1:]:
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
        replaced += sparsifier(layer, router_dtype)
    if not replaced:
        raise ValueError(
            "`model` has no MoE block that `sparsify` knows. It sparsifies "
            f"these KerasHub families: {', '.join(FAMILIES)}. Received: "
            f"model of type {type(model).__name__}"
        )
    _experts.forget_old_variables(layers, replaced)
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
