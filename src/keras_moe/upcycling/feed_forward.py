"""Sparse upcycling of a dense feed-forward block into an `MoEFeedForward`.

Sparse upcycling (Komatsuzaki et al., 2022) starts a mixture of experts from
a trained dense network: every expert is a copy of the dense feed-forward
block. With top-k weights that sum to one (`MoEFeedForward` renormalises its
top-k weights), `sum_j w_j * ffn(x) = ffn(x)`, so the upcycled layer computes
exactly what the dense block computed, whatever the router says, and
training continues from the dense network's quality. `expert_noise` breaks
that symmetry on purpose (and with it the exactness).

For KerasHub's dense language models (Mistral, Llama, Qwen3), see
`keras_moe.kerashub.upcycle` (`keras_moe.upcycling.kerashub`), which turns a
whole backbone into KerasHub's MoE backbone of the same family.
"""

import keras
import numpy as np

from keras_moe import utils
from keras_moe.layers.feed_forward_experts import FeedForwardExperts
from keras_moe.layers.moe_feed_forward import MoEFeedForward

__all__ = ["upcycle_feed_forward", "expert_copies"]


def expert_copies(kernel, n_experts, expert_noise=0.0, rng=None):
    """`n_experts` copies of `kernel` stacked on a new first axis, as NumPy.

    With `expert_noise > 0`, each copy gets independent Gaussian noise of
    standard deviation `expert_noise * std(kernel)` (relative, so one value
    suits kernels of every scale); with `0` the copies are identical.

    Args:
        kernel: Array-like (a NumPy array, a tensor or a Keras variable).
        n_experts: Positive integer, the number of copies.
        expert_noise: Non-negative float, the relative noise scale.
        rng: A `numpy.random.Generator` for the noise (a fresh unseeded one
            when `None`).

    Returns:
        A NumPy array of shape `(n_experts, *kernel.shape)`.

    Example:

    >>> from keras_moe.upcycling import expert_copies
    >>> expert_copies(np.eye(2, dtype="float32"), 3).shape
    (3, 2, 2)
    """
    n_experts = utils.check_positive_int("n_experts", n_experts)
    expert_noise = utils.check_non_negative_float("expert_noise", expert_noise)
    kernel = _to_numpy(kernel)
    copies = np.repeat(kernel[None], n_experts, axis=0)
    if expert_noise:
        rng = np.random.default_rng() if rng is None else rng
        scale = expert_noise * float(np.std(kernel.astype("float64")))
        copies = copies + rng.normal(0.0, scale, copies.shape)
    return copies.astype(kernel.dtype)


def _to_numpy(value):
    if isinstance(value, keras.Variable):
        value = value.value
    return np.asarray(keras.ops.convert_to_numpy(value))


def _is_float(dtype):
    """Any float dtype Keras knows: NumPy's and ml_dtypes' (bfloat16, float8)."""
    try:
        return keras.backend.is_float_dtype(dtype)
    except ValueError:  # not a Keras dtype: strings, objects
        return False


def _is_linear(activation):
    return activation is None or activation is keras.activations.linear


def _dense_parts(name, value, expected_rank=2):
    """(kernel, bias or None, activation or None, dtype policy or None)."""
    if isinstance(value, keras.layers.Dense):
        if not value.built:
            raise ValueError(
                f"`{name}` must be a built `Dense` layer (its kernel exists once it "
                f"is built or called). Received: {name}={value.name!r} with "
                "built=False"
            )
        if getattr(value, "quantization_mode", None) is not None:
            raise ValueError(
                f"`{name}` must be a float `Dense` layer, not a quantized one. "
                f"Received: {name}={value.name!r} with quantization_mode="
                f"{value.quantization_mode!r}"
            )
        kernel = _to_numpy(value.kernel)
        bias = _to_numpy(value.bias) if value.use_bias else None
        activation = None if _is_linear(value.activation) else value.activation
        return kernel, bias, activation, value.dtype_policy
    if isinstance(value, keras.layers.Layer):
        raise TypeError(
            f"`{name}` must be a `keras.layers.Dense` layer or a kernel array. "
            f"Received: {name}={value.name!r} of type {type(value).__name__}"
        )
    try:
        kernel = _to_numpy(value)
    except Exception as error:
        raise TypeError(
            f"`{name}` must be a `keras.layers.Dense` layer or a kernel array. "
            f"Received: {name} of type {type(value).__name__}"
        ) from error
    if kernel.ndim != expected_rank or not _is_float(kernel.dtype):
        raise ValueError(
            f"`{name}` must be a float kernel of rank {expected_rank}. Received: "
            f"{name} with shape {kernel.shape} and dtype {kernel.dtype}"
        )
    return kernel, None, None, None


def _bias(name, value, size):
    if value is None:
        return None
    bias = _to_numpy(value)
    if bias.shape != (size,):
        raise ValueError(
            f"`{name}` must have shape ({size},). Received: {name} with shape "
            f"{bias.shape}"
        )
    return bias


class _DenseBlock:
    """A dense feed-forward block's kernels, biases, activation and dtype
    policy, from `upcycle_feed_forward`'s arguments, checked.

    Attributes: `kernels` and `biases` (`"up"`, `"gate"`, `"down"` -> NumPy
    array or None), `d`, `m`, `gated`, `activation`, `policy` (the dtype
    policy of the first `Dense` given, or None).
    """

    def __init__(self, up, down, gate, up_bias, down_bias, activation):
        up_kernel, up_layer_bias, up_activation, up_policy = _dense_parts("up", up)
        down_kernel, down_layer_bias, down_activation, down_policy = _dense_parts(
            "down", down
        )
        self.d, self.m = d, m = up_kernel.shape
        if down_kernel.shape != (m, d):
            raise ValueError(
                f"`down` must have a kernel of shape ({m}, {d}) for an `up` kernel "
                f"of shape ({d}, {m}). Received: down kernel of shape "
                f"{down_kernel.shape}"
            )
        if down_activation is not None:
            raise ValueError(
                "`down` must be a `Dense` without activation (an expert's output "
                "projection is linear). Received: down with activation="
                f"{down_activation}"
            )
        self.gated = gate is not None
        gate_kernel, gate_bias, own_activation, gate_policy = None, None, None, None
        if self.gated:
            gate_kernel, gate_bias, own_activation, gate_policy = self._gate(
                gate, up_activation
            )
        else:
            own_activation = up_activation
        self.kernels = {"up": up_kernel, "gate": gate_kernel, "down": down_kernel}
        self.biases = {
            "up": self._bias("up_bias", up_bias, up_layer_bias, m),
            "gate": gate_bias,
            "down": self._bias("down_bias", down_bias, down_layer_bias, d),
        }
        self.activation = self._activation(activation, own_activation)
        policies = (up_policy, gate_policy, down_policy)
        self.policy = next((p for p in policies if p is not None), None)

    def _gate(self, gate, up_activation):
        """`_dense_parts` of the gate, checked against `up`."""
        parts = _dense_parts("gate", gate)
        if parts[0].shape != (self.d, self.m):
            raise ValueError(
                f"`gate` must have a kernel of shape ({self.d}, {self.m}), as "
                f"`up`'s. Received: gate kernel of shape {parts[0].shape}"
            )
        if up_activation is not None:
            raise ValueError(
                "`up` must be a `Dense` without activation in a gated block (the "
                "activation is the gate's). Received: up with activation="
                f"{up_activation}"
            )
        return parts

    @staticmethod
    def _bias(name, given, layer_bias, size):
        """The bias given as an argument or by the `Dense` layer (not both)."""
        if layer_bias is None:
            return _bias(name, given, size)
        if given is not None:
            layer = name.removesuffix("_bias")
            raise ValueError(
                f"`{name}` must be None when `{layer}` is a `Dense` layer (its "
                "bias is used). Received: both"
            )
        return layer_bias

    def _activation(self, activation, own_activation):
        """`activation`, or the given `Dense` layer's (they must agree)."""
        if activation is None:
            if own_activation is None:
                where = "`gate`" if self.gated else "`up`"
                raise ValueError(
                    f"`activation` must be given when {where} is a kernel or a "
                    "`Dense` without activation (the dense block's hidden "
                    "activation). Received: activation=None"
                )
            return own_activation
        activation = utils.get_activation("activation", activation)
        if own_activation is not None and own_activation is not activation:
            own_name = getattr(own_activation, "__name__", own_activation)
            raise ValueError(
                "`activation` must be None or the activation of the given "
                f"`Dense` layer. Received: activation={activation.__name__!r}, "
                f"layer activation={own_name!r}"
            )
        return activation

    @property
    def use_bias(self):
        return any(bias is not None for bias in self.biases.values())


def upcycle_feed_forward(
    up,
    down,
    n_experts,
    gate=None,
    top_k=2,
    activation=None,
    up_bias=None,
    down_bias=None,
    router_initializer="glorot_uniform",
    expert_noise=0.0,
    seed=None,
    capacity_factor=None,
    load_balance_weight=0.01,
    router_z_loss_weight=0.0,
    dtype=None,
    name=None,
):
    """A built `MoEFeedForward` whose `n_experts` experts copy a dense block.

    The dense block is `down(act(x . up + b_up)) + b_down` (plain) or
    `down(act(x . gate + b_gate) * (x . up + b_up)) + b_down` (gated, a GLU as in
    Llama, Mistral and Qwen), given by its kernels or by its `Dense` layers.
    Every expert gets copies of these weights and the router's top-k weights
    are renormalised to sum to one, so at initialisation the returned layer
    computes the dense block's function exactly (up to float rounding), for
    any router; only `expert_noise > 0` changes that.

    Args:
        up: The up projection: a built `keras.layers.Dense` or a `(d, m)`
            kernel (an array or tensor of any float dtype, bfloat16 and
            float16 included: the float32 layer holds their values exactly).
            A `Dense` brings its bias and, for a plain block, its
            activation.
        down: The down projection: a built `Dense` without activation or an
            `(m, d)` kernel. A `Dense` brings its bias.
        n_experts: Positive integer, number of experts `E`.
        gate: `None` for a plain block, else the gate projection of a gated
            block: a built `Dense` or a `(d, m)` kernel. A `Dense` brings its
            activation and its bias (`MoEFeedForward`'s `gate_bias`).
        top_k: Integer from 1 to `n_experts`, experts per token.
        activation: The hidden activation (name or callable). `None` takes
            the activation of the `up` (plain) or `gate` (gated) `Dense`;
            given as well, it must be the same.
        up_bias: Optional `(m,)` bias of the up projection (when `up` is a
            kernel).
        down_bias: Optional `(d,)` bias of the down projection (when `down`
            is a kernel).
        router_initializer: Initializer of the router kernel. The function
            at initialisation does not depend on it; the routing does (a
            constant router sends every token to the same experts).
        expert_noise: Non-negative float: each expert's kernels get Gaussian
            noise of standard deviation `expert_noise * std(kernel)`. `0`
            (the default) keeps the upcycled layer exact; anything else
            breaks the experts' symmetry and the exactness.
        seed: Optional integer seed of the expert noise (NumPy's generator,
            the same on every backend).
        capacity_factor: `MoEFeedForward`'s `capacity_factor`; `None`
            (dropless) keeps the layer exact, a capacity that drops tokens
            does not.
        load_balance_weight: `MoEFeedForward`'s load-balancing loss weight.
        router_z_loss_weight: `MoEFeedForward`'s router z-loss weight.
        dtype: The layer's dtype policy; `None` takes the `Dense` layers'
            (else Keras's default).
        name: Optional layer name.

    Returns:
        A built `MoEFeedForward` of a `FeedForwardExperts` (`gated`,
        `use_bias`, `use_gate_bias` and `activation` as the dense block's, a
        missing up or down bias as zeros) and a `TopKRouter` whose top-k
        weights are renormalised (`normalize_top_k=True`).

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_moe.upcycling import upcycle_feed_forward
    >>> rng = np.random.default_rng(0)
    >>> up = rng.normal(size=(8, 16)).astype("float32")
    >>> down = rng.normal(size=(16, 8)).astype("float32")
    >>> moe = upcycle_feed_forward(up, down, n_experts=4, activation="relu")
    >>> x = rng.normal(size=(3, 8)).astype("float32")
    >>> dense = np.maximum(x @ up, 0) @ down
    >>> out = keras.ops.convert_to_numpy(moe(x))
    >>> bool(np.allclose(out, dense, rtol=1e-5, atol=1e-5))
    True

    References:
        - Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts
          from Dense Checkpoints", ICLR 2023 (arXiv:2212.05055, 2022).
    """
    block = _DenseBlock(up, down, gate, up_bias, down_bias, activation)
    n_experts = utils.check_positive_int("n_experts", n_experts)
    expert_noise = utils.check_non_negative_float("expert_noise", expert_noise)
    if seed is not None:
        seed = utils.check_positive_int("seed", seed, minimum=0)
    router_initializer = utils.get_initializer("router_initializer", router_initializer)
    dtype = block.policy if dtype is None else dtype
    experts = FeedForwardExperts(
        block.m,
        n_experts,
        activation=block.activation,
        gated=block.gated,
        use_bias=block.use_bias,
        use_gate_bias=block.biases["gate"] is not None,
        dtype=dtype,
        name="experts",
    )
    layer = MoEFeedForward(
        top_k=top_k,
        capacity_factor=capacity_factor,
        load_balance_weight=load_balance_weight,
        router_z_loss_weight=router_z_loss_weight,
        router_initializer=router_initializer,
        experts=experts,
        dtype=dtype,
        name=name,
    )
    layer.build((None, block.d))
    _copy_into(layer.experts, block, expert_noise, np.random.default_rng(seed))
    return layer


def _copy_into(experts, block, expert_noise, rng):
    """Sets every expert of a built `FeedForwardExperts` to the dense block:
    kernels with `expert_noise`, biases exactly (noise on them would only
    shift the outputs), a missing up or down bias as zeros."""
    n_experts = experts.n_experts
    for name in ("up", "gate", "down"):
        kernel = block.kernels[name]
        if kernel is not None:
            copies = expert_copies(kernel, n_experts, expert_noise, rng)
            getattr(experts, f"{name}_kernel").assign(copies)
    if not block.use_bias:
        return
    dtype = block.kernels["up"].dtype
    for name, size in (("up", block.m), ("down", block.d), ("gate", block.m)):
        bias = block.biases[name]
        if bias is None and name != "gate":
            bias = np.zeros((size,), dtype)
        if bias is not None:
            getattr(experts, f"{name}_bias").assign(expert_copies(bias, n_experts))
