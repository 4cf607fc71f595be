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


def gather_rows(x, indices):
    """`x[indices]` along axis 0 with a dense gradient.

    `tf.gather`'s gradient is `IndexedSlices`, whose conversion to a dense
    tensor XLA cannot compile when the batch size is dynamic (as in
    `Model.fit(jit_compile=True)`); here the gradient is a dense scatter-add.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def gather(x, indices):
        def grad(dy):
            dx = tf.math.unsorted_segment_sum(dy, indices, tf.shape(x)[0])
            return dx, None

        return tf.gather(x, indices), grad

    return gather(tf.convert_to_tensor(x), tf.convert_to_tensor(indices))
