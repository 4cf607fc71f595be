"""The experts' element-wise math, shared by `FeedForwardExperts` and
`SharedExpert`: activations (in float32 when asked), gated units (GLU,
GPT-OSS's clamped SwiGLU), fused gate/up layouts."""

from keras import ops

# The values of `gate_up_layout`.
GATE_UP_LAYOUTS = ("separate", "concatenated", "interleaved")


def check_gated_options(gated, use_bias, gate_up_layout, use_gate_bias, swiglu_limit):
    """Refuses the gated experts' options on experts that are not gated, and
    a gate bias where the layout has none."""
    if not gated:
        for name, value, default in (
            ("gate_up_layout", gate_up_layout, "separate"),
            ("swiglu_limit", swiglu_limit, None),
            ("use_gate_bias", use_gate_bias, False),
        ):
            if value != default:
                raise ValueError(
                    f"`{name}` applies to gated experts only (`gated=True`). "
                    f"Received: {name}={value!r}, gated=False"
                )
    if use_gate_bias and (not use_bias or gate_up_layout != "separate"):
        raise ValueError(
            "`use_gate_bias` adds a gate bias to the separate layout's biases: "
            "it needs `use_bias=True` and `gate_up_layout='separate'` (a "
            "fused layout's bias already covers the gate). Received: "
            f"use_gate_bias=True, use_bias={use_bias!r}, "
            f"gate_up_layout={gate_up_layout!r}"
        )


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
