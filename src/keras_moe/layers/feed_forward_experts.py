"""`FeedForwardExperts`: the bank of feed-forward experts every keras-moe
mixture runs its experts with."""

import keras
from keras import ops

from keras_moe import distribution
from keras_moe import saved_formats
from keras_moe import utils
from keras_moe.layers import expert_functions
from keras_moe.layers import expert_quantization
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
        lora_rank: `None`, or the rank of LoRA adapters enabled when the
            bank is built (`enable_lora`; a saved LoRA bank's config has it).
        lora_alpha: The LoRA update's scale `lora_alpha / lora_rank`;
            `None` means `lora_rank`.
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

    Quantization and LoRA, through Keras's protocols (`keras.Model.quantize`
    and `enable_lora` reach the bank inside `MoEFeedForward` and `SoftMoE`):
    `quantize("int8" | "int4")` stores each kernel as int8 values (int4: two
    per byte) and a float32 scale per expert and output channel,
    `<kernel>_scale` `(E, m)`; a call dequantizes only the experts the
    layout selects (a block layout's blocks' experts; a grouped matmul and
    the expert axis run every expert). `enable_lora(rank)` adds per-expert
    factors `<kernel>_lora_a` `(E, d, r)` and `<kernel>_lora_b` `(E, r, m)`
    and freezes the kernels, on a float or a quantized bank (QLoRA).

    Example:

    >>> import numpy as np
    >>> from keras_moe.layers import FeedForwardExperts
    >>> experts = FeedForwardExperts(32, n_experts=4, gated=True)
    >>> rows = np.ones((4, 3, 16), "float32")  # 3 rows for each expert
    >>> tuple(experts(rows).shape)
    (4, 3, 16)
    >>> experts.quantize("int8")
    >>> experts.dtype_policy.name, experts.up_kernel.dtype
    ('int8_from_float32', 'int8')
    >>> tuple(experts.up_kernel_scale.shape)  # (E, m)
    (4, 32)
    >>> experts.enable_lora(2)  # QLoRA: only the adapters train
    >>> sorted(v.name for v in experts.trainable_weights)[:2]
    ['down_bias', 'down_kernel_lora_a']
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
        lora_rank=None,
        lora_alpha=None,
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
        self.lora_rank = utils.check_optional_positive_int("lora_rank", lora_rank)
        self.lora_alpha = utils.check_optional_positive_float("lora_alpha", lora_alpha)
        if self.lora_rank is not None and self.lora_alpha is None:
            self.lora_alpha = self.lora_rank
        self.lora_enabled = False
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
        quantized = self.quantization_mode is not None
        with distribution.expert_weights(self):
            for name in self.weight_names:
                if name in shapes and not (quantized and kinds[name] == "kernel"):
                    weight = self._add_expert_weight(name, kinds[name], shapes[name])
                    setattr(self, name, weight)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: d})
        if quantized:
            self.quantized_build(input_shape, self.quantization_mode)
        if self.lora_rank is not None:
            # A LoRA bank reloaded: its factors exist before its weights load.
            self.built = True
            self.enable_lora(self.lora_rank, self.lora_alpha)

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

    def project(self, layout, x, name):
        """`x . kernel + bias` for every row with its expert's weights, for
        the kernel `"{name}_kernel"` (`name` one of `"up"`, `"gate"`,
        `"gate_up"`, `"down"`) and its bias, if any: the selected kernels
        (dequantized when quantized) and their LoRA update when enabled."""
        kernel = f"{name}_kernel"
        y = layout.matmul(
            x, expert_quantization.selected_kernel(self, layout, kernel, x.dtype)
        )
        y = expert_quantization.add_lora(self, layout, x, y, kernel)
        bias = getattr(self, f"{name}_bias")
        if bias is not None:
            y = y + layout.broadcast(ops.cast(layout.select(bias), y.dtype))
        return y

    def call(self, inputs, layout=None):
        if layout is None:
            self._check_expert_axis(inputs.shape)
            layout = ExpertAxisLayout()
        x = inputs
        if self.gate_up_kernel is not None:
            h = self.project(layout, x, "gate_up")
            gate, up = expert_functions.split_gate_up(h, self.gate_up_layout)
            h = self._gated_unit(gate, up)
        else:
            h = self.project(layout, x, "up")
            if self.gated:
                gate = self.project(layout, x, "gate")
                h = self._gated_unit(gate, h)
            else:
                h = expert_functions.activate(h, self.activation, self.activation_dtype)
        y = self.project(layout, h, "down")
        if self.scale is not None:
            scale = ops.expand_dims(ops.cast(self.scale, y.dtype), -1)
            y = y * layout.broadcast(layout.select(scale))
        return y

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the expert kernels to `"int8"` or `"int4"` (Keras's
        `Layer.quantize` protocol; `keras.Model.quantize` calls it).

        Each kernel becomes int8 values (int4: two per byte) with a float32
        scale per expert and output channel, `(E, m)`; the biases and
        `scale` stay float. Only the weights are quantized (the inputs are
        not), per output channel in either mode (an `Int4QuantizationConfig`'s
        `block_size` is not used). The dtype policy becomes
        `"{mode}_from_{policy}"`, which the saved config keeps.

        Args:
            mode: `"int8"` or `"int4"`. Keras's other modes (`"float8"`,
                `"gptq"`, `"awq"`) raise `NotImplementedError`.
            type_check: With `True`, a subclass that overrides `project`
                (which reads the kernels) is refused; one that overrides
                `call` around `FeedForwardExperts.call` is quantized.
            config: A `keras.quantizers.QuantizationConfig` of `mode`, or
                None.
        """
        if type_check and type(self).project is not FeedForwardExperts.project:
            raise self._not_implemented_error(self.quantize)
        expert_quantization.quantize(self, mode)

    def quantized_build(self, input_shape, mode, config=None):
        """Creates the int8 (int4: packed) kernels and their scales of a bank
        loaded with a quantized dtype policy (`build` calls it)."""
        expert_quantization.quantized_build(self, tuple(input_shape)[-1], mode)

    def _int8_call(self, *args, **kwargs):
        # `project` reads the quantized kernels: `call` runs as it is.
        return self.call(*args, **kwargs)

    def _int4_call(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Adds low-rank adapters to every expert kernel (Keras's
        `Dense.enable_lora` protocol) and freezes the kernels.

        Each kernel `W` `(E, d, m)` gets per-expert factors `A` `(E, d, r)`
        and `B` `(E, r, m)` (float32 under any dtype policy, selected by the
        layout as the kernels are): each product becomes
        `x . W_e + (lora_alpha / r) * (x . A_e) . B_e`. `B` starts at zeros,
        so the outputs do not change when LoRA is enabled. The kernels
        become non-trainable (the biases and `scale` stay as they are); an
        int8/int4 bank takes LoRA too (QLoRA).

        Saving merges the adapters into the kernels, as Keras's `Dense`
        does: the saved kernel is `W + (lora_alpha / r) * A . B` (an
        int8/int4 kernel is dequantized, merged and quantized again), the
        factors are not saved, and the config keeps `lora_rank` and
        `lora_alpha`, so that a reloaded bank has LoRA enabled on the merged
        kernels with `B` zeros (unlike `Dense`, which zeros `A` too, `A`
        keeps its initial values, so that fine-tuning can go on).

        Args:
            rank: Positive integer, the rank `r` of the adapters.
            lora_alpha: Positive number scaling the update by
                `lora_alpha / rank`; None means `rank`.
            a_initializer: Initializer of the `A` factors.
            b_initializer: Initializer of the `B` factors.
        """
        expert_quantization.enable_lora(
            self, rank, lora_alpha, a_initializer, b_initializer
        )

    def save_own_variables(self, store):
        if self.built:
            expert_quantization.save_variables(self, store)

    def load_current_variables(self, store):
        if not self.built:
            super().load_current_variables(store)
            return
        expert_quantization.load_variables(self, store)

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
        shapes = self.weight_shapes(None)
        axes = {self.weight_names[name]: 0 for name in shapes}
        suffixes = []
        if self.quantization_mode is not None or getattr(self, "_is_quantized", False):
            suffixes.append("_scale")
        if self.lora_rank is not None:
            suffixes += ["_lora_a", "_lora_b"]
        # A quantized bank's kernel scales, a LoRA bank's factors.
        for name in expert_quantization.kernel_names(self, shapes):
            for suffix in suffixes:
                axes[f"{self.weight_names[name]}{suffix}"] = 0
        return axes

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
        if self.lora_rank is not None:
            config["lora_rank"] = self.lora_rank
            config["lora_alpha"] = self.lora_alpha
        return {**super().get_config(), **config}
