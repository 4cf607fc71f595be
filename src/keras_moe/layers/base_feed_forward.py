"""`BaseFeedForwardExperts`: the expert bank of `MoEFeedForward`, its private
base class (as Keras's `BaseConv` is `Conv2D`'s)."""

import keras
from keras import ops

from keras_moe import utils
from keras_moe.layers import expert_functions


class BaseFeedForwardExperts(keras.layers.Layer):
    """`E` feed-forward experts with an expert axis first, run on the rows a
    dispatch layout gathered for them (`run_experts`).

    Each expert is `down(act(x . gate) * (x . up))` when `gated`, else
    `down(act(x . up))`. The arguments are `MoEFeedForward`'s of the same
    names, documented there. Subclasses create the weights with
    `build_experts(d)` in their `build()` and route the tokens themselves.
    """

    def __init__(
        self,
        intermediate_dim,
        n_experts,
        activation="gelu",
        gated=False,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        gate_up_layout="separate",
        gate_bias=False,
        activation_dtype=None,
        swiglu_limit=None,
        swiglu_alpha=1.702,
        expert_output_scale=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = utils.check_positive_int(
            "intermediate_dim", intermediate_dim
        )
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.activation = utils.get_activation(
            "activation", expert_functions.get_activation(activation)
        )
        self.gated = utils.check_bool("gated", gated)
        self.use_bias = utils.check_bool("use_bias", use_bias)
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
        self.gate_up_layout = utils.check_choice(
            "gate_up_layout", gate_up_layout, expert_functions.GATE_UP_LAYOUTS
        )
        self.gate_bias = utils.check_bool("gate_bias", gate_bias)
        self.activation_dtype = None
        if activation_dtype is not None:
            self.activation_dtype = utils.check_choice(
                "activation_dtype", activation_dtype, ("float32",)
            )
        self.swiglu_limit = None
        if swiglu_limit is not None:
            self.swiglu_limit = utils.check_positive_float("swiglu_limit", swiglu_limit)
        self.swiglu_alpha = utils.check_positive_float("swiglu_alpha", swiglu_alpha)
        self.expert_output_scale = utils.check_bool(
            "expert_output_scale", expert_output_scale
        )
        if not self.gated:
            for name, value, default in (
                ("gate_up_layout", self.gate_up_layout, "separate"),
                ("swiglu_limit", self.swiglu_limit, None),
                ("gate_bias", self.gate_bias, False),
            ):
                if value != default:
                    raise ValueError(
                        f"`{name}` applies to gated experts only (`gated=True`). "
                        f"Received: {name}={value!r}, gated=False"
                    )
        if self.gate_bias and (not self.use_bias or self.gate_up_layout != "separate"):
            raise ValueError(
                "`gate_bias` adds a gate bias to the separate layout's biases: "
                "it needs `use_bias=True` and `gate_up_layout='separate'` (a "
                "fused layout's bias already covers the gate). Received: "
                f"gate_bias=True, use_bias={use_bias!r}, "
                f"gate_up_layout={gate_up_layout!r}"
            )

    def build_experts(self, d):
        """Creates the expert weights for inputs of `d` features."""
        m, e = self.intermediate_dim, self.n_experts
        separate = self.gate_up_layout == "separate"
        self.expert_up_kernel = None
        self.expert_gate_up_kernel = None
        if separate:
            self.expert_up_kernel = self._expert_kernel("expert_up_kernel", (e, d, m))
        else:
            self.expert_gate_up_kernel = self._expert_kernel(
                "expert_gate_up_kernel", (e, d, 2 * m)
            )
        self.expert_gate_kernel = None
        if self.gated and separate:
            self.expert_gate_kernel = self._expert_kernel(
                "expert_gate_kernel", (e, d, m)
            )
        self.expert_down_kernel = self._expert_kernel("expert_down_kernel", (e, m, d))
        self.expert_up_bias = None
        self.expert_gate_up_bias = None
        self.expert_down_bias = None
        if self.use_bias:
            if separate:
                self.expert_up_bias = self._expert_bias("expert_up_bias", (e, m))
            else:
                self.expert_gate_up_bias = self._expert_bias(
                    "expert_gate_up_bias", (e, 2 * m)
                )
            self.expert_down_bias = self._expert_bias("expert_down_bias", (e, d))
        self.expert_gate_bias = None
        if self.gate_bias:
            self.expert_gate_bias = self._expert_bias("expert_gate_bias", (e, m))
        self.expert_scale = None
        if self.expert_output_scale:
            self.expert_scale = self.add_weight(
                name="expert_scale", shape=(e,), initializer="ones"
            )

    def _expert_kernel(self, name, shape):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=utils.initializer_for(self.kernel_initializer, name),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )

    def _expert_bias(self, name, shape):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=utils.initializer_for(self.bias_initializer, name),
            regularizer=self.bias_regularizer,
            constraint=self.bias_constraint,
        )

    def _gated_unit(self, gate, up):
        return expert_functions.gated_unit(
            gate,
            up,
            self.activation,
            self.activation_dtype,
            self.swiglu_limit,
            self.swiglu_alpha,
        )

    def run_experts(self, layout, x):
        """The experts on the rows a dispatch layout gathered for them.

        The `expert_fn` of `routing.sparse_mixture`: `x` holds each expert's
        rows in `layout` (see `keras_moe.routing.layouts`); returns their
        outputs in the same layout. A layer that routes tokens itself can run
        these experts on them the same way (`keras_moe.kerashub` does, on a
        KerasHub block's own weights). `expert_scale` is not applied here:
        it scales the routing weights.
        """
        if self.expert_gate_up_kernel is not None:
            h = layout.matmul(x, self.expert_gate_up_kernel)
            if self.expert_gate_up_bias is not None:
                h = layout.add_bias(h, self.expert_gate_up_bias)
            gate, up = expert_functions.split_gate_up(h, self.gate_up_layout)
            h = self._gated_unit(gate, up)
        else:
            h = layout.matmul(x, self.expert_up_kernel)
            if self.expert_up_bias is not None:
                h = layout.add_bias(h, self.expert_up_bias)
            if self.gated:
                gate = layout.matmul(x, self.expert_gate_kernel)
                if self.expert_gate_bias is not None:
                    gate = layout.add_bias(gate, self.expert_gate_bias)
                h = self._gated_unit(gate, h)
            else:
                h = expert_functions.activate(h, self.activation, self.activation_dtype)
        y = layout.matmul(h, self.expert_down_kernel)
        if self.expert_down_bias is not None:
            y = layout.add_bias(y, self.expert_down_bias)
        return y

    def scale_weights(self, weights, experts):
        """The routing weights times each chosen expert's `expert_scale`."""
        if self.expert_scale is None:
            return weights
        scale = ops.cast(self.expert_scale, weights.dtype)
        return weights * ops.take(scale, experts, axis=0)

    def expert_weight_axes(self):
        """Weight name -> its experts axis (`keras_moe.expert_parallel_layout_map`)."""
        names = ["expert_down_kernel"]
        if self.gate_up_layout == "separate":
            names.append("expert_up_kernel")
            if self.gated:
                names.append("expert_gate_kernel")
        else:
            names.append("expert_gate_up_kernel")
        if self.use_bias:
            names.append("expert_down_bias")
            if self.gate_up_layout == "separate":
                names.append("expert_up_bias")
            else:
                names.append("expert_gate_up_bias")
        if self.gate_bias:
            names.append("expert_gate_bias")
        if self.expert_output_scale:
            names.append("expert_scale")
        return {name: 0 for name in names}

    def get_config(self):
        config = {
            "intermediate_dim": self.intermediate_dim,
            "n_experts": self.n_experts,
            "activation": keras.activations.serialize(self.activation),
            "gated": self.gated,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "gate_up_layout": self.gate_up_layout,
            "gate_bias": self.gate_bias,
            "activation_dtype": self.activation_dtype,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "expert_output_scale": self.expert_output_scale,
        }
        return {**super().get_config(), **config}
