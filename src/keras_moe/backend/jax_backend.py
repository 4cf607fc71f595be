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
