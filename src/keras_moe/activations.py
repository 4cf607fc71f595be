"""Activations keras-moe adds to Keras's, by name (`utils.get_activation`)."""

import keras


@keras.saving.register_keras_serializable(package="keras_moe", name="gelu_tanh")
def gelu_tanh(x):
    """GELU's tanh approximation, `activation="gelu_tanh"` (Gemma's experts)."""
    return keras.activations.gelu(x, approximate=True)


# Names `utils.get_activation` knows besides Keras's own.
NAMED = {"gelu_tanh": gelu_tanh}
