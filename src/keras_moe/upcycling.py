"""Sparse upcycling of a dense feed-forward block into an `MoEFeedForward`.

Sparse upcycling (Komatsuzaki et al., 2022) starts a mixture of experts from
a trained dense network: every expert is a copy of the dense feed-forward
block. With top-k weights that sum to one (`MoEFeedForward` renormalises its
top-k weights), `sum_j w_j * ffn(x) = ffn(x)`, so the upcycled layer computes
exactly what the dense block computed, whatever the router says, and
training continues from the dense network's quality. `expert_noise` breaks
that symmetry on purpose (and with it the exactness).

For KerasHub's dense language models (Mistral, Llama, Qwen3), see
`keras_moe.kerashub.upcycle`, which turns a whole backbone into KerasHub's
MoE backbone of the same family.
"""

import keras
import numpy as np

from keras_moe import utils
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
        A built `MoEFeedForward` (`gated`, `use_bias`, `gate_bias` and
        `activation` as the dense block's, a missing up or down bias as
        zeros, `normalize_top_k=True`).

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
    up_kernel, up_layer_bias, up_activation, up_policy = _dense_parts("up", up)
    down_kernel, down_layer_bias, down_activation, down_policy = _dense_parts(
        "down", down
    )
    d, m = up_kernel.shape
    if down_kernel.shape != (m, d):
        raise ValueError(
            f"`down` must have a kernel of shape ({m}, {d}) for an `up` kernel of "
            f"shape ({d}, {m}). Received: down kernel of shape {down_kernel.shape}"
        )
    if down_activation is not None:
        raise ValueError(
            "`down` must be a `Dense` without activation (an expert's output "
            f"projection is linear). Received: down with activation={down_activation}"
        )
    gated = gate is not None
    gate_kernel, gate_bias, gate_activation, gate_policy = None, None, None, None
    if gated:
        gate_kernel, gate_bias, gate_activation, gate_policy = _dense_parts(
            "gate", gate
        )
        if gate_kernel.shape != (d, m):
            raise ValueError(
                f"`gate` must have a kernel of shape ({d}, {m}), as `up`'s. "
                f"Received: gate kernel of shape {gate_kernel.shape}"
            )
        if up_activation is not None:
            raise ValueError(
                "`up` must be a `Dense` without activation in a gated block (the "
                "activation is the gate's). Received: up with activation="
                f"{up_activation}"
            )
    if up_layer_bias is not None and up_bias is not None:
        raise ValueError(
            "`up_bias` must be None when `up` is a `Dense` layer (its bias is "
            "used). Received: both"
        )
    if down_layer_bias is not None and down_bias is not None:
        raise ValueError(
            "`down_bias` must be None when `down` is a `Dense` layer (its bias is "
            "used). Received: both"
        )
    up_bias = _bias("up_bias", up_bias, m) if up_layer_bias is None else up_layer_bias
    down_bias = (
        _bias("down_bias", down_bias, d) if down_layer_bias is None else down_layer_bias
    )
    own_activation = gate_activation if gated else up_activation
    if activation is None:
        if own_activation is None:
            where = "`gate`" if gated else "`up`"
            raise ValueError(
                f"`activation` must be given when {where} is a kernel or a `Dense` "
                "without activation (the dense block's hidden activation). "
                "Received: activation=None"
            )
        activation = own_activation
    else:
        activation = utils.get_activation("activation", activation)
        if own_activation is not None and own_activation is not activation:
            raise ValueError(
                "`activation` must be None or the activation of the given "
                f"`Dense` layer. Received: activation={activation.__name__!r}, "
                f"layer activation={getattr(own_activation, '__name__', own_activation)!r}"
            )
    if seed is not None:
        seed = utils.check_positive_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    if dtype is None:
        dtype = next(
            (p for p in (up_policy, gate_policy, down_policy) if p is not None), None
        )
    use_bias = up_bias is not None or down_bias is not None or gate_bias is not None
    layer = MoEFeedForward(
        intermediate_dim=m,
        n_experts=n_experts,
        top_k=top_k,
        activation=activation,
        gated=gated,
        use_bias=use_bias,
        gate_bias=gate_bias is not None,
        normalize_top_k=True,
        capacity_factor=capacity_factor,
        load_balance_weight=load_balance_weight,
        router_z_loss_weight=router_z_loss_weight,
        router_initializer=router_initializer,
        dtype=dtype,
        name=name,
    )
    n_experts = layer.n_experts
    expert_noise = utils.check_non_negative_float("expert_noise", expert_noise)
    layer.build((None, d))
    layer.expert_up_kernel.assign(
        expert_copies(up_kernel, n_experts, expert_noise, rng)
    )
    if gated:
        layer.expert_gate_kernel.assign(
            expert_copies(gate_kernel, n_experts, expert_noise, rng)
        )
    layer.expert_down_kernel.assign(
        expert_copies(down_kernel, n_experts, expert_noise, rng)
    )
    if use_bias:
        # Biases are copied exactly: noise on them would only shift the outputs.
        up_bias = np.zeros((m,), up_kernel.dtype) if up_bias is None else up_bias
        down_bias = np.zeros((d,), up_kernel.dtype) if down_bias is None else down_bias
        layer.expert_up_bias.assign(expert_copies(up_bias, n_experts))
        layer.expert_down_bias.assign(expert_copies(down_bias, n_experts))
    if gate_bias is not None:
        layer.expert_gate_bias.assign(expert_copies(gate_bias, n_experts))
    return layer
