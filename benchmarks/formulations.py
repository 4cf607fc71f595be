"""Reference formulations the layers are measured against, in `keras.ops`.

- `OriginalDenseMoE`, `OriginalConvMoE`: the original Keras 2 layers'
  computation, written op for op in `keras.ops`: experts by a tensordot into
  `(b, units, experts)` (conv: one convolution reshaped to `(b, *spatial, f,
  k)`), the gates repeated over the units (conv: over the positions),
  multiplied and summed. Same weights and same function as `keras_moe`'s
  layers; only the formulation differs.
- `DimMajorTopKDenseMoE`: `DenseMoE(top_k=...)`'s function with the soft
  mixture's `(d, e, u)` kernel (the sparse layout before it became
  expert-major).
- `capacity_tiers`: a `DenseMoE(top_k=...)` whose training calls take the
  dropless capacity tiers, as before the blocks became their layout
  (`MoEFeedForward(layout="tiers")` for that layer).
- `GatedFeedForward`: a dense gated feed-forward `down(silu(x Wg) * (x Wu))`,
  the roofline of a top-k `MoEFeedForward` when given `k * m` units and 2-D
  `(tokens, d)` inputs (`cases.roofline`).
- `cifar10_cnn`, `cifar10_moe`: the original CIFAR-10 networks.
"""

import keras
from keras import ops

from keras_moe import routing


def kernel_and_bias(layer, prefix, kernel_shape, bias_shape, initializer):
    """Adds a kernel drawn from `initializer` and a zero bias to `layer`,
    named `<prefix>k` and `<prefix>b`; returns them."""
    kernel = layer.add_weight(
        shape=kernel_shape, initializer=initializer, name=f"{prefix}k"
    )
    bias = layer.add_weight(shape=bias_shape, initializer="zeros", name=f"{prefix}b")
    return kernel, bias


class Formulation(keras.layers.Layer):
    """A layer of the benchmarks' formulations, with its expert and gating
    activations."""

    def __init__(self, expert_activation=None, gating_activation=None, **kw):
        super().__init__(**kw)
        self.expert_activation = keras.activations.get(expert_activation)
        self.gating_activation = keras.activations.get(gating_activation)


class OriginalDenseMoE(Formulation):
    """The original `DenseMoE` formulation (tensordot, repeat, multiply, sum)."""

    def __init__(self, units, n_experts, **kw):
        super().__init__(**kw)
        self.units = units
        self.n_experts = n_experts

    def build(self, input_shape):
        d, u, e = input_shape[-1], self.units, self.n_experts
        init = keras.initializers.RandomUniform(-0.05, 0.05)
        self.expert_kernel, self.expert_bias = kernel_and_bias(
            self, "e", (d, u, e), (u, e), init
        )
        self.gating_kernel, self.gating_bias = kernel_and_bias(
            self, "g", (d, e), (e,), init
        )

    def call(self, inputs, training=None):
        experts = ops.tensordot(inputs, self.expert_kernel, axes=1)
        experts = self.expert_activation(experts + self.expert_bias)
        gates = ops.matmul(inputs, self.gating_kernel) + self.gating_bias
        gates = self.gating_activation(gates)
        gates = ops.repeat(ops.expand_dims(gates, -2), self.units, axis=-2)
        return ops.sum(experts * gates, axis=-1)


class OriginalConvMoE(Formulation):
    """The original `ConvNDMoE` formulation, channels last.

    One convolution with `f * k` filters, reshaped to `(b, *spatial, f, k)`,
    bias, activation; gates a tensordot of the whole input sample with a
    `input_shape[1:] + (f, k)` kernel, activation over `k`, repeated over every
    position; multiply and sum over `k`.
    """

    def __init__(
        self, rank, n_filters, n_experts_per_filter, kernel_size, padding="valid", **kw
    ):
        super().__init__(**kw)
        self.rank = rank
        self.n_filters = n_filters
        self.n_experts = n_experts_per_filter
        self.kernel_size = (kernel_size,) * rank
        self.padding = padding

    def build(self, input_shape):
        channels = input_shape[-1]
        f, k = self.n_filters, self.n_experts
        init = keras.initializers.RandomNormal(stddev=0.05)
        self.expert_kernel, self.expert_bias = kernel_and_bias(
            self,
            "e",
            self.kernel_size + (channels, f * k),
            (1,) * self.rank + (f, k),
            init,
        )
        self.gating_kernel, self.gating_bias = kernel_and_bias(
            self, "g", tuple(input_shape[1:]) + (f, k), (f, k), init
        )

    def call(self, inputs, training=None):
        f, k = self.n_filters, self.n_experts
        experts = ops.conv(inputs, self.expert_kernel, padding=self.padding)
        spatial = tuple(experts.shape[1:-1])
        experts = ops.reshape(experts, (-1,) + spatial + (f, k))
        experts = self.expert_activation(experts + self.expert_bias)
        gates = ops.tensordot(inputs, self.gating_kernel, axes=self.rank + 1)
        gates = self.gating_activation(gates + self.gating_bias)
        for axis, size in enumerate(spatial):
            gates = ops.repeat(ops.expand_dims(gates, 1 + axis), size, axis=1 + axis)
        return ops.sum(experts * gates, axis=-1)


class DimMajorTopKDenseMoE(Formulation):
    """`DenseMoE(top_k=...)`'s function with the soft mixture's `(d, e, u)`
    expert kernel: its per-expert products take the kernel through a
    transpose (XLA) or a copy (`torch._grouped_mm`) at every step. A
    `TopKRouter` and its dispatch, as `DenseMoE` runs them."""

    def __init__(self, units, n_experts, top_k, **kw):
        # The top-k weights are a softmax over the chosen logits, whatever
        # `gating_activation` says (as in `DenseMoE`).
        super().__init__(**kw)
        self.units = units
        self.n_experts = n_experts
        self.top_k = top_k

    def build(self, input_shape):
        # The soft mixture's layout: experts before units.
        expert_shape = (self.n_experts, self.units)
        init = keras.initializers.RandomUniform(-0.05, 0.05)
        self.expert_kernel, self.expert_bias = kernel_and_bias(
            self, "e", (input_shape[-1],) + expert_shape, expert_shape, init
        )
        self.router = routing.TopKRouter(
            self.n_experts, self.top_k, use_bias=True, name="router"
        )
        self.router.build((None, input_shape[-1]))

    def experts(self, rows, layout):
        kernel = layout.select(ops.moveaxis(self.expert_kernel, 1, 0))
        h = layout.matmul(rows, ops.cast(kernel, rows.dtype))
        h = h + layout.broadcast(ops.cast(layout.select(self.expert_bias), h.dtype))
        return self.expert_activation(h)

    def call(self, inputs, training=None):
        tokens = ops.reshape(inputs, (-1, inputs.shape[-1]))
        weights, experts = self.router(tokens, training=training)
        outputs = self.router.dispatch(
            tokens, weights, experts, self.experts, training=training
        )
        return ops.reshape(outputs, ops.shape(inputs)[:-1] + (self.units,))


def capacity_tiers(layer, inputs):
    """`layer` (a `DenseMoE` with `top_k`), built on `inputs`, whose router
    takes the dropless capacity tiers (an `ops.cond` over buffers of 1.25,
    1.5, 2x the mean load, then the blocks) in training calls too: what
    `layout="auto"` did there before the blocks. (`MoEFeedForward` takes
    `layout="tiers"`; `DenseMoE` has no `layout` argument: its router's
    public `layout` is set.)"""
    layer.build(inputs.shape)
    layer.router.layout = "tiers"
    return layer


class GatedFeedForward(keras.layers.Layer):
    """Dense gated feed-forward `down(silu(x Wg) * (x Wu))`, no biases."""

    def __init__(self, hidden_dim, intermediate_dim, **kw):
        super().__init__(**kw)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim

    def build(self, input_shape):
        d, m = self.hidden_dim, self.intermediate_dim
        init = "glorot_uniform"
        self.gate = self.add_weight(shape=(d, m), initializer=init, name="gate")
        self.up = self.add_weight(shape=(d, m), initializer=init, name="up")
        self.down = self.add_weight(shape=(m, d), initializer=init, name="down")

    def call(self, inputs, training=None):
        hidden = ops.silu(ops.matmul(inputs, self.gate)) * ops.matmul(inputs, self.up)
        return ops.matmul(hidden, self.down)


def _cifar10(conv, dense, input_shape=(32, 32, 3), widths=(32, 64, 512)):
    c1, c2, d = widths
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            conv(c1, "same"),
            conv(c1, "valid"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            conv(c2, "same"),
            conv(c2, "valid"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            dense(d),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )


def cifar10_cnn(**kw):
    """The original CIFAR-10 CNN (Conv 32-32, pool, Conv 64-64, pool, Dense 512)."""
    return _cifar10(
        lambda n, pad: keras.layers.Conv2D(n, 3, padding=pad, activation="relu"),
        lambda n: keras.layers.Dense(n, activation="relu"),
        **kw,
    )


def cifar10_moe(**kw):
    """The original CIFAR-10 MoE network: 2 experts per filter / unit."""
    from keras_moe import Conv2DMoE
    from keras_moe import DenseMoE

    moe = {"expert_activation": "relu", "gating_activation": "softmax"}
    return _cifar10(
        lambda n, pad: Conv2DMoE(n, 2, (3, 3), padding=pad, **moe),
        lambda n: DenseMoE(n, 2, **moe),
        **kw,
    )
