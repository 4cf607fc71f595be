import math

import keras
from keras import ops

from keras_moe import routing
from keras_moe import utils
from keras_moe.layers.base_moe import BaseMoE


@keras.saving.register_keras_serializable(package="keras_moe")
class DenseMoE(BaseMoE):
    """Densely connected mixture-of-experts layer, usable where `Dense` is.

    `y = sum_k g(v_k . x + b_k) * f(W_k x + c_k)`

    where `f` is `expert_activation`, `g` is `gating_activation` (applied over
    the experts axis, so `"softmax"` gates sum to one), `W_k`, `c_k` are the
    kernel and bias of expert `k` and `v_k`, `b_k` its gating weights. The
    layer acts on the last axis of an input of any rank >= 2, like `Dense`.

    All experts come from one matmul with the kernel viewed as
    `(input_dim, n_experts * units)`; the gate logits are computed in float32.

    Args:
        units: Positive integer, dimensionality of the output space.
        n_experts: Positive integer, number of experts.
        expert_activation: Activation of each expert (`None`: linear).
        gating_activation: Activation of the gate logits over the experts
            axis (`None`: linear, as in the original; `"softmax"` is usual).
        use_expert_bias: Whether experts have a bias vector.
        use_gating_bias: Whether the gates have a bias.
        expert_kernel_initializer_scale: Scale of the experts' uniform
            initialisation, in `+-sqrt(3 * scale / max(1, (fan_in + units) / 2))`.
        gating_kernel_initializer_scale: Scale of the gates' uniform
            initialisation, in `+-sqrt(3 * scale / max(1, (fan_in + 1) / 2))`.
        expert_bias_initializer: Initializer of the experts' bias.
        gating_bias_initializer: Initializer of the gating bias.
        expert_kernel_regularizer, gating_kernel_regularizer,
        expert_bias_regularizer, gating_bias_regularizer: Regularizers.
        expert_kernel_constraint, gating_kernel_constraint,
        expert_bias_constraint, gating_bias_constraint: Constraints.
        activity_regularizer: Regularizer of the layer's output.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: Tensor of shape `(..., input_dim)`.
        training: Python bool; unused by the soft mixture, accepted so that
            `stateless_call` and `Model.fit` can pass it.

    Input shape:
        N-D tensor `(batch_size, ..., input_dim)`, N >= 2.

    Output shape:
        N-D tensor `(batch_size, ..., units)`.

    Weights (expert axis second in the kernel, first in the bias):
        `expert_kernel` `(input_dim, n_experts, units)`, `expert_bias`
        `(n_experts, units)`, `gating_kernel` `(input_dim, n_experts)`,
        `gating_bias` `(n_experts,)`.

    Example:

    >>> import numpy as np
    >>> from keras_moe import DenseMoE
    >>> layer = DenseMoE(8, n_experts=4, expert_activation="relu",
    ...                  gating_activation="softmax")
    >>> tuple(layer(np.ones((2, 16), "float32")).shape)
    (2, 8)

    References:
        - Jacobs, Jordan, Nowlan & Hinton, "Adaptive mixtures of local
          experts", Neural Computation 1991.
        - Orhan, "mixture-of-experts" Keras 2 layers (the original
          `DenseMoE` re-implemented here).
    """

    def __init__(self, units, n_experts, **kwargs):
        super().__init__(**kwargs)
        self.units = utils.check_positive_int("units", units)
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ValueError(
                "`DenseMoE` expects an input of rank >= 2. "
                f"Received: input_shape={input_shape}"
            )
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "The last axis of the input of `DenseMoE` must be defined. "
                f"Received: input_shape={input_shape}"
            )
        fan_avg = max(1.0, (input_dim + self.units) / 2.0)
        expert_limit = math.sqrt(3.0 * self.expert_kernel_initializer_scale / fan_avg)
        gating_limit = math.sqrt(
            3.0 * self.gating_kernel_initializer_scale / max(1.0, (input_dim + 1) / 2.0)
        )
        self._add_moe_weights(
            expert_kernel_shape=(input_dim, self.n_experts, self.units),
            expert_kernel_initializer=keras.initializers.RandomUniform(
                -expert_limit, expert_limit
            ),
            gating_kernel_shape=(input_dim, self.n_experts),
            gating_kernel_initializer=keras.initializers.RandomUniform(
                -gating_limit, gating_limit
            ),
            expert_bias_shape=(self.n_experts, self.units),
            gating_bias_shape=(self.n_experts,),
        )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        self.built = True

    def expert_outputs(self, tokens):
        """`f(W_k x + c_k)` for every expert: `(n, d)` -> `(n, n_experts, units)`."""
        input_dim = self.expert_kernel.shape[0]
        kernel = ops.reshape(
            self.expert_kernel, (input_dim, self.n_experts * self.units)
        )
        h = ops.reshape(ops.matmul(tokens, kernel), (-1, self.n_experts, self.units))
        if self.expert_bias is not None:
            h = h + self.expert_bias
        return self.expert_activation(h)

    def call(self, inputs, training=None):
        input_dim = self.expert_kernel.shape[0]
        tokens = ops.reshape(inputs, (-1, input_dim))
        logits = routing.gate_logits(tokens, self.gating_kernel, self.gating_bias)
        gates = routing.gate_values(logits, self.gating_activation)
        outputs = routing.soft_mixture(self.expert_outputs(tokens), gates)
        return ops.reshape(outputs, ops.shape(inputs)[:-1] + (self.units,))

    def expert_weight_axes(self):
        """Weight name -> its experts axis (`keras_moe.expert_parallel_layout_map`)."""
        return {"expert_kernel": 1, "expert_bias": 0}

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.units,)

    def get_config(self):
        config = {"units": self.units, "n_experts": self.n_experts}
        return {**super().get_config(), **config}
