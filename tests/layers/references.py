"""NumPy references, mixed-precision checks and an op counter shared by
the layer tests."""

import itertools

import keras
import numpy as np
from keras.src.backend.common.variables import AutocastScope

# The unit roundoff `u` of each compute dtype: half its epsilon.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_conv(x, kernel, strides, padding, dilation):
    """Channels-last convolution (cross-correlation), one slice per kernel tap.

    `x` `(b, *spatial, c_in)`, `kernel` `kernel_size + (c_in, c_out)`;
    padding as TensorFlow defines it (`"same"` pads the extra row at the end).
    """
    rank = x.ndim - 2
    kernel_size = kernel.shape[:rank]
    effective = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation)]
    if padding == "causal":
        pads = [(effective[0] - 1, 0)]
    elif padding == "same":
        pads = []
        for n, e, s in zip(x.shape[1:-1], effective, strides):
            total = max((-(-n // s) - 1) * s + e - n, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(0, 0)] * rank
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    out = [(n - e) // s + 1 for n, e, s in zip(x.shape[1:-1], effective, strides)]
    y = np.zeros((x.shape[0], *out, kernel.shape[-1]))
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(t * d, t * d + (n - 1) * s + 1, s)
            for t, n, s, d in zip(tap, out, strides, dilation)
        )
        y += x[(slice(None), *window)] @ kernel[tap]
    return y


def rounding_bound(n, u):
    """Higham's `gamma_n = n u / (1 - n u)`: the relative error of `n`
    successive roundings ("Accuracy and Stability of Numerical Algorithms",
    2002, 3.1); a dot product of `n` rounded terms is within `gamma_{n+2}` of
    `sum |x_i w_i|`."""
    return n * u / (1 - n * u)


def call_with_float32_router(mixed, x, compute_dtype):
    """Calls `mixed` (a DenseMoE or ConvNDMoE under a mixed policy) on `x` and
    asserts the dtypes: the output and, under autocast, the expert kernel in
    `compute_dtype`; every variable, and the gating weights under autocast,
    in float32. Returns the output."""
    out = mixed(x)
    assert keras.backend.standardize_dtype(out.dtype) == compute_dtype
    for w in mixed.weights:
        assert keras.backend.standardize_dtype(w.dtype) == "float32"
    with AutocastScope(compute_dtype):
        for w in (mixed.gating_kernel, mixed.gating_bias):
            assert keras.backend.standardize_dtype(w.value.dtype) == "float32"
        assert (
            keras.backend.standardize_dtype(mixed.expert_kernel.value.dtype)
            == compute_dtype
        )
    return out


def count_ops_calls(monkeypatch, names):
    """Counts the calls of the `keras.ops` functions `names` from now on:
    returns `{name: calls}`, kept up to date."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(keras.ops, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(keras.ops, name, counting)
    return counts
