"""The experts' element-wise math, shared by `MoEFeedForward` and its shared
expert: activations (in float32 when asked), gated units (GLU, GPT-OSS's
clamped SwiGLU), fused gate/up layouts, Gemma 4's router input."""

import keras
from keras import ops

# The values of `gate_up_layout`.
GATE_UP_LAYOUTS = ("separate", "concatenated", "interleaved")


@keras.saving.register_keras_serializable(package="keras_moe", name="gelu_tanh")
def gelu_tanh(x):
    """GELU's tanh approximation, `activation="gelu_tanh"` (Gemma's experts)."""
    return keras.activations.gelu(x, approximate=True)


def get_activation(activation):
    """`activation`, with `"gelu_tanh"` for GELU's tanh approximation."""
    return gelu_tanh if activation == "gelu_tanh" else activation


def activate(x, activation, activation_dtype=None):
    """`activation(x)`, computed in `activation_dtype` (None: `x`'s dtype) and
    cast back to `x`'s dtype."""
    if activation_dtype is None:
        return activation(x)
    return ops.cast(activation(ops.cast(x, activation_dtype)), x.dtype)


def gated_unit(
    gate,
    up,
    activation,
    activation_dtype=None,
    swiglu_limit=None,
    swiglu_alpha=1.702,
):
    """`act(gate) * up`, or with `swiglu_limit` `L` GPT-OSS's clamped SwiGLU
    `(clip(up, -L, L) + 1) * g * sigmoid(alpha * g)`, `g = min(gate, L)`."""
    if swiglu_limit is None:
        return activate(gate, activation, activation_dtype) * up
    gate = ops.minimum(gate, ops.cast(swiglu_limit, gate.dtype))
    up = ops.clip(up, -swiglu_limit, swiglu_limit)

    def swish(g):
        return g * ops.sigmoid(g * swiglu_alpha)

    return (up + 1) * activate(gate, swish, activation_dtype)


def split_gate_up(h, gate_up_layout):
    """The gate's and up's columns of a fused `(..., 2m)` product: the first
    and last `m` (`"concatenated"`) or alternate columns (`"interleaved"`)."""
    if gate_up_layout == "concatenated":
        gate, up = ops.split(h, 2, axis=-1)
        return gate, up
    return h[..., ::2], h[..., 1::2]


def router_tokens(router_inputs, inputs, dtype):
    """`router_inputs` as `(tokens, d)` rows in `dtype`, after checking that
    they have the shape of `inputs` (axes unknown before run time aside): a
    tensor of the same size but another shape would be reshaped into rows
    that belong to other tokens."""
    shape = tuple(router_inputs.shape)
    expected = tuple(inputs.shape)
    same = len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected)
    )
    if not same:
        raise ValueError(
            "`router_inputs` must have the shape of the inputs, "
            f"{expected}, one row per token. Received: router_inputs.shape="
            f"{shape}, inputs.shape={expected}"
        )
    return ops.reshape(ops.cast(router_inputs, dtype), (-1, expected[-1]))


def normalized_router_inputs(tokens, scale, epsilon):
    """Gemma 4's router input `rms_norm(x) / sqrt(d) * scale`, the norm in
    float32, the rest in `tokens`' dtype."""
    x = ops.cast(tokens, "float32")
    variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
    x = ops.cast(x * ops.power(variance + epsilon, -0.5), tokens.dtype)
    x = x * ops.cast(tokens.shape[-1] ** -0.5, x.dtype)
    return x * ops.cast(scale, x.dtype)
