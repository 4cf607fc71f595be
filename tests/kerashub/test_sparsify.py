"""`keras_moe.kerashub.sparsify` on tiny models of every KerasHub MoE family:
the same variables, outputs, gradients and `fit` losses, generations, saving
and checkpoints as KerasHub's all-experts blocks."""

import keras
import numpy as np
import pytest

from keras_moe.kerashub import _blocks
from keras_moe.kerashub import sparsify
from tests.conftest import to_numpy
from tests.kerashub import families

RTOL = 1e-5


def values(model):
    return [to_numpy(v).copy() for v in model.weights]


def set_values(model, arrays):
    for variable, array in zip(model.weights, arrays):
        variable.assign(array)


def sparse_blocks(model):
    return [
        layer
        for layer in model._flatten_layers()
        if type(layer).__module__ == _blocks.__name__
    ]


def assert_close(actual, expected, rtol=RTOL):
    """Within `rtol` relative to the largest magnitude of `expected`."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def generate(model, x):
    prompt = {
        "token_ids": x["token_ids"].copy(),
        "padding_mask": x["padding_mask"].copy(),
    }
    prompt["padding_mask"][:, 3:] = 0  # three prompt tokens, then generate
    prompt["token_ids"][:, 3:] = 0
    return to_numpy(model.generate(prompt, stop_token_ids=None)["token_ids"])


@pytest.mark.parametrize("family", families.FAMILIES)
def test_sparsify_keeps_weights_outputs_training_and_generation(family, tmp_path):
    keras.utils.set_random_seed(3)
    model = families.causal_lm(family)
    families.randomize(model)
    x = families.inputs(family)
    y = np.random.default_rng(4).integers(0, families.VOCAB, x["token_ids"].shape)
    weights = x["padding_mask"]
    real = x["padding_mask"].astype(bool)
    initial = values(model)
    paths = [v.path for v in model.weights]
    ids = [id(v) for v in model.weights]
    model.compile(
        optimizer=keras.optimizers.SGD(0.5), sampler="greedy", weighted_metrics=[]
    )

    dense_logits = to_numpy(model(x))
    dense_tokens = generate(model, x)
    dense_loss = model.train_on_batch(x, y, sample_weight=weights)
    dense_step = [after - before for after, before in zip(values(model), initial)]
    set_values(model, initial)

    assert sparsify(model) is model
    blocks = sparse_blocks(model)
    assert len(blocks) == 2  # the block (Gemma 4: the router) and its bank
    assert [v.path for v in model.weights] == paths
    assert [id(v) for v in model.weights] == ids
    for before, after in zip(initial, values(model)):
        np.testing.assert_array_equal(after, before)

    assert_close(to_numpy(model(x))[real], dense_logits[real])
    np.testing.assert_array_equal(generate(model, x), dense_tokens)
    # The loss (with the blocks' auxiliary losses) and the gradients: one
    # SGD step moves every weight as KerasHub's model does.
    sparse_loss = model.train_on_batch(x, y, sample_weight=weights)
    np.testing.assert_allclose(sparse_loss, dense_loss, rtol=RTOL)
    sparse_step = [after - before for after, before in zip(values(model), initial)]
    for sparse, dense in zip(sparse_step, dense_step):
        assert_close(sparse, dense, rtol=1e-4)

    # The `.keras` file reloads as KerasHub's model, with the same outputs,
    # and sparsifies again; checkpoints move between the two both ways.
    trained = values(model)
    model.save(tmp_path / "sparse.keras")
    model.save_weights(tmp_path / "sparse.weights.h5")
    restored = keras.saving.load_model(tmp_path / "sparse.keras")
    assert not sparse_blocks(restored)
    restored_logits = to_numpy(restored(x))
    assert_close(restored_logits[real], to_numpy(model(x))[real])
    set_values(restored, initial)
    restored.load_weights(tmp_path / "sparse.weights.h5")
    for a, b in zip(values(restored), trained):
        np.testing.assert_array_equal(a, b)
    restored.save_weights(tmp_path / "dense.weights.h5")
    set_values(model, initial)
    model.load_weights(tmp_path / "dense.weights.h5")
    for a, b in zip(values(model), trained):
        np.testing.assert_array_equal(a, b)
    sparsify(restored)
    assert len(sparse_blocks(restored)) == 2
    assert_close(to_numpy(restored(x))[real], restored_logits[real])
