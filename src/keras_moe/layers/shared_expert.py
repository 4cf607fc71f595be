"""`SharedExpert`: the expert every token runs through, a sublayer of
`MoEFeedForward` (Qwen MoE's `shared_expert`)."""

import keras
from keras import ops

from keras_moe import utils
from keras_moe.layers import expert_functions


@keras.saving.register_keras_serializable(package="keras_moe")
class SharedExpert(keras.layers.Layer):
    """A dense feed-forward expert, optionally behind a sigmoid gate.

    `y = down(act(x . gate) * (x . up))` when `gated`, else
    `down(act(x . up))` (with biases when `use_bias`); with `output_gate`,
    `y * sigmoid(x . g)` for a learned `(d, 1)` kernel `g` (Qwen MoE's
    `shared_expert_gate`). `MoEFeedForward(shared_intermediate_dim=...)`
    creates one in `build()`, with its routed experts' options.

    Args:
        intermediate_dim: Positive integer, the hidden size.
        activation: Activation of the hidden layer (or `"gelu_tanh"`).
        gated: Whether it is a gated linear unit.
        use_bias: Whether `up`, `gate` and `down` have biases.
        output_gate: Whether its output is multiplied by `sigmoid(x . g)`.
        activation_dtype: `None` or `"float32"`, the dtype of the activation.
        swiglu_limit: `None`, or GPT-OSS's clamped SwiGLU's limit (gated).
        swiglu_alpha: The clamped SwiGLU's `alpha`.
        kernel_initializer: Initializer of the kernels; each kernel draws
            its own values, also from a seeded initializer
            (`keras_moe.utils.initializer_for`).
        bias_initializer: Initializer of the biases, each drawing its own
            values.
        kernel_regularizer: Regularizer of the kernels.
        bias_regularizer: Regularizer of the biases.
        kernel_constraint: Constraint of the kernels.
        bias_constraint: Constraint of the biases.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Input shape:
        N-D tensor `(..., d)`.

    Output shape:
        Same as the input.

    Weights: the `keras.layers.Dense` sublayers `up`, `gate` (when gated),
    `down` and `output_gate_dense` (with `output_gate`, no bias).

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers.shared_expert import SharedExpert
    >>> layer = SharedExpert(8, gated=True, output_gate=True)
    >>> tuple(layer(np.ones((2, 3, 4), "float32")).shape)
    (2, 3, 4)
    """

    def __init__(
        self,
        intermediate_dim,
        activation="gelu",
        gated=False,
        use_bias=True,
        output_gate=False,
        activation_dtype=None,
        swiglu_limit=None,
        swiglu_alpha=1.702,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = utils.check_positive_int(
            "intermediate_dim", intermediate_dim
        )
        self.activation = utils.get_activation("activation", activation)
        self.gated = utils.check_bool("gated", gated)
        self.use_bias = utils.check_bool("use_bias", use_bias)
        self.output_gate = utils.check_bool("output_gate", output_gate)
        self.activation_dtype = None
        if activation_dtype is not None:
            self.activation_dtype = utils.check_choice(
                "activation_dtype", activation_dtype, ("float32",)
            )
        self.swiglu_limit = None
        if swiglu_limit is not None:
            self.swiglu_limit = utils.check_positive_float("swiglu_limit", swiglu_limit)
        self.swiglu_alpha = utils.check_positive_float("swiglu_alpha", swiglu_alpha)
        if self.swiglu_limit is not None and not self.gated:
            raise ValueError(
                "`swiglu_limit` applies to gated experts only (`gated=True`). "
                f"Received: swiglu_limit={swiglu_limit!r}, gated=False"
            )
        self.kernel_initializer = utils.get_initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = utils.get_initializer(
            "bias_initializer", bias_initializer
        )
        self.kernel_regularizer = utils.get_regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = utils.get_regularizer(
            "bias_regularizer", bias_regularizer
        )
        self.kernel_constraint = utils.get_constraint(
            "kernel_constraint", kernel_constraint
        )
        self.bias_constraint = utils.get_constraint("bias_constraint", bias_constraint)
        self.up = None
        self.gate = None
        self.down = None
        self.output_gate_dense = None
        self.supports_masking = True

    def _dense(self, units, name, use_bias, input_dim):
        layer = keras.layers.Dense(
            units,
            use_bias=use_bias,
            kernel_initializer=utils.initializer_for(
                self.kernel_initializer, f"{name}/kernel"
            ),
            bias_initializer=utils.initializer_for(
                self.bias_initializer, f"{name}/bias"
            ),
            kernel_regularizer=self.kernel_regularizer,
            bias_regularizer=self.bias_regularizer,
            kernel_constraint=self.kernel_constraint,
            bias_constraint=self.bias_constraint,
            dtype=self.dtype_policy,
            name=name,
        )
        # Made frozen in a frozen layer: it does not train either.
        layer.trainable = self.trainable
        layer.build((None, input_dim))
        return layer

    def build(self, input_shape):
        d, m = tuple(input_shape)[-1], self.intermediate_dim
        if d is None:
            raise ValueError(
                "`SharedExpert` expects an input with a defined last axis. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.up = self._dense(m, "up", self.use_bias, d)
        if self.gated:
            self.gate = self._dense(m, "gate", self.use_bias, d)
        self.down = self._dense(d, "down", self.use_bias, m)
        if self.output_gate:
            self.output_gate_dense = self._dense(1, "output_gate_dense", False, d)

    def call(self, inputs):
        h = self.up(inputs)
        if self.gate is not None:
            h = expert_functions.gated_unit(
                self.gate(inputs),
                h,
                self.activation,
                self.activation_dtype,
                self.swiglu_limit,
                self.swiglu_alpha,
            )
        else:
            h = expert_functions.activate(h, self.activation, self.activation_dtype)
        y = self.down(h)
        if self.output_gate_dense is not None:
            y = y * ops.sigmoid(self.output_gate_dense(inputs))
        return y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {
            "intermediate_dim": self.intermediate_dim,
            "activation": keras.activations.serialize(self.activation),
            "gated": self.gated,
            "use_bias": self.use_bias,
            "output_gate": self.output_gate,
            "activation_dtype": self.activation_dtype,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
        }
        return {**super().get_config(), **config}
