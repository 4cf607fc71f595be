"""`FeedForwardExperts` called on a symbolic input (the functional API):
Keras asks `compute_output_shape` for the output's shape."""

import keras

from keras_moe.layers import FeedForwardExperts


def test_a_symbolic_call_has_the_rows_shape():
    experts = FeedForwardExperts(8, 4, gated=True)
    rows = keras.Input((4, 3, 16))
    outputs = experts(rows)
    assert tuple(outputs.shape) == (None, 4, 3, 16)
    model = keras.Model(rows, outputs)
    assert model.output_shape == (None, 4, 3, 16)
