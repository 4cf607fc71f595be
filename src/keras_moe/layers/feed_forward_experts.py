"""`FeedForwardExperts`: the bank of feed-forward experts every keras-moe
mixture runs its experts with."""

import keras
from keras import ops

from keras_moe import distribution
from keras_moe import saved_formats
from keras_moe import utils
from keras_moe.layers import expert_functions
from keras_moe.routing.layouts import ExpertAxisLayout

# Every weight a bank may have, in the order `build` creates them (the
# order of saved files), with the kind of initializer each draws from.
WEIGHTS = (
    ("up_kernel", "kernel"),
    ("gate_up_kernel", "kernel"),
    ("gate_kernel", "kernel"),
    ("down_kernel", "kernel"),
    ("up_bias", "bias"),
    ("gate_up_bias", "bias"),
    ("down_bias", "bias"),
    ("gate_bias", "bias"),
    ("scale", "scale"),
)


@keras.saving.register_keras_serializable(package="keras_moe")
class FeedForwardExperts(saved_formats.LegacyLoading, keras.layers.Layer):
    """A bank of `E` feed-forward experts, run on the rows a dispatch lays out.

    Expert `e` computes `down_e(act(x . gate_e) * (x . up_e))` when `gated`,
    else `down_e(act(x . up_e))`, with biases when `use_bias`, and times a
    learned `scale[e]` with `output_scale=True`. Every weight has the
    expert axis first.

    The bank does not route: a router decides which rows each expert runs
    and a dispatch layout (`keras_moe.routing.layouts`) lays them out; the
    bank's `call(rows, layout)` runs every expert on its own rows through the
    layout's three operations (`layout.select` picks the per-expert weights
    the layout's rows need, `layout.matmul` multiplies each row by its
    expert's kernel, `layout.broadcast` lines a per-expert vector up with the
    rows). With no layout, `rows` is `(..., E, c, d)`: each expert's `c` rows
    on the expert axis (a capacity buffer, Soft MoE's slots).
    `MoEFeedForward`, `SoftMoE` and the sparsified KerasHub blocks all run
    their experts with it.

    Args:
        intermediate_dim: Positive integer, hidden size `m` of each expert.
        n_experts: Positive integer, number of experts `E`.
        activation: Activation of the hidden layer: a Keras activation,
            `"gelu_tanh"` (GELU's tanh approximation) or a callable.
        gated: Whether each expert is a gated linear unit (GLU).
        use_bias: Whether `up` (or the fused `gate_up`) and `down` have
            biases.
        gate_up_layout: With `gated`: `"separate"` (`gate_kernel`,
            `up_kernel`), or one fused `gate_up_kernel` `(E, d, 2m)` whose
            gate columns come first (`"concatenated"`, Qwen MoE) or alternate
            with up's (`"interleaved"`, GPT-OSS).
        use_gate_bias: With `gated`, `use_bias` and the separate layout:
            whether the gate has a bias `gate_bias` too.
        activation_dtype: `None` (the compute dtype) or `"float32"`: the
            dtype the activation runs in.
        swiglu_limit: `None`, or `L` for GPT-OSS's clamped SwiGLU (with
            `gated`, instead of `act(gate) * up`, `activation` unused):
            `(clip(up, -L, L) + 1) * g * sigmoid(swiglu_alpha * g)`,
            `g = min(gate, L)`.
        swiglu_alpha: The clamped SwiGLU's `alpha` (1.702 in GPT-OSS).
        output_scale: Whether each expert's output is multiplied by a
            learned scale `scale` `(E,)`, initialised to ones (Gemma 4's
            `per_expert_scale`).
        kernel_initializer: Initializer of the kernels; each kernel draws
            values of its own (`keras_moe.utils.initializer_for`).
        bias_initializer: Initializer of the biases.
        kernel_regularizer: Regularizer of the kernels.
        bias_regularizer: Regularizer of the biases.
        kernel_constraint: Constraint of the kernels.
        bias_constraint: Constraint of the biases.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: The rows of every expert, as `layout` lays them out.
        layout: A `keras_moe.routing.layouts.Layout`, or `None` for
            `(..., E, c, d)` rows.

    Input shape:
        `(..., E, c, d)` without a layout; the layout's rows with one.

    Output shape:
        The input's shape with `d` features.

    Weights (expert axis first): `up_kernel` `(E, d, m)`, `gate_kernel`
    `(E, d, m)` (when gated), `down_kernel` `(E, m, d)`, `up_bias` `(E, m)`,
    `down_bias` `(E, d)`; with a fused `gate_up_layout`, `gate_up_kernel`
    `(E, d, 2m)` and `gate_up_bias` `(E, 2m)` instead of the gate's and up's;
    `gate_bias` `(E, m)` with `use_gate_bias`; `scale` `(E,)` with
    `output_scale`.

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import FeedForwardExperts
    >>> experts = FeedForwardExperts(32, n_experts=4, gated=True)
    >>> rows = np.ones((4, 3, 16), "float32")  # 3 rows for each expert
    >>> tuple(experts(rows).shape)
    (4, 3, 16)
    """

    # The name of each weight's variable, in the order `build` creates them
    # (the order of saved files). A subclass that runs another model's
    # expert bank on that model's variable names and order overrides it,
    # listing the weights it has.
    weight_names = {name: name for name, _ in WEIGHTS}

    def __init__(
        self,
        intermediate_dim,
        n_experts,
        activation="gelu",
        gated=False,
        use_bias=True,
        gate_up_layout="separate",
        use_gate_bias=False,
        activation_dtype=None,
        swiglu_limit=None,
        swiglu_alpha=1.702,
        output_scale=False,
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
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.activation = utils.get_activation("activation", activation)
        self.gated = utils.check_bool("gated", gated)
        self.use_bias = utils.check_bool("use_bias", use_bias)
        self.gate_up_layout = utils.check_choice(
            "gate_up_layout", gate_up_layout, expert_functions.GATE_UP_LAYOUTS
        )
        self.use_gate_bias = utils.check_bool("use_gate_bias", use_gate_bias)
        self.activation_dtype = None
        if activation_dtype is not None:
            self.activation_dtype = utils.check_choice(
                "activation_dtype", activation_dtype, ("float32",)
            )
        self.swiglu_limit = None
        if swiglu_limit is not None:
            self.swiglu_limit = utils.check_positive_float("swiglu_limit", swiglu_limit)
        self.swiglu_alpha = utils.check_positive_float("swiglu_alpha", swiglu_alpha)
        self.output_scale = utils.check_bool("output_scale", output_scale)
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
        expert_functions.check_gated_options(
            self.gated,
            self.use_bias,
            self.gate_up_layout,
            self.use_gate_bias,
            self.swiglu_limit,
        )
        for name, _ in WEIGHTS:
            setattr(self, name, None)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def weight_shapes(self, d):
        """`{name: shape}` of the weights this bank has for `d` features."""
        m, e = self.intermediate_dim, self.n_experts
        separate = self.gate_up_layout == "separate"
        shapes = {}
        if separate:
            shapes["up_kernel"] = (e, d, m)
            if self.gated:
                shapes["gate_kernel"] = (e, d, m)
        else:
            shapes["gate_up_kernel"] = (e, d, 2 * m)
        shapes["down_kernel"] = (e, m, d)
        if self.use_bias:
            if separate:
                shapes["up_bias"] = (e, m)
            else:
                shapes["gate_up_bias"] = (e, 2 * m)
            shapes["down_bias"] = (e, d)
        if self.use_gate_bias:
            shapes["gate_bias"] = (e, m)
        if self.output_scale:
            shapes["scale"] = (e,)
        return shapes

    def build(self, input_shape):
        d = tuple(input_shape)[-1]
        if d is None:
            raise ValueError(
                "The last axis of the input of `FeedForwardExperts` must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        shapes = self.weight_shapes(d)
        missing = sorted(set(shapes) - set(self.weight_names))
        if missing:
            raise ValueError(
                f"`{type(self).__name__}.weight_names` must name every weight "
                f"this bank has. Received: no name for {missing}"
            )
        kinds = dict(WEIGHTS)
        with distribution.expert_weights(self):
            for name in self.weight_names:
                if name in shapes:
                    weight = self._add_expert_weight(name, kinds[name], shapes[name])
                    setattr(self, name, weight)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: d})

    def _add_expert_weight(self, name, kind, shape):
        variable_name = self.weight_names[name]
        if kind == "scale":
            return self.add_weight(name=variable_name, shape=shape, initializer="ones")
        prefix = "kernel" if kind == "kernel" else "bias"
        return self.add_weight(
            name=variable_name,
            shape=shape,
            initializer=utils.initializer_for(
                getattr(self, f"{prefix}_initializer"), variable_name
            ),
            regularizer=getattr(self, f"{prefix}_regularizer"),
            constraint=getattr(self, f"{prefix}_constraint"),
        )

    def project(self, layout, x, kernel, bias=None):
        """`x . kernel + bias` for every row with its expert's weights."""
        kernel = ops.cast(layout.select(kernel), x.dtype)
        y = layout.matmul(x, kernel)
        if bias is not None:
            y = y + layout.broadcast(ops.cast(layout.select(bias), y.dtype))
        return y

    def call(self, inputs, layout=None):
        if layout is None:
            self._check_expert_axis(inputs.shape)
            layout = ExpertAxisLayout()
        x = inputs
        if self.gate_up_kernel is not None:
            h = self.project(layout, x, self.gate_up_kernel, self.gate_up_bias)
            gate, up = expert_functions.split_gate_up(h, self.gate_up_layout)
            h = self._gated_unit(gate, up)
        else:
            h = self.project(layout, x, self.up_kernel, self.up_bias)
            if self.gated:
                gate = self.project(layout, x, self.gate_kernel, self.gate_bias)
                h = self._gated_unit(gate, h)
            else:
                h = expert_functions.activate(h, self.activation, self.activation_dtype)
        y = self.project(layout, h, self.down_kernel, self.down_bias)
        if self.scale is not None:
            scale = ops.expand_dims(ops.cast(self.scale, y.dtype), -1)
            y = y * layout.broadcast(layout.select(scale))
        return y

    def _check_expert_axis(self, shape):
        shape = tuple(shape)
        if len(shape) < 3 or shape[-3] not in (None, self.n_experts):
            raise ValueError(
                "Without a `layout`, the inputs of `FeedForwardExperts` are "
                "each expert's rows `(..., n_experts, c, d)`, the expert axis "
                f"third from last with n_experts={self.n_experts}. Received: "
                f"inputs.shape={shape}"
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

    def expert_weight_axes(self):
        """The name of each of the bank's weights -> its experts axis, 0
        (`keras_moe.expert_parallel_layout_map`); known before `build`."""
        return {self.weight_names[name]: 0 for name in self.weight_shapes(None)}

    def compute_output_shape(self, input_shape):
        # One argument: Keras passes it the shape of the first input (the
        # rows, in any layout), whatever the other call arguments.
        return tuple(input_shape)

    def get_config(self):
        config = {
            "intermediate_dim": self.intermediate_dim,
            "n_experts": self.n_experts,
            "activation": keras.activations.serialize(self.activation),
            "gated": self.gated,
            "use_bias": self.use_bias,
            "gate_up_layout": self.gate_up_layout,
            "use_gate_bias": self.use_gate_bias,
            "activation_dtype": self.activation_dtype,
            "swiglu_limit": self.swiglu_limit,
            "swiglu_alpha": self.swiglu_alpha,
            "output_scale": self.output_scale,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
        }
        return {**super().get_config(), **config}
