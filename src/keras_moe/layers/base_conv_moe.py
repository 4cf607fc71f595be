import math

import keras
from keras import ops

from keras_moe import routing
from keras_moe import utils
from keras_moe.layers.base_moe import BaseMoE


def conv_output_length(length, kernel_size, stride, padding, dilation):
    """Output length of one spatial axis (`None` stays `None`)."""
    if length is None:
        return None
    if padding in ("same", "causal"):
        return (length + stride - 1) // stride
    effective = dilation * (kernel_size - 1) + 1
    return (length - effective) // stride + 1


class BaseConvMoE(BaseMoE):
    """Private N-D base of `Conv1DMoE`, `Conv2DMoE` and `Conv3DMoE`.

    Output filter `f` is `sum_k g(v_{f,k} . vec(x) + b_{f,k}) * a(W_{f,k} * x + c_{f,k})`.

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rank = rank
        self.n_filters = utils.check_positive_int("n_filters", n_filters)
        self.n_experts_per_filter = utils.check_positive_int(
            "n_experts_per_filter", n_experts_per_filter
        )
        self.kernel_size = utils.check_int_tuple("kernel_size", kernel_size, rank)
        self.strides = utils.check_int_tuple("strides", strides, rank)
        self.dilation_rate = utils.check_int_tuple("dilation_rate", dilation_rate, rank)
        paddings = {"valid", "same", "causal"} if rank == 1 else {"valid", "same"}
        self.padding = utils.check_choice("padding", padding, paddings)
        if data_format is None:
            data_format = keras.config.image_data_format()
        self.data_format = utils.check_choice(
            "data_format", data_format, {"channels_last", "channels_first"}
        )
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(
                "`strides > 1` cannot be combined with `dilation_rate > 1`. "
                f"Received: strides={self.strides}, dilation_rate={self.dilation_rate}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=rank + 2)

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
        if any(size is None for size in input_shape[1:]):
            raise ValueError(
                f"`{type(self).__name__}` gates each filter with a dense projection "
                "of the whole input sample, which needs every non-batch axis "
                f"defined. Received: input_shape={input_shape}"
            )
        in_channels = input_shape[self._channel_axis]
        n_out = self.n_filters * self.n_experts_per_filter
        expert_std = self.expert_kernel_initializer_scale / math.sqrt(
            in_channels * math.prod(self.kernel_size)
        )
        gating_std = self.gating_kernel_initializer_scale / math.sqrt(
            math.prod(input_shape[1:])
        )
        self._add_moe_weights(
            expert_kernel_shape=self.kernel_size + (in_channels, n_out),
            expert_kernel_initializer=keras.initializers.RandomNormal(
                stddev=expert_std
            ),
            gating_kernel_shape=tuple(input_shape[1:])
            + (self.n_filters, self.n_experts_per_filter),
            gating_kernel_initializer=keras.initializers.RandomNormal(
                stddev=gating_std
            ),
            expert_bias_shape=(self.n_filters, self.n_experts_per_filter),
            gating_bias_shape=(self.n_filters, self.n_experts_per_filter),
        )
        axes = {self._channel_axis: in_channels}
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes=axes)
        self.built = True

    def _to_channels_last(self, x):
        if self.data_format == "channels_first":
            return ops.moveaxis(x, 1, -1)
        return x

    def _from_channels_last(self, x):
        if self.data_format == "channels_first":
            return ops.moveaxis(x, -1, 1)
        return x

    def expert_outputs(self, x):
        """All experts at once: channels-last `x` -> `(b, *spatial, f, k)`."""
        padding = self.padding
        if padding == "causal":
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            x = ops.pad(x, ((0, 0), (left, 0), (0, 0)))
            padding = "valid"
        h = ops.conv(
            x,
            self.expert_kernel,
            strides=self.strides,
            padding=padding,
            data_format="channels_last",
            dilation_rate=self.dilation_rate,
        )
        h = ops.reshape(
            h, ops.shape(h)[:-1] + (self.n_filters, self.n_experts_per_filter)
        )
        if self.expert_bias is not None:
            h = h + self.expert_bias
        return self.expert_activation(h)

    def gate_logits(self, inputs):
        """Gate logits `(b, f, k)` from the whole input sample (original layout)."""
        n_gates = self.n_filters * self.n_experts_per_filter
        kernel = ops.reshape(self.gating_kernel, (-1, n_gates))
        flat = ops.reshape(inputs, (-1, kernel.shape[0]))
        bias = None
        if self.gating_bias is not None:
            bias = ops.reshape(self.gating_bias, (n_gates,))
        logits = routing.gate_logits(flat, kernel, bias)
        return ops.reshape(logits, (-1, self.n_filters, self.n_experts_per_filter))

    def call(self, inputs, training=None):
        gates = routing.gate_values(self.gate_logits(inputs), self.gating_activation)
        h = self.expert_outputs(self._to_channels_last(inputs))
        spatial = ops.shape(h)[1:-2]
        h = ops.reshape(
            h, (ops.shape(h)[0], -1, self.n_filters, self.n_experts_per_filter)
        )
        outputs = routing.soft_mixture_per_filter(h, gates)
        outputs = ops.reshape(outputs, (ops.shape(h)[0],) + spatial + (self.n_filters,))
        return self._from_channels_last(outputs)

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
        }
        return {**super().get_config(), **config}
