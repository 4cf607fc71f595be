import keras

from keras_moe.layers.base_conv_moe import BaseConvMoE


@keras.saving.register_keras_serializable(package="keras_moe")
class Conv1DMoE(BaseConvMoE):
    """1D convolutional mixture-of-experts layer, usable where `Conv1D` is.

    Each output filter `f` is a gated mixture of `n_experts_per_filter`
    expert convolutions:
    `y_f = sum_k g(z_{f,k}) * a(W_{f,k} * x + c_{f,k})`,
    with `a` the `expert_activation` and `g` the `gating_activation`
    applied over the experts of each filter. The gate logits `z` depend on
    `gating_input`: `"flatten"` (the original) is a dense projection of the
    whole input sample, `z_{f,k} = v_{f,k} . vec(x) + b_{f,k}`, so the
    input's non-batch axes must all be defined; `"pooled"` projects the
    global spatial mean, `z_{f,k} = v_{f,k} . mean_s(x_s) + b_{f,k}` (as
    CondConv does); `"local"` gives a gate per output position,
    `z_{s,f,k} = (V_{f,k} * x)_s + b_{f,k}`, a convolution with the experts'
    kernel size, strides, padding and dilation. `"pooled"` and `"local"`
    accept any spatial size with one set of weights.

    Args:
        n_filters: Positive integer, number of output filters.
        n_experts_per_filter: Positive integer, experts mixed per filter.
        kernel_size: Integer or tuple of 1 integers.
        strides: Integer or tuple of 1 integers (default 1).
        padding: `"valid"` or `"same"` (`"causal"` gives outputs that see only past and present steps).
        data_format: `"channels_last"` or `"channels_first"` (default:
            `keras.config.image_data_format()`).
        dilation_rate: Integer or tuple of 1 integers (default 1).
        expert_activation: Activation of each expert (`None`: linear).
        gating_activation: Activation of the gate logits over the experts of
            each filter (`None`: linear, as in the original; `"softmax"` is
            usual).
        use_expert_bias: Whether experts have a bias.
        use_gating_bias: Whether the gates have a bias.
        expert_kernel_initializer_scale: Scale of the experts' normal
            initialisation, std `scale / sqrt(in_channels *
            prod(kernel_size))`.
        gating_kernel_initializer_scale: Scale of the gates' normal
            initialisation, std `scale / sqrt(fan_in)`, `fan_in` the gating
            kernel's size over its first axes (`prod(input_shape[1:])`,
            `in_channels` or `in_channels * prod(kernel_size)`).
        expert_bias_initializer: Initializer of the experts' bias.
        gating_bias_initializer: Initializer of the gating bias.
        expert_kernel_regularizer: Regularizer of the experts' kernel.
        gating_kernel_regularizer: Regularizer of the gating kernel.
        expert_bias_regularizer: Regularizer of the experts' bias.
        gating_bias_regularizer: Regularizer of the gating bias.
        expert_kernel_constraint: Constraint of the experts' kernel.
        gating_kernel_constraint: Constraint of the gating kernel.
        expert_bias_constraint: Constraint of the experts' bias.
        gating_bias_constraint: Constraint of the gating bias.
        activity_regularizer: Regularizer of the layer's output.
        gating_input: `"flatten"` (default), `"pooled"` or `"local"`: what
            the gates see (above).
        mixed_kernel: `None` (automatic), `True` or `False`: whether linear
            experts under `"pooled"` gates run as one mixed kernel per sample
            (`mixed_kernel_outputs`, the same outputs at about `1 / k` of the
            experts' FLOPs). Automatic takes it from
            `MIXED_KERNEL_MIN_EXPERTS` experts per filter, where it measured
            faster. It needs linear experts and `"pooled"` gating (`True`
            without them is refused) and static spatial sizes (with dynamic
            ones the general path runs).
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of rank 3.
        training: Python bool; accepted for `stateless_call` and `fit`.

    Input shape:
        3D tensor `(batch, *spatial, channels)` (channels_last) or
        `(batch, channels, *spatial)` (channels_first).

    Output shape:
        3D tensor with `n_filters` channels and the spatial size a
        `Conv1D` with the same arguments would give.

    Weights:
        `expert_kernel` `kernel_size + (in_channels, n_filters * n_experts_per_filter)`,
        `expert_bias` and `gating_bias` `(n_filters, n_experts_per_filter)`,
        `gating_kernel` `input_shape[1:] + (n_filters, n_experts_per_filter)`
        (`"flatten"`), `(in_channels, n_filters, n_experts_per_filter)`
        (`"pooled"`) or
        `kernel_size + (in_channels, n_filters, n_experts_per_filter)`
        (`"local"`).

    Example:

    >>> import numpy as np
    >>> from keras_moe import Conv1DMoE
    >>> layer = Conv1DMoE(4, 2, 3, expert_activation="relu",
    ...                   gating_activation="softmax")
    >>> tuple(layer(np.ones((2, 16, 3), "float32")).shape)
    (2, 14, 4)

    `"pooled"` and `"local"` gating take inputs of any spatial size:

    >>> layer = Conv1DMoE(4, 2, 3, gating_input="pooled")
    >>> tuple(layer(np.ones((2, 16, 3), "float32")).shape)
    (2, 14, 4)
    >>> tuple(layer(np.ones((2, 40, 3), "float32")).shape)
    (2, 38, 4)

    References:
        - Orhan, "mixture-of-experts" Keras 2 layers (the original
          `Conv1DMoE` re-implemented here).
    """

    def __init__(
        self,
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
            rank=1,
            n_filters=n_filters,
            n_experts_per_filter=n_experts_per_filter,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            gating_input=gating_input,
            mixed_kernel=mixed_kernel,
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
