import keras
from keras import ops

from keras_moe import distribution
from keras_moe import utils


class BaseMoE(keras.layers.Layer):
    """Private base of the original-style MoE layers (`DenseMoE`, `ConvNDMoE`).

    It validates, keeps and serialises the expert and gating arguments these
    layers share (the original layers' signature, in its order) and creates
    their four weights, so that each layer only says what shapes and initial
    scales its weights have. Inputs of any dtype are computed in the layer's
    compute dtype, as `Dense` does (integer inputs give the float result).
    """

    def __init__(
        self,
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
        **kwargs,
    ):
        super().__init__(
            activity_regularizer=utils.get_regularizer(
                "activity_regularizer", activity_regularizer
            ),
            **kwargs,
        )
        self.expert_activation = utils.get_activation(
            "expert_activation", expert_activation
        )
        self.gating_activation = utils.get_activation(
            "gating_activation", gating_activation
        )
        self.use_expert_bias = utils.check_bool("use_expert_bias", use_expert_bias)
        self.use_gating_bias = utils.check_bool("use_gating_bias", use_gating_bias)
        self.expert_kernel_initializer_scale = utils.check_positive_float(
            "expert_kernel_initializer_scale", expert_kernel_initializer_scale
        )
        self.gating_kernel_initializer_scale = utils.check_positive_float(
            "gating_kernel_initializer_scale", gating_kernel_initializer_scale
        )
        self.expert_bias_initializer = utils.get_initializer(
            "expert_bias_initializer", expert_bias_initializer
        )
        self.gating_bias_initializer = utils.get_initializer(
            "gating_bias_initializer", gating_bias_initializer
        )
        self.expert_kernel_regularizer = utils.get_regularizer(
            "expert_kernel_regularizer", expert_kernel_regularizer
        )
        self.gating_kernel_regularizer = utils.get_regularizer(
            "gating_kernel_regularizer", gating_kernel_regularizer
        )
        self.expert_bias_regularizer = utils.get_regularizer(
            "expert_bias_regularizer", expert_bias_regularizer
        )
        self.gating_bias_regularizer = utils.get_regularizer(
            "gating_bias_regularizer", gating_bias_regularizer
        )
        self.expert_kernel_constraint = utils.get_constraint(
            "expert_kernel_constraint", expert_kernel_constraint
        )
        self.gating_kernel_constraint = utils.get_constraint(
            "gating_kernel_constraint", gating_kernel_constraint
        )
        self.expert_bias_constraint = utils.get_constraint(
            "expert_bias_constraint", expert_bias_constraint
        )
        self.gating_bias_constraint = utils.get_constraint(
            "gating_bias_constraint", gating_bias_constraint
        )

    def _add_moe_weights(
        self,
        expert_kernel_shape,
        expert_kernel_initializer,
        expert_bias_shape,
        gating_kernel_shape=None,
        gating_kernel_initializer=None,
        gating_bias_shape=None,
    ):
        """Creates the expert weights and, given their shapes, the gating ones.

        In the original layers' order (expert kernel, gating kernel, expert
        bias, gating bias), which is also the order of saved files.
        """
        with distribution.expert_weights(self):
            self.expert_kernel = self.add_weight(
                name="expert_kernel",
                shape=expert_kernel_shape,
                initializer=utils.initializer_for(
                    expert_kernel_initializer, "expert_kernel"
                ),
                regularizer=self.expert_kernel_regularizer,
                constraint=self.expert_kernel_constraint,
            )
            self._gating_kernel = None
            if gating_kernel_shape is not None:
                # The router stays in float32 under mixed precision: no autocast.
                self._gating_kernel = self.add_weight(
                    name="gating_kernel",
                    shape=gating_kernel_shape,
                    initializer=utils.initializer_for(
                        gating_kernel_initializer, "gating_kernel"
                    ),
                    regularizer=self.gating_kernel_regularizer,
                    constraint=self.gating_kernel_constraint,
                    autocast=False,
                )
            self.expert_bias = None
            if self.use_expert_bias:
                self.expert_bias = self.add_weight(
                    name="expert_bias",
                    shape=expert_bias_shape,
                    initializer=utils.initializer_for(
                        self.expert_bias_initializer, "expert_bias"
                    ),
                    regularizer=self.expert_bias_regularizer,
                    constraint=self.expert_bias_constraint,
                )
            self._gating_bias = None
            if gating_bias_shape is not None and self.use_gating_bias:
                self._gating_bias = self.add_weight(
                    name="gating_bias",
                    shape=gating_bias_shape,
                    initializer=utils.initializer_for(
                        self.gating_bias_initializer, "gating_bias"
                    ),
                    regularizer=self.gating_bias_regularizer,
                    constraint=self.gating_bias_constraint,
                    autocast=False,
                )

    @property
    def gating_kernel(self):
        """The gating (router) kernel, named as in the original layers."""
        return self._gating_kernel

    @property
    def gating_bias(self):
        """The gating bias (`None` without `use_gating_bias`)."""
        return self._gating_bias

    def _to_compute_dtype(self, inputs):
        # Keras autocasts float inputs only; integers would otherwise meet
        # kernels cast to their dtype (truncated) in the expert products.
        return ops.cast(inputs, self.compute_dtype)

    def get_config(self):
        config = {
            "expert_activation": keras.activations.serialize(self.expert_activation),
            "gating_activation": keras.activations.serialize(self.gating_activation),
            "use_expert_bias": self.use_expert_bias,
            "use_gating_bias": self.use_gating_bias,
            "expert_kernel_initializer_scale": self.expert_kernel_initializer_scale,
            "gating_kernel_initializer_scale": self.gating_kernel_initializer_scale,
            "expert_bias_initializer": keras.initializers.serialize(
                self.expert_bias_initializer
            ),
            "gating_bias_initializer": keras.initializers.serialize(
                self.gating_bias_initializer
            ),
            "expert_kernel_regularizer": keras.regularizers.serialize(
                self.expert_kernel_regularizer
            ),
            "gating_kernel_regularizer": keras.regularizers.serialize(
                self.gating_kernel_regularizer
            ),
            "expert_bias_regularizer": keras.regularizers.serialize(
                self.expert_bias_regularizer
            ),
            "gating_bias_regularizer": keras.regularizers.serialize(
                self.gating_bias_regularizer
            ),
            "expert_kernel_constraint": keras.constraints.serialize(
                self.expert_kernel_constraint
            ),
            "gating_kernel_constraint": keras.constraints.serialize(
                self.gating_kernel_constraint
            ),
            "expert_bias_constraint": keras.constraints.serialize(
                self.expert_bias_constraint
            ),
            "gating_bias_constraint": keras.constraints.serialize(
                self.gating_bias_constraint
            ),
            "activity_regularizer": keras.regularizers.serialize(
                self.activity_regularizer
            ),
        }
        return {**super().get_config(), **config}
