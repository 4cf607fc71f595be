"""keras-moe's fast paths for the jax backend (see `keras_moe.backend`)."""


def batch_jacobian(fn, x):
    """Per-sample Jacobians `(batch, *out, *in)` of a function applied row-wise.

    `fn` maps a batch `(batch, *in)` to `(batch, *out)` with every output row
    depending only on its own input row (a layer without cross-sample
    interaction). JAX: `jax.jacrev` of one sample, `jax.vmap`-ed over the batch.
    """
    import jax

    def one(sample):
        return fn(sample[None])[0]

    return jax.vmap(jax.jacrev(one))(x)


def soft_mixture(expert_outputs, gates):
    """`y[n, u] = sum_e g[n, e] * h[n, e, u]` (`routing.soft_mixture`).

    JAX: an einsum, which XLA:CPU runs faster forward+backward than the
    multiply-and-sum of the generic path (0.83x against 0.92x the original
    formulation, `DenseMoE` 1024 x 512 -> 512, 8 experts;
    `python -m benchmarks.soft_mixing`).
    """
    import jax.numpy as jnp

    return jnp.einsum("neu,ne->nu", expert_outputs, gates)


def grouped_matmul(x, kernel, group_ends):
    """Rows sorted by group times their group's kernel: `(r, d) -> (r, m)`.

    `kernel` is `(g, d, m)` and `group_ends` the `(g,)` cumulative row
    counts; rows past `group_ends[-1]` are left undefined. JAX:
    `jax.lax.ragged_dot`, a grouped GEMM on GPU (no padding, no weight
    copies); on CPU XLA emulates it densely, over every group
    (`grouped_matmul_preferred` keeps the automatic choice to GPUs).
    """
    import jax
    import jax.numpy as jnp

    group_ends = jnp.asarray(group_ends, "int32")
    sizes = jnp.diff(group_ends, prepend=jnp.zeros((1,), "int32"))
    return jax.lax.ragged_dot(x, jnp.asarray(kernel, x.dtype), sizes)


def grouped_matmul_preferred():
    """Whether the automatic dispatch takes `grouped_matmul`: on a GPU,
    outside a `keras.distribution` (whose sharded expert weights the
    capacity layout keeps in place). It runs everywhere when asked for
    (`layout="grouped"`)."""
    import jax
    import keras

    return jax.default_backend() == "gpu" and keras.distribution.distribution() is None
