import itertools
import math

import keras
from keras import ops

from keras_moe import routing
from keras_moe import utils
from keras_moe.layers.base_moe import BaseMoE

GATING_INPUTS = ("flatten", "pooled", "local")

# From this many experts per filter, linear experts under "pooled" gates take
# the mixed-kernel path by default. benchmarks/conv_gating.py, forward+backward
# against the general path: with 8 experts per filter 0.42-0.62x on JAX,
# 0.79-1.04x on TensorFlow, 0.35-0.94x on PyTorch; with 4, 0.82-1.20x on JAX
# and 1.5-1.7x on TensorFlow and PyTorch; with 2, slower everywhere.
MIXED_KERNEL_MIN_EXPERTS = 8


def conv_output_length(length, kernel_size, stride, padding, dilation):
    """Output length of one spatial axis (`None` stays `None`)."""
    if length is None:
        return None
    if padding in ("same", "causal"):
        return (length + stride - 1) // stride
    effective = dilation * (kernel_size - 1) + 1
    return (length - effective) // stride + 1


def check_padding(padding, rank):
    """`padding`, lower-cased: `"valid"`, `"same"`, or `"causal"` in 1D."""
    paddings = {"valid", "same", "causal"} if rank == 1 else {"valid", "same"}
    if rank > 1 and isinstance(padding, str) and padding.lower() == "causal":
        raise ValueError(
            f"`padding` must be 'valid' or 'same' for a {rank}D layer "
            f"('causal' is only for `Conv1DMoE`). Received: padding={padding!r}"
        )
    return utils.check_choice("padding", padding, paddings)


def check_mixed_kernel(mixed_kernel, gating_input, expert_activation):
    """`mixed_kernel` (`None`, `True` or `False`); `True` needs linear
    experts under `"pooled"` gates."""
    if mixed_kernel is None:
        return None
    mixed_kernel = utils.check_bool("mixed_kernel", mixed_kernel)
    if mixed_kernel and (
        gating_input != "pooled" or expert_activation is not keras.activations.linear
    ):
        raise ValueError(
            "`mixed_kernel=True` mixes the experts' kernels, which needs "
            "linear experts (`expert_activation=None`) under per-sample "
            "gates (`gating_input='pooled'`). Received: mixed_kernel=True, "
            f"gating_input={gating_input!r}, expert_activation="
            f"{keras.activations.serialize(expert_activation)!r}"
        )
    return mixed_kernel


class BaseConvMoE(BaseMoE):
    """Private N-D base of `Conv1DMoE`, `Conv2DMoE` and `Conv3DMoE`.

    Output filter `f` is `sum_k g(z_{f,k}) * a(W_{f,k} * x + c_{f,k})`, with the
    gate logits `z` from `gating_input`:

    - `"flatten"` (the original): `z_{f,k} = v_{f,k} . vec(x) + b_{f,k}`, one
      gate per sample from the whole input; needs a fully defined input shape.
    - `"pooled"`: `z_{f,k} = v_{f,k} . mean_s(x_s) + b_{f,k}`, one gate per
      sample from the global spatial mean (CondConv, Dynamic Convolution).
    - `"local"`: `z_{s,f,k} = (V_{f,k} * x)_s + b_{f,k}`, one gate per output
      position from a convolution with the experts' geometry.

    All `n_filters * n_experts_per_filter` expert convolutions run as one
    convolution; output channel `f * n_experts_per_filter + k` is expert `k`
    of filter `f` (the original layers' order). The gates of the soft mixture
    come from the routing core.

    Internally the layer works channels-last (inputs given channels-first are
    transposed once on the way in and out), which every backend supports on
    every device.
    """

    def __init__(
        self,
        rank,
        n_filters,
        n_experts_per_filter,
        kernel_size,
        strides=1,
        padding="valid",
        data_format=None,
        dilation_rate=1,
        expert_activation=None,
        gating_activation=None,
        use_expert_bias=True,
        use_gating_bias=True,
        expert_kernel_initializer_scale=1.0,
        gating_kernel_initializer_scale=1.0,
        expert_bias_initializer="zeros",
        gating_bias_initializer="zeros",
        expert_kernel_regularizer=None,
        gating_kernel_regularizer=None,
        expert_bias_regularizer=None,
        gating_bias_regularizer=None,
        expert_kernel_constraint=None,
        gating_kernel_constraint=None,
        expert_bias_constraint=None,
        gating_bias_constraint=None,
        activity_regularizer=None,
        gating_input="flatten",
        mixed_kernel=None,
        **kwargs,
    ):
        super().__init__(
            expert_activation=expert_activation,
            gating_activation=gating_activation,
            use_expert_bias=use_expert_bias,
            use_gating_bias=use_gating_bias,
            expert_kernel_initializer_scale=expert_kernel_initializer_scale,
            gating_kernel_initializer_scale=gating_kernel_initializer_scale,
            expert_bias_initializer=expert_bias_initializer,
            gating_bias_initializer=gating_bias_initializer,
            expert_kernel_regularizer=expert_kernel_regularizer,
            gating_kernel_regularizer=gating_kernel_regularizer,
            expert_bias_regularizer=expert_bias_regularizer,
            gating_bias_regularizer=gating_bias_regularizer,
            expert_kernel_constraint=expert_kernel_constraint,
            gating_kernel_constraint=gating_kernel_constraint,
            expert_bias_constraint=expert_bias_constraint,
            gating_bias_constraint=gating_bias_constraint,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.rank = rank
        self.n_filters = utils.check_positive_int("n_filters", n_filters)
        self.n_experts_per_filter = utils.check_positive_int(
            "n_experts_per_filter", n_experts_per_filter
        )
        self.kernel_size = utils.check_int_tuple("kernel_size", kernel_size, rank)
        self.strides = utils.check_int_tuple("strides", strides, rank)
        self.dilation_rate = utils.check_int_tuple("dilation_rate", dilation_rate, rank)
        self.padding = check_padding(padding, rank)
        if data_format is None:
            data_format = keras.config.image_data_format()
        self.data_format = utils.check_choice(
            "data_format", data_format, {"channels_last", "channels_first"}
        )
        self.gating_input = utils.check_choice(
            "gating_input", gating_input, set(GATING_INPUTS)
        )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` cannot be combined with `dilation_rate > 1`. "
                f"Received: strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=rank + 2)
        self.mixed_kernel = check_mixed_kernel(
            mixed_kernel, self.gating_input, self.expert_activation
        )

    @property
    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def _spatial_shape(self, input_shape):
        if self.data_format == "channels_last":
            return tuple(input_shape[1:-1])
        return tuple(input_shape[2:])

    def _check_input_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != self.rank + 2:
            raise ValueError(
                f"`{type(self).__name__}` expects inputs of rank {self.rank + 2} "
                f"(batch, {self.rank} spatial axes and channels). "
                f"Received: input_shape={input_shape}"
            )
        if input_shape[self._channel_axis] is None:
            raise ValueError(
                "The channel axis of the input must be defined "
                f"(data_format={self.data_format!r}). Received: input_shape={input_shape}"
            )
        if self.padding == "valid":
            for size, k, d in zip(
                self._spatial_shape(input_shape), self.kernel_size, self.dilation_rate
            ):
                if size is not None and size < d * (k - 1) + 1:
                    raise ValueError(
                        "`kernel_size` (dilated by `dilation_rate`) is larger than "
                        "the input with padding='valid'. Received: "
                        f"kernel_size={self.kernel_size}, "
                        f"dilation_rate={self.dilation_rate}, input_shape={input_shape}"
                    )
        return input_shape

    def build(self, input_shape):
        input_shape = self._check_input_shape(input_shape)
        in_channels = input_shape[self._channel_axis]
        if self.gating_input == "flatten":
            if any(size is None for size in input_shape[1:]):
                raise ValueError(
                    f"`{type(self).__name__}` gates each filter with a dense "
                    "projection of the whole input sample, which needs every "
                    "non-batch axis defined; `gating_input='pooled'` or "
                    "`gating_input='local'` accept any spatial size. Received: "
                    f"input_shape={input_shape}, gating_input='flatten'"
                )
            gating_fan_in = tuple(input_shape[1:])
        elif self.gating_input == "pooled":
            gating_fan_in = (in_channels,)
        else:
            gating_fan_in = self.kernel_size + (in_channels,)
        n_out = self.n_filters * self.n_experts_per_filter
        expert_std = self.expert_kernel_initializer_scale / math.sqrt(
            in_channels * math.prod(self.kernel_size)
        )
        gating_std = self.gating_kernel_initializer_scale / math.sqrt(
            math.prod(gating_fan_in)
        )
        gates_shape = (self.n_filters, self.n_experts_per_filter)
        self._add_moe_weights(
            expert_kernel_shape=self.kernel_size + (in_channels, n_out),
            expert_kernel_initializer=keras.initializers.RandomNormal(
                stddev=expert_std
            ),
            expert_bias_shape=gates_shape,
            gating_kernel_shape=gating_fan_in + gates_shape,
            gating_kernel_initializer=keras.initializers.RandomNormal(
                stddev=gating_std
            ),
            gating_bias_shape=gates_shape,
        )
        if self.gating_input == "flatten":
            # The gates read the whole sample: only the built shape fits them
            # (another size would be folded into other samples, or fail).
            self.input_spec = keras.layers.InputSpec(shape=(None,) + input_shape[1:])
        else:
            axes = {self._channel_axis: in_channels}
            self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes=axes)

    def _to_channels_last(self, x):
        if self.data_format == "channels_first":
            return ops.moveaxis(x, 1, -1)
        return x

    def _from_channels_last(self, x):
        if self.data_format == "channels_first":
            return ops.moveaxis(x, -1, 1)
        return x

    def _convolve(self, x, kernel):
        """Channels-last convolution with the layer's geometry (causal included)."""
        padding = self.padding
        if padding == "causal":
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            x = ops.pad(x, ((0, 0), (left, 0), (0, 0)))
            padding = "valid"
        return ops.conv(
            x,
            kernel,
            strides=self.strides,
            padding=padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )

    def expert_outputs(self, x):
        """All experts at once: channels-last `x` -> `(b, *spatial, f, k)`."""
        h = self._convolve(x, self.expert_kernel)
        h = ops.reshape(
            h, ops.shape(h)[:-1] + (self.n_filters, self.n_experts_per_filter)
        )
        if self.expert_bias is not None:
            h = h + self.expert_bias
        return self.expert_activation(h)

    def gate_logits(self, inputs):
        """Float32 gate logits of `inputs` (in the layer's data format).

        `(b, f, k)` for `"flatten"` and `"pooled"`, `(b, *spatial_out, f, k)`
        for `"local"`.
        """
        n_gates = self.n_filters * self.n_experts_per_filter
        gates_shape = (self.n_filters, self.n_experts_per_filter)
        bias = None
        if self.gating_bias is not None:
            bias = ops.reshape(self.gating_bias, (n_gates,))
        if self.gating_input == "local":
            # Router arithmetic in float32, as in `routing.gate_logits`.
            x = self._to_channels_last(ops.cast(inputs, "float32"))
            kernel = ops.reshape(
                ops.cast(self.gating_kernel, "float32"),
                self.gating_kernel.shape[:-2] + (n_gates,),
            )
            logits = self._convolve(x, kernel)
            if bias is not None:
                logits = logits + ops.cast(bias, "float32")
            return ops.reshape(logits, ops.shape(logits)[:-1] + gates_shape)
        kernel = ops.reshape(self.gating_kernel, (-1, n_gates))
        if self.gating_input == "pooled":
            spatial_axes = tuple(range(1, self.rank + 1))
            if self.data_format == "channels_first":
                spatial_axes = tuple(range(2, self.rank + 2))
            features = ops.mean(ops.cast(inputs, "float32"), axis=spatial_axes)
        else:
            features = ops.reshape(inputs, (-1, kernel.shape[0]))
        logits = routing.gate_logits(features, kernel, bias)
        return ops.reshape(logits, (-1,) + gates_shape)

    def _explicit_padding(self, spatial):
        """`(before, after)` zero padding of each spatial axis of size `spatial`."""
        pads = []
        for n, k, s, d in zip(
            spatial, self.kernel_size, self.strides, self.dilation_rate
        ):
            effective = d * (k - 1) + 1
            if self.padding == "valid":
                pads.append((0, 0))
            elif self.padding == "causal":
                pads.append((effective - 1, 0))
            else:
                total = max((-(-n // s) - 1) * s + effective - n, 0)
                pads.append((total // 2, total - total // 2))
        return pads

    def mixed_kernel_outputs(self, x, gates):
        """Linear experts under per-sample gates as one mixed kernel per sample.

        The CondConv identity: with a linear `a` and gates `g_{b,f,k}` shared
        by every position, `sum_k g (W_{f,k} * x + c_{f,k})` equals
        `(sum_k g W_{f,k}) * x + sum_k g c_{f,k}`, which costs `1 / k` of the
        experts' convolution. The per-sample convolution runs as one batched
        matmul per kernel tap (`prod(kernel_size)` of them, unrolled when
        traced) on the shifted input: a grouped convolution with the batch
        folded into the channels measured 23-109x slower than the general
        path on CPU (JAX). Needs static spatial sizes. Used by default from
        `MIXED_KERNEL_MIN_EXPERTS` experts per filter, where it measured
        faster on every backend (`mixed_kernel`).

        Args:
            x: Channels-last input `(b, *spatial, in_channels)`.
            gates: `(b, f, k)` gate values.

        Returns:
            `(b, *spatial_out, f)` in the compute dtype.
        """
        spatial = tuple(x.shape[1:-1])
        in_channels = x.shape[-1]
        gates = ops.cast(gates, self.compute_dtype)
        # Einsum letters: `xyz` kernel (or spatial) axes, `c` in channels,
        # `b` batch, `f` filters, `k` experts per filter.
        axes = "xyz"[: self.rank]
        kernel = ops.reshape(
            self.expert_kernel,
            self.kernel_size + (in_channels, self.n_filters, self.n_experts_per_filter),
        )
        kernel = ops.einsum(f"{axes}cfk,bfk->b{axes}cf", kernel, gates)
        pads = self._explicit_padding(spatial)
        x = ops.pad(x, [(0, 0)] + pads + [(0, 0)])
        out_sizes = [
            (n + p0 + p1 - d * (k - 1) - 1) // s + 1
            for n, (p0, p1), k, s, d in zip(
                spatial, pads, self.kernel_size, self.strides, self.dilation_rate
            )
        ]
        outputs = None
        for tap in itertools.product(*(range(k) for k in self.kernel_size)):
            window = tuple(
                slice(t * d, t * d + (n - 1) * s + 1, s)
                for t, n, s, d in zip(tap, out_sizes, self.strides, self.dilation_rate)
            )
            term = ops.einsum(
                f"b{axes}c,bcf->b{axes}f",
                x[(slice(None),) + window],
                kernel[(slice(None),) + tap],
            )
            outputs = term if outputs is None else outputs + term
        if self.expert_bias is not None:
            bias = ops.einsum("fk,bfk->bf", self.expert_bias, gates)
            outputs = outputs + ops.reshape(
                bias, (-1,) + (1,) * self.rank + (self.n_filters,)
            )
        return outputs

    def _uses_mixed_kernel(self, inputs):
        wanted = self.mixed_kernel
        if wanted is None:
            wanted = self.n_experts_per_filter >= MIXED_KERNEL_MIN_EXPERTS
        return (
            wanted
            and self.gating_input == "pooled"
            and self.expert_activation is keras.activations.linear
            and None not in tuple(inputs.shape[1:])
        )

    def call(self, inputs, training=None):
        inputs = self._to_compute_dtype(inputs)
        if inputs.shape[0] == 0:
            # An empty batch gives an empty output, as `Conv2D` does:
            # TensorFlow's CPU convolution returns its input unchanged there.
            return ops.zeros(self.compute_output_shape(inputs.shape), inputs.dtype)
        gates_shape = (self.n_filters, self.n_experts_per_filter)
        logits = self.gate_logits(inputs)
        if self.gating_input == "local":
            # (b, s, f, k): TensorFlow's CPU softmax takes at most rank 5.
            spatial = logits.shape[1:-2]
            positions = -1 if None in spatial else math.prod(spatial)
            logits = ops.reshape(
                logits, (ops.shape(logits)[0], positions) + gates_shape
            )
        gates = routing.gate_values(logits, self.gating_activation)
        if self._uses_mixed_kernel(inputs):
            outputs = self.mixed_kernel_outputs(self._to_channels_last(inputs), gates)
            return self._from_channels_last(outputs)
        h = self.expert_outputs(self._to_channels_last(inputs))
        if self.gating_input == "local":
            gates = ops.reshape(gates, ops.shape(h))
        outputs = routing.soft_mixture_per_filter(h, gates)
        return self._from_channels_last(outputs)

    def expert_weight_axes(self):
        """Weight name -> its filters axis (`keras_moe.expert_parallel_layout_map`).

        Expert parallelism splits the filters, each with all its experts:
        channel `f * n_experts_per_filter + k` of the kernel is expert `k` of
        filter `f`, and the gates of different filters never meet.
        """
        gating_axis = 1 if self.gating_input == "pooled" else self.rank + 1
        return {
            "expert_kernel": self.rank + 1,
            "expert_bias": 0,
            "gating_kernel": gating_axis,
            "gating_bias": 0,
        }

    def compute_output_shape(self, input_shape):
        input_shape = self._check_input_shape(input_shape)
        spatial = tuple(
            conv_output_length(size, k, s, self.padding, d)
            for size, k, s, d in zip(
                self._spatial_shape(input_shape),
                self.kernel_size,
                self.strides,
                self.dilation_rate,
            )
        )
        if self.data_format == "channels_last":
            return (input_shape[0],) + spatial + (self.n_filters,)
        return (input_shape[0], self.n_filters) + spatial

    def get_config(self):
        config = {
            "n_filters": self.n_filters,
            "n_experts_per_filter": self.n_experts_per_filter,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "gating_input": self.gating_input,
            "mixed_kernel": self.mixed_kernel,
        }
        return {**super().get_config(), **config}
