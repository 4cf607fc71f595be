"""Gradients of a layer's outputs on every backend, for the NumPy references."""

import keras
import numpy as np
from keras import ops

from tests.conftest import to_numpy


def layer_gradients(layer, x, upstream, **call_kwargs):
    """`(y, dL/dx, {variable path: dL/dv})` of `L = sum(layer(x) * upstream)`
    over `layer`'s trainable variables, as NumPy (JAX: `stateless_call`;
    PyTorch: autograd; TensorFlow: a `GradientTape`)."""
    backend = keras.backend.backend()
    variables = layer.trainable_variables
    upstream = np.asarray(upstream, "float32")
    if backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            y, _ = layer.stateless_call(trainable, non_trainable, x, **call_kwargs)
            return ops.sum(y * upstream), y

        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, y), (grads, x_grad) = grad([v.value for v in variables], x)
    elif backend == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        for v in variables:
            v.value.grad = None
        y = layer(x, **call_kwargs)
        (y * torch.tensor(upstream)).sum().backward()
        x_grad = x.grad
        grads = [v.value.grad for v in variables]
    else:
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **call_kwargs)
            value = tf.reduce_sum(y * upstream)
        x_grad, *grads = tape.gradient(value, [x, *variables])
    grads = {
        v.path: np.zeros(v.shape, "float32") if g is None else to_numpy(g)
        for v, g in zip(variables, grads)
    }
    return to_numpy(y), to_numpy(x_grad), grads
