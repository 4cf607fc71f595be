"""keras-moe's fast paths for the tensorflow backend (see `keras_moe.backend`)."""


def batch_jacobian(fn, x):
    """Per-sample Jacobians `(batch, *out, *in)` of a function applied row-wise.

    `fn` maps a batch `(batch, *in)` to `(batch, *out)` with every output row
    depending only on its own input row (a layer without cross-sample
    interaction). TensorFlow: `tf.GradientTape.batch_jacobian`.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.batch_jacobian(y, x)
