"""Quantized (int8, int4) and LoRA-adapted kernels of `FeedForwardExperts`.

The mechanics behind the bank's Keras protocols (`quantize`,
`quantized_build`, `enable_lora`, `save_own_variables` /
`load_own_variables`), kept apart from the bank's math:

- A quantized kernel `(E, d, m)` is stored as int8 values `q` (int4: two
  values per byte along the output axis, packed as `keras.layers.Dense`
  packs them, `(E, d, ceil(m / 2))`) and a float32 scale `s` `(E, m)` per
  expert and output channel, `w ~= q / s` (Keras's abs-max convention,
  `keras.quantizers.abs_max_quantize` over the input axis). Weight-only:
  the inputs are not quantized.
- A call selects the int8 rows and scales the layout needs
  (`layout.select`) and dequantizes those only: a layout that runs a few
  experts' blocks dequantizes those experts' kernels, never the bank.
- LoRA adds `(alpha / r) * (x . A_e) . B_e` to each kernel's product, with
  `A` `(E, d, r)` and `B` `(E, r, m)` selected by the layout as the kernels
  are.
"""

import numpy as np
from keras import dtype_policies
from keras import ops
from keras import quantizers

from keras_moe import distribution
from keras_moe import utils

# The modes an expert bank quantizes to, and their integer ranges.
MODES = ("int8", "int4")
VALUE_RANGES = {"int8": (-127, 127), "int4": (-8, 7)}
# Keras's other quantization modes, which an expert bank does not implement.
OTHER_KERAS_MODES = ("float8", "gptq", "awq")


def kernel_names(layer, shapes):
    """The names of the bank's kernels, in the order of its weights."""
    return [n for n in layer.weight_names if n in shapes and n.endswith("_kernel")]


def kernel_shapes(layer):
    """`{kernel name: (E, d, m)}` of a built bank (the float shapes)."""
    shapes = layer.weight_shapes(layer.input_spec.axes[-1])
    return {name: shapes[name] for name in kernel_names(layer, shapes)}


def check_mode(layer, mode):
    """Refuses the modes an expert bank does not quantize to."""
    if mode in OTHER_KERAS_MODES:
        raise NotImplementedError(
            f"`{type(layer).__name__}` quantizes its expert kernels to "
            f"{' or '.join(repr(m) for m in MODES)}; mode {mode!r} is not "
            f"implemented for expert banks. Received: mode={mode!r}"
        )
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")


def quantize_values(kernel, mode):
    """`(q, scale)` of an `(E, d, m)` float kernel: int8 values (int4 packed
    two per byte along the last axis) and a float32 `(E, m)` scale."""
    values, scale = quantizers.abs_max_quantize(
        ops.cast(kernel, "float32"),
        axis=-2,
        value_range=VALUE_RANGES[mode],
        dtype="int8",
        to_numpy=True,
    )
    scale = ops.squeeze(scale, axis=-2)
    if mode == "int4":
        values, _, _ = quantizers.pack_int4(values, axis=-1)
    return values, scale


def dequantize(values, scale, mode, units, dtype):
    """`values / scale` in `dtype`: `values` int8 (int4 packed) `(., d, m)`
    kernels, `scale` their `(., m)` scales."""
    if mode == "int4":
        values = quantizers.unpack_int4(values, units, axis=-1)
    scale = ops.expand_dims(ops.cast(scale, dtype), -2)
    return ops.divide(ops.cast(values, dtype), scale)


def selected_kernel(layer, layout, name, dtype):
    """The kernel `name` of the experts the layout's rows need, in `dtype`:
    the float kernel, or the selected int8 values dequantized."""
    kernel = getattr(layer, name)
    mode = layer.quantization_mode
    if mode not in MODES:
        return ops.cast(layout.select(kernel), dtype)
    scale = getattr(layer, f"{name}_scale")
    units = scale.shape[-1]
    return dequantize(layout.select(kernel), layout.select(scale), mode, units, dtype)


def add_lora(layer, layout, x, y, name):
    """`y + (alpha / r) * (x . A) . B` with the layout's experts' factors of
    the kernel `name` (`y` as it is without LoRA)."""
    if not layer.lora_enabled:
        return y
    a = ops.cast(layout.select(getattr(layer, f"{name}_lora_a")), x.dtype)
    b = ops.cast(layout.select(getattr(layer, f"{name}_lora_b")), x.dtype)
    delta = layout.matmul(layout.matmul(x, a), b)
    return y + ops.cast(layer.lora_alpha / layer.lora_rank, y.dtype) * delta


def quantize(layer, mode):
    """Replaces a built float bank's kernels by int8 (int4) ones and sets
    its dtype policy to `"{mode}_from_{policy}"`."""
    check_mode(layer, mode)
    shapes = kernel_shapes(layer)
    values = {name: quantize_values(getattr(layer, name), mode) for name in shapes}
    for name in shapes:
        # `Layer.__delattr__` untracks the float variable.
        delattr(layer, name)
    quantized_build(layer, layer.input_spec.axes[-1], mode)
    for name, (kernel, scale) in values.items():
        getattr(layer, name).assign(kernel)
        getattr(layer, f"{name}_scale").assign(scale)
    policy = layer.dtype_policy
    layer.dtype_policy = dtype_policies.get(f"{mode}_from_{policy.name}")


def quantized_build(layer, d, mode):
    """Creates the int8 (int4 packed) kernels and their float32 scales, not
    trainable (quantization is for inference and for LoRA on top)."""
    check_mode(layer, mode)
    shapes = layer.weight_shapes(d)
    # Set first: `expert_weight_axes` then declares the scales.
    layer._is_quantized = True
    with distribution.expert_weights(layer):
        for name in kernel_names(layer, shapes):
            e, rows, units = shapes[name]
            stored = (e, rows, (units + 1) // 2) if mode == "int4" else (e, rows, units)
            variable_name = layer.weight_names[name]
            kernel = layer.add_weight(
                name=variable_name,
                shape=stored,
                initializer="zeros",
                dtype="int8",
                trainable=False,
            )
            setattr(layer, name, kernel)
            scale = layer.add_weight(
                name=f"{variable_name}_scale",
                shape=(e, units),
                initializer="ones",
                dtype="float32",
                trainable=False,
            )
            setattr(layer, f"{name}_scale", scale)


def enable_lora(layer, rank, lora_alpha, a_initializer, b_initializer):
    """Adds the per-expert factors `A` `(E, d, r)`, `B` `(E, r, m)` of every
    kernel and freezes the kernels."""
    rank = utils.check_positive_int("rank", rank)
    lora_alpha = utils.check_optional_positive_float("lora_alpha", lora_alpha)
    a_initializer = utils.get_initializer("a_initializer", a_initializer)
    b_initializer = utils.get_initializer("b_initializer", b_initializer)
    if not layer.built:
        raise ValueError(
            f"`enable_lora` needs a built `{type(layer).__name__}` (its "
            f"kernels' shapes). Received: an unbuilt layer {layer.name!r}"
        )
    if layer.lora_enabled:
        raise ValueError(
            "LoRA can be enabled once per layer. Received: enable_lora on "
            f"{layer.name!r}, whose LoRA rank is already {layer.lora_rank}"
        )
    if layer.kernel_constraint is not None:
        raise ValueError(
            "LoRA is incompatible with a kernel constraint (it would not "
            "constrain the adapted kernels). Received: kernel_constraint="
            f"{layer.kernel_constraint!r}"
        )
    # Set first: `expert_weight_axes` then declares the factors.
    layer.lora_rank = rank
    layer.lora_alpha = rank if lora_alpha is None else lora_alpha
    layer._tracker.unlock()
    try:
        _add_lora_factors(layer, rank, a_initializer, b_initializer)
    finally:
        layer._tracker.lock()
    layer.lora_enabled = True


def _add_lora_factors(layer, rank, a_initializer, b_initializer):
    with distribution.expert_weights(layer):
        for name, (e, rows, units) in kernel_shapes(layer).items():
            variable_name = layer.weight_names[name]
            for factor, shape, initializer in (
                ("a", (e, rows, rank), a_initializer),
                ("b", (e, rank, units), b_initializer),
            ):
                # float32 whatever the dtype policy, as Keras's Dense: the
                # small updates of fine-tuning neither underflow nor round.
                weight = layer.add_weight(
                    name=f"{variable_name}_lora_{factor}",
                    shape=shape,
                    initializer=utils.initializer_for(
                        initializer, f"{variable_name}_lora_{factor}"
                    ),
                    dtype="float32",
                    regularizer=layer.kernel_regularizer,
                )
                setattr(layer, f"{name}_lora_{factor}", weight)
            getattr(layer, name).trainable = False


def merged_kernel(layer, name):
    """`(kernel, scale)` as saved: with LoRA, the kernel plus
    `(alpha / r) * A . B` (dequantized, merged and quantized again for an
    int8/int4 kernel); `scale` None for a float kernel."""
    kernel = getattr(layer, name)
    mode = layer.quantization_mode
    scale = getattr(layer, f"{name}_scale") if mode in MODES else None
    if not layer.lora_enabled:
        return kernel, scale
    a = ops.convert_to_numpy(getattr(layer, f"{name}_lora_a"))
    b = ops.convert_to_numpy(getattr(layer, f"{name}_lora_b"))
    delta = (layer.lora_alpha / layer.lora_rank) * np.matmul(a, b)
    if mode not in MODES:
        merged = ops.convert_to_numpy(ops.cast(kernel, "float32")) + delta
        return ops.cast(merged, kernel.dtype), None
    units = delta.shape[-1]
    base = ops.convert_to_numpy(dequantize(kernel, scale, mode, units, "float32"))
    return quantize_values(base + delta, mode)


def saved_variables(layer):
    """The variables a store holds, in order: the weights in the order of
    `weight_names` (kernels as stored), then the kernels' scales when
    quantized. LoRA factors are not saved (they are merged)."""
    shapes = layer.weight_shapes(layer.input_spec.axes[-1])
    variables = [getattr(layer, n) for n in layer.weight_names if n in shapes]
    if layer.quantization_mode in MODES:
        variables += [
            getattr(layer, f"{name}_scale") for name in kernel_names(layer, shapes)
        ]
    return variables


def save_variables(layer, store):
    """`layer.save_own_variables`: the weights, LoRA merged into the kernels."""
    merged = {}
    for name in kernel_shapes(layer):
        kernel, scale = merged_kernel(layer, name)
        merged[id(getattr(layer, name))] = kernel
        if scale is not None:
            merged[id(getattr(layer, f"{name}_scale"))] = scale
    for i, variable in enumerate(saved_variables(layer)):
        store[str(i)] = merged.get(id(variable), variable)


def load_variables(layer, store):
    """`layer.load_own_variables`: the weights in `save_variables`'s order;
    with LoRA, `B` set to zeros (the kernels hold the merged adapters)."""
    variables = saved_variables(layer)
    if len(store.keys()) != len(variables):
        raise ValueError(
            f"`{type(layer).__name__}` {layer.name!r} expects {len(variables)} "
            f"saved arrays ({[v.name for v in variables]}), for its "
            f"quantization mode {layer.quantization_mode!r}. Received: "
            f"{len(store.keys())} arrays"
        )
    for i, variable in enumerate(variables):
        variable.assign(store[str(i)])
    if layer.lora_enabled:
        for name in kernel_shapes(layer):
            factor = getattr(layer, f"{name}_lora_b")
            factor.assign(ops.zeros(factor.shape, factor.dtype))
