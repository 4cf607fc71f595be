"""`EmptyLayout`: an expert bank runs on no row at all, also inside a traced
function with a dynamic token count, where the dispatch's run-time branch
for an empty batch is part of the graph."""

import numpy as np
import pytest

from keras_moe.layers import FeedForwardExperts
from keras_moe.routing import EmptyLayout
from tests.conftest import to_numpy


def bank():
    # Gemma 4's experts: gated, no biases, an output scale.
    experts = FeedForwardExperts(6, 4, gated=True, use_bias=False, output_scale=True)
    experts.build((None, 16))
    return experts


def run_empty(experts, tokens):
    return EmptyLayout(2).run(tokens, lambda layout, rows: experts(rows, layout=layout))


def test_no_rows_give_no_outputs():
    tokens = np.ones((3, 16), "float32")
    assert to_numpy(run_empty(bank(), tokens[:0])).shape == (0, 16)


@pytest.mark.only_backend("tensorflow")
def test_tensorflow_graph_with_an_output_scale():
    """TensorFlow's graph mode crashed the process (SIGFPE) on the output
    scale of the empty branch: the sparsified Gemma 4 in `fit`."""
    import tensorflow as tf

    experts = bank()
    run = tf.function(
        lambda tokens: run_empty(experts, tokens),
        input_signature=[tf.TensorSpec((None, 16), "float32")],
    )
    assert tuple(run(np.ones((3, 16), "float32")).shape) == (0, 16)
