"""Gates: router logits, gate values, the soft mixtures and top-k selection.

Router arithmetic (logits, activations, top-k weights) runs in float32
whatever the layer's dtype policy (unless a router is asked to compute in
its layer's compute dtype, `router_dtype="compute"`, to reproduce a model
that routes in it); mixed outputs are cast back to the experts' compute
dtype.

Einsum legend: `n` tokens (flattened leading axes), `e` experts, `u` units.
"""

import keras
from keras import ops

from keras_moe import backend

# The values of the routers' `router_dtype` argument.
ROUTER_DTYPES = ("float32", "compute")


def router_dtype_of(router_dtype, compute_dtype):
    """The dtype a router computes in: `"float32"`, or with `"compute"` the
    layer's `compute_dtype`."""
    return compute_dtype if router_dtype == "compute" else "float32"


def gate_logits(inputs, kernel, bias=None, dtype="float32"):
    """Router logits `z = x . V + b`, by default in float32.

    Args:
        inputs: `(n, d)` tensor, any dtype.
        kernel: `(d, g)` gating kernel (`g` gates).
        bias: optional `(g,)` gating bias.
        dtype: dtype of the arithmetic and of the result (`"float32"`; a
            layer's compute dtype to reproduce models that route in it).

    Returns:
        `(n, g)` logits of `dtype`.
    """
    logits = ops.matmul(ops.cast(inputs, dtype), ops.cast(kernel, dtype))
    if bias is not None:
        logits = logits + ops.cast(bias, dtype)
    return logits


def gate_values(logits, activation):
    """The gate values `g(z)` of the soft mixture, in float32.

    `activation` acts on the last axis (the experts), so `"softmax"` gives
    gates that sum to one over the experts of each token or filter.
    """
    return ops.cast(activation(ops.cast(logits, "float32")), "float32")


def soft_mixture(expert_outputs, gates):
    """Soft mixture over all experts: `y[n, u] = sum_e g[n, e] * h[n, e, u]`.

    Args:
        expert_outputs: `(n, e, u)` expert outputs in the compute dtype.
        gates: `(n, e)` gate values.
    """
    gates = ops.cast(gates, expert_outputs.dtype)
    fast = backend.fast_path("soft_mixture")
    if fast is not None:
        return fast(expert_outputs, gates)
    # Multiply-and-sum, not an einsum: XLA (TensorFlow) fuses it with the
    # experts' bias and activation like the original formulation, where the
    # einsum compiles to a transposed copy of `h` and a batched mat-vec
    # (`python -m benchmarks.soft_mixing`: TensorFlow forward 1.13x the
    # original against 1.00x; PyTorch forward+backward 1.03x against 0.90x).
    return ops.sum(expert_outputs * ops.expand_dims(gates, -1), axis=1)


def soft_mixture_per_filter(expert_outputs, gates):
    """Per-filter soft mixture of convolutional experts.

    `y[b, *s, f] = sum_k g[b, (*s,) f, k] * h[b, *s, f, k]`.

    Args:
        expert_outputs: `(b, *spatial, f, k)` expert outputs in the compute
            dtype.
        gates: `(b, f, k)` gates shared by every position, or gates per
            position of the same shape as `expert_outputs`.
    """
    gates = ops.cast(gates, expert_outputs.dtype)
    # Broadcast multiply-and-sum over the spatial axes as they are (no
    # flattening, no einsum): measured faster forward and forward+backward
    # on TensorFlow and JAX (benchmarks/README.md).
    while len(gates.shape) < len(expert_outputs.shape):
        gates = ops.expand_dims(gates, 1)
    return ops.sum(expert_outputs * gates, axis=-1)


def top_k_gates(logits, top_k, normalize_top_k=True, softmax_before_top_k=False):
    """Top-k selection over the gate logits and the chosen experts' weights.

    With `normalize_top_k=True` the weights are the softmax over the `top_k`
    chosen logits (they sum to one); with `False` they are the full softmax's
    values at the chosen experts. The arithmetic runs in the logits' dtype.

    `softmax_before_top_k` picks the order of the operations, not the math:
    `False` (the default) takes the top-k of the logits, then the softmax over
    them (GPT-OSS); `True` takes the softmax over all experts, then its top-k,
    then (with `normalize_top_k`) divides them by their sum (Mixtral, Qwen MoE,
    Gemma 4). Both give the same weights in exact arithmetic; in float16 or
    bfloat16 they round differently, and the top-k of the rounded
    probabilities can break a tie that the logits do not have, so a model is
    reproduced bit for bit only in its own order.

    Args:
        logits: `(n, e)` gate logits.
        top_k: Python int, experts per token.
        normalize_top_k: Python bool.
        softmax_before_top_k: Python bool.

    Returns:
        `(weights, experts, probs)`: `(n, top_k)` weights, `(n, top_k)` int32
        expert indices (best first) and the `(n, e)` full softmax, the first
        and last in the logits' dtype.
    """
    probs = ops.softmax(logits, axis=-1)
    if softmax_before_top_k:
        weights, experts = ops.top_k(probs, top_k)
        experts = ops.cast(experts, "int32")
        if normalize_top_k:
            weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        return weights, experts, probs
    top_logits, experts = ops.top_k(logits, top_k)
    experts = ops.cast(experts, "int32")
    if normalize_top_k and top_k == 1:
        weights = ops.ones_like(top_logits)
    elif normalize_top_k:
        weights = ops.softmax(top_logits, axis=-1)
    else:
        weights = ops.take_along_axis(probs, experts, axis=-1)
    return weights, experts, probs


def noisy_logits(logits, inputs, noise_kernel, seed_generator):
    """Noisy top-k gating (Shazeer et al. 2017), for training only.

    `z + N(0, 1) * softplus(x . W_noise)`, in the logits' dtype, with the
    noise drawn from `seed_generator` (a `keras.random.SeedGenerator`).
    """
    logits = ops.convert_to_tensor(logits)
    dtype = logits.dtype
    std = ops.softplus(gate_logits(inputs, noise_kernel, dtype=dtype))
    noise = keras.random.normal(ops.shape(logits), dtype=dtype, seed=seed_generator)
    return logits + noise * std
