"""`MoEFeedForward`'s shorthand arguments, and what keras-moe 0.2.0 took,
saved and named on it: the options that now belong to its sublayers, its
configs and its `.keras` variables (`keras_moe.saved_formats`)."""

import inspect
import warnings

from keras_moe import saved_formats
from keras_moe import utils

# 0.2.0's `MoEFeedForward` arguments for the published models' blocks ->
# (the sublayer they configure now, its argument).
MOVED_OPTIONS = {
    "router_bias": ("router", "use_bias"),
    "normalize_top_k": ("router", "normalize_top_k"),
    "noisy_gating": ("router", "noisy_gating"),
    "router_dtype": ("router", "router_dtype"),
    "softmax_before_top_k": ("router", "softmax_before_top_k"),
    "router_input_norm": ("router", "input_norm"),
    "router_norm_epsilon": ("router", "norm_epsilon"),
    "gate_up_layout": ("experts", "gate_up_layout"),
    "gate_bias": ("experts", "use_gate_bias"),
    "activation_dtype": ("experts", "activation_dtype"),
    "swiglu_limit": ("experts", "swiglu_limit"),
    "swiglu_alpha": ("experts", "swiglu_alpha"),
    "expert_output_scale": ("experts", "output_scale"),
    "kernel_regularizer": ("experts", "kernel_regularizer"),
    "bias_regularizer": ("experts", "bias_regularizer"),
    "kernel_constraint": ("experts", "kernel_constraint"),
    "bias_constraint": ("experts", "bias_constraint"),
    "shared_intermediate_dim": ("shared_expert", "intermediate_dim"),
    "shared_expert_gate": ("shared_expert", "output_gate"),
}

# Their defaults in 0.2.0: a config holding one of these values asks for
# nothing.
MOVED_DEFAULTS = {
    "router_bias": False,
    "normalize_top_k": True,
    "noisy_gating": False,
    "router_dtype": "float32",
    "softmax_before_top_k": False,
    "router_input_norm": False,
    "router_norm_epsilon": 1e-6,
    "gate_up_layout": "separate",
    "gate_bias": False,
    "activation_dtype": None,
    "swiglu_limit": None,
    "swiglu_alpha": 1.702,
    "expert_output_scale": False,
    "kernel_regularizer": None,
    "bias_regularizer": None,
    "kernel_constraint": None,
    "bias_constraint": None,
    "shared_intermediate_dim": None,
    "shared_expert_gate": False,
}

# 0.2.0's weight attributes of `MoEFeedForward` -> (sublayer, attribute).
MOVED_ATTRIBUTES = {
    "expert_up_kernel": ("experts", "up_kernel"),
    "expert_gate_kernel": ("experts", "gate_kernel"),
    "expert_gate_up_kernel": ("experts", "gate_up_kernel"),
    "expert_down_kernel": ("experts", "down_kernel"),
    "expert_up_bias": ("experts", "up_bias"),
    "expert_gate_up_bias": ("experts", "gate_up_bias"),
    "expert_down_bias": ("experts", "down_bias"),
    "expert_gate_bias": ("experts", "gate_bias"),
    "expert_scale": ("experts", "scale"),
    "router_input_scale": ("router", "input_scale"),
}

# The shorthand arguments that configure each sublayer -> the sublayer's
# attribute of the same meaning (None: nothing to compare with).
SHORTHAND = {
    "experts": {
        "intermediate_dim": "intermediate_dim",
        "n_experts": "n_experts",
        "activation": None,
        "gated": "gated",
        "use_bias": "use_bias",
        "kernel_initializer": None,
        "bias_initializer": None,
    },
    "router": {
        "n_experts": "n_experts",
        "top_k": "top_k",
        "capacity_factor": "capacity_factor",
        "load_balance_weight": "load_balance_weight",
        "router_z_loss_weight": "router_z_loss_weight",
        "balance_bias_rate": "balance_bias_rate",
        "routing": None,
        "layout": "layout",
        "router_initializer": None,
    },
}

# Router options that expert choice does not have, with their values that
# ask for nothing.
_TOKEN_CHOICE_ONLY = {
    "normalize_top_k": True,
    "noisy_gating": False,
    "softmax_before_top_k": False,
    "balance_bias_rate": 0.0,
    "layout": "auto",
}


def pop_moved_options(kwargs, warn):
    """Splits 0.2.0's options out of `kwargs`.

    Returns `(moved, kwargs)`: `moved` maps each sublayer (`"experts"`,
    `"router"`, `"shared_expert"`) to its arguments (those not at their
    0.2.0 default), `kwargs` the rest. With `warn`, each option given warns
    (`DeprecationWarning`) that it moved.
    """
    kwargs = dict(kwargs)
    moved = {"experts": {}, "router": {}, "shared_expert": {}}
    for old, (sublayer, new) in MOVED_OPTIONS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        if warn:
            utils.warn_deprecated(
                f"`MoEFeedForward({old}=...)`",
                f"`{_owner(sublayer)}({new}=...)` passed as "
                f"`MoEFeedForward({sublayer}=...)`, or a factory of "
                "`keras_moe.blocks`",
                removed_in="0.4.0",
                stacklevel=3,  # the code that made the `MoEFeedForward`
            )
        if value != MOVED_DEFAULTS[old]:
            moved[sublayer][new] = value
    return moved, kwargs


def _owner(sublayer):
    return {
        "experts": "keras_moe.layers.FeedForwardExperts",
        "router": "keras_moe.routing.TopKRouter",
        "shared_expert": "keras_moe.layers.SharedExpert",
    }[sublayer]


def quietly(make):
    """`make()` without the moved options' warnings (a saved config names
    them; its user did not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return make()


def required(name, value):
    """`value`, or a clear error when a sublayer built from the shorthand
    lacks it."""
    if value is None:
        raise ValueError(
            f"`MoEFeedForward` builds its experts from `intermediate_dim` and "
            f"`n_experts` unless `experts` is given: `{name}` is required. "
            f"Received: {name}=None, experts=None"
        )
    return value


def _shorthand_defaults():
    from keras_moe.layers.moe_feed_forward import MoEFeedForward

    parameters = inspect.signature(MoEFeedForward.__init__).parameters
    return {name: p.default for name, p in parameters.items()}


def check_given(sublayer, layer, shorthand, options):
    """Refuses shorthand arguments (or 0.2.0 options) for a sublayer that
    is given as a layer: they would be silently ignored."""
    if options:
        raise ValueError(
            f"`{sublayer}` is given as a layer: set these options on it. "
            f"Received: {sorted(options)} with {sublayer}={layer!r}"
        )
    defaults = _shorthand_defaults()
    for name, attribute in SHORTHAND[sublayer].items():
        value = shorthand[name]
        if value is None or value == defaults[name]:
            continue
        if attribute is not None and getattr(layer, attribute, None) == value:
            continue
        raise ValueError(
            f"`{name}` configures the {sublayer} that `MoEFeedForward` builds; "
            f"with `{sublayer}` given as a layer, set it there. Received: "
            f"{name}={value!r} with {sublayer}={layer.name!r}"
        )


def check_shared_expert_options(options):
    """Checks 0.2.0's shared expert options (`SharedExpert` arguments by
    now), naming them as their user wrote them."""
    size = options.get("intermediate_dim")
    if size is None:
        raise ValueError(
            "`shared_expert_gate` gates a shared expert, which needs "
            "`shared_intermediate_dim` (or a `SharedExpert(output_gate=True)` "
            "passed as `shared_expert`). Received: shared_expert_gate="
            f"{options.get('output_gate')!r}, shared_intermediate_dim=None"
        )
    utils.check_positive_int("shared_intermediate_dim", size)


def expert_choice_router(cls, common, shorthand, options):
    """The `ExpertChoiceRouter` of the shorthand `routing="expert_choice"`."""
    if shorthand["capacity_factor"] is None:
        raise ValueError(
            "`routing='expert_choice'` needs a number `capacity_factor`: each "
            "expert takes `ceil(capacity_factor * top_k * tokens / n_experts)` "
            "tokens (1.0 is the usual value; None means dropless token "
            "choice). Received: capacity_factor=None"
        )
    values = {**options, "layout": shorthand["layout"]}
    values["balance_bias_rate"] = shorthand["balance_bias_rate"]
    for name, default in _TOKEN_CHOICE_ONLY.items():
        if values.pop(name, default) != default:
            raise ValueError(
                f"`{name}` applies to `routing='token_choice'` only. "
                f"Received: {name}={options.get(name, shorthand.get(name))!r}, "
                "routing='expert_choice'"
            )
    return cls(capacity_factor=shorthand["capacity_factor"], **common, **values)


def moved_attribute(layer, name):
    """0.2.0's attribute `name` of a `MoEFeedForward`, with a warning."""
    sublayer, attribute = MOVED_ATTRIBUTES[name]
    utils.warn_deprecated(
        f"`MoEFeedForward.{name}`",
        f"`MoEFeedForward.{sublayer}.{attribute}`",
        removed_in="0.4.0",
        stacklevel=3,  # the code that asked `MoEFeedForward.__getattr__`
    )
    return getattr(getattr(layer, sublayer), attribute)


def translate_config(config):
    """The `MoEFeedForward` arguments of a config written by 0.2.0 or 0.1.0
    (no `format_version`), which name the router's kind `router`. The moved
    options stay: build the layer with their warnings silenced."""
    config = dict(config)
    routing = config.pop("router", "token_choice")
    if routing == "expert_choice" and config.get("capacity_factor") is None:
        # 0.2.0's expert choice read `None` as 1.0.
        config["capacity_factor"] = 1.0
    config["routing"] = routing
    return config


def load_variables(layer, store):
    """Reads a `MoEFeedForward` store written by 0.2.0 or 0.1.0.

    0.2.0 kept the expert bank's variables among the layer's own, followed
    by Gemma 4's router input scale; 0.1.0 kept the router's there too, in
    this order: kernel, bias, the experts', noise kernel, and the routing
    statistics packed in two vectors.
    """
    experts = list(layer.experts.weights)
    router = layer.router
    if len(store.keys()) == len(experts) + (router.input_scale is not None):
        if router.input_scale is not None:
            experts.append(router.input_scale)
        saved_formats.assign_in_order(store, experts)
        saved_formats.restored(layer.experts)
        saved_formats.expect_format(router, 1)
        return
    variables = [router.kernel] + ([router.bias] if router.bias is not None else [])
    variables += experts
    noise_kernel = getattr(router, "noise_kernel", None)
    variables += [noise_kernel] if noise_kernel is not None else []
    n = len(variables)
    if len(store.keys()) != n + 2:
        saved_formats.assign_in_order(store, variables)  # raises: counts differ
    for i, variable in enumerate(variables):
        variable.assign(store[str(i)])
    router.statistics.assign_packed(store[str(n)], store[str(n + 1)])
    saved_formats.restored(layer.experts)
    saved_formats.restored(router)
