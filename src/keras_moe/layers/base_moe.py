import keras

from keras_moe import utils

_SERIALIZERS = {
    "activation": keras.activations.serialize,
    "initializer": keras.initializers.serialize,
    "regularizer": keras.regularizers.serialize,
    "constraint": keras.constraints.serialize,
}


class BaseMoE(keras.layers.Layer):
    """Private base of the original-style MoE layers (`DenseMoE`, `ConvNDMoE`).

    It validates, normalises, keeps and serialises the expert and gating
    arguments that these layers share, and creates their four weights, so that
    each layer only says what shapes and initial scales its weights have.
    """

    # Argument name -> kind, in the order of the original layers' signature.
    _MOE_ARGUMENTS = {
        "expert_activation": "activation",
        "gating_activation": "activation",
        "use_expert_bias": "bool",
        "use_gating_bias": "bool",
        "expert_kernel_initializer_scale": "scale",
        "gating_kernel_initializer_scale": "scale",
        "expert_bias_initializer": "initializer",
        "gating_bias_initializer": "initializer",
        "expert_kernel_regularizer": "regularizer",
        "gating_kernel_regularizer": "regularizer",
        "expert_bias_regularizer": "regularizer",
        "gating_bias_regularizer": "regularizer",
        "expert_kernel_constraint": "constraint",
        "gating_kernel_constraint": "constraint",
        "expert_bias_constraint": "constraint",
        "gating_bias_constraint": "constraint",
    }
    _CHECKS = {
        "activation": utils.get_activation,
        "bool": utils.check_bool,
        "scale": utils.check_positive_float,
        "initializer": utils.get_initializer,
        "regularizer": utils.get_regularizer,
        "constraint": utils.get_constraint,
    }

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
        given = locals()
        for name, kind in self._MOE_ARGUMENTS.items():
            setattr(self, name, self._CHECKS[kind](name, given[name]))

    def _add_moe_weights(
        self,
        expert_kernel_shape,
        expert_kernel_initializer,
        gating_kernel_shape,
        gating_kernel_initializer,
        expert_bias_shape,
        gating_bias_shape,
    ):
        self.expert_kernel = self.add_weight(
            name="expert_kernel",
            shape=expert_kernel_shape,
            initializer=expert_kernel_initializer,
            regularizer=self.expert_kernel_regularizer,
            constraint=self.expert_kernel_constraint,
        )
        # The router stays in float32 under mixed precision: no autocast.
        self.gating_kernel = self.add_weight(
            name="gating_kernel",
            shape=gating_kernel_shape,
            initializer=gating_kernel_initializer,
            regularizer=self.gating_kernel_regularizer,
            constraint=self.gating_kernel_constraint,
            autocast=False,
        )
        self.expert_bias = None
        if self.use_expert_bias:
            self.expert_bias = self.add_weight(
                name="expert_bias",
                shape=expert_bias_shape,
                initializer=self.expert_bias_initializer,
                regularizer=self.expert_bias_regularizer,
                constraint=self.expert_bias_constraint,
            )
        self.gating_bias = None
        if self.use_gating_bias:
            self.gating_bias = self.add_weight(
                name="gating_bias",
                shape=gating_bias_shape,
                initializer=self.gating_bias_initializer,
                regularizer=self.gating_bias_regularizer,
                constraint=self.gating_bias_constraint,
                autocast=False,
            )

    def get_config(self):
        config = {}
        for name, kind in self._MOE_ARGUMENTS.items():
            value = getattr(self, name)
            serialize = _SERIALIZERS.get(kind)
            config[name] = serialize(value) if serialize else value
        config["activity_regularizer"] = keras.regularizers.serialize(
            self.activity_regularizer
        )
        return {**super().get_config(), **config}
