"""The backends' grouped matmul (`keras_moe.backend.grouped_matmul`): rows
sorted by expert times their expert's kernel, against NumPy, and the sparse
mixture on it (`layout="grouped"`) against the blocks, values and gradients."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend
from keras_moe import routing
from tests.conftest import BACKEND
from tests.conftest import to_numpy

# The backends that have one: PyTorch (`torch._grouped_mm`) and JAX
# (`jax.lax.ragged_dot`, which `"auto"` takes on GPUs only: XLA emulates it
# densely on a CPU); TensorFlow has none.
HAS_GROUPED_MATMUL = {"torch": True, "jax": True, "tensorflow": False}


def test_which_backends_have_one():
    has = HAS_GROUPED_MATMUL[BACKEND]
    assert (backend.fast_path("grouped_matmul") is not None) == has
    assert backend.grouped_matmul_available() == has
    preferred = has
    if BACKEND == "jax":
        import jax

        preferred = jax.default_backend() == "gpu"
    assert backend.grouped_matmul_preferred() == preferred


def grouped_case():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype("float32")
    kernel = rng.normal(size=(4, 5, 3)).astype("float32")
    # An empty group, and two rows past the last group (masked tokens).
    ends = np.array([3, 3, 7, 10], "int32")
    return x, kernel, ends


def test_grouped_matmul_matches_numpy():
    if not backend.grouped_matmul_available():
        with pytest.raises(ValueError, match="Received: layout='grouped'"):
            routing.sparse_mixture(
                np.zeros((2, 5), "float32"),
                np.zeros((2, 1), "int32"),
                np.ones((2, 1), "float32"),
                4,
                lambda rows, layout: rows,
                layout="grouped",
            )
        return
    grouped_matmul = backend.fast_path("grouped_matmul")
    x, kernel, ends = grouped_case()
    out = to_numpy(
        grouped_matmul(ops.convert_to_tensor(x), ops.convert_to_tensor(kernel), ends)
    )
    starts = np.concatenate([[0], ends[:-1]])
    for g in range(len(ends)):
        rows = slice(starts[g], ends[g])
        np.testing.assert_allclose(out[rows], x[rows] @ kernel[g], rtol=1e-5, atol=1e-5)


def test_grouped_layout_matches_the_blocks_with_gradients():
    """The sparse mixture on the grouped matmul (`layout="grouped"`, which
    JAX runs on a CPU too when asked for) gives the blocks' outputs and
    gradients, masked tokens included."""
    if not backend.grouped_matmul_available():
        assert BACKEND == "tensorflow"
        return
    rng = np.random.default_rng(1)
    n, d, m, e = 20, 6, 4, 5
    x = rng.normal(size=(n, d)).astype("float32")
    kernel = rng.normal(size=(e, d, m)).astype("float32")
    logits = rng.normal(size=(n, e)).astype("float32")
    mask = np.arange(n) % 4 != 1
    weights, experts, _ = routing.top_k_gates(logits, 2)

    def loss_and_grads(layout):
        def loss(x, kernel):
            out, _, _ = routing.sparse_mixture(
                x,
                experts,
                weights,
                e,
                lambda rows, layout: ops.tanh(
                    layout.matmul(rows, layout.select(kernel))
                ),
                mask=mask,
                layout=layout,
            )
            return ops.sum(out * out), out

        return _value_and_grads(loss, x, kernel)

    grouped = loss_and_grads("grouped")
    blocks = loss_and_grads("blocks")
    for a, b in zip(grouped, blocks):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-5)
    # The masked tokens' outputs and gradients are zero, not undefined rows.
    out, x_grad, _ = (to_numpy(v) for v in grouped)
    np.testing.assert_array_equal(out[~mask], 0.0)
    np.testing.assert_array_equal(x_grad[~mask], 0.0)


def _value_and_grads(loss, x, kernel):
    """`(outputs, d loss / d x, d loss / d kernel)` on the backend."""
    if keras.backend.backend() == "jax":
        import jax

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, kernel
        )
        return (out, *grads)
    import torch

    x = torch.tensor(x, requires_grad=True)
    kernel = torch.tensor(kernel, requires_grad=True)
    value, out = loss(x, kernel)
    value.backward()
    return out.detach(), x.grad, kernel.grad
