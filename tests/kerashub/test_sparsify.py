"""`keras_moe.kerashub.sparsify` on tiny models of every KerasHub MoE family:
the same variables, outputs, generations, saving and checkpoints as KerasHub's
all-experts blocks, and the same `model.fit`: from the same weights and a
fresh optimizer, two epochs of two steps each of SGD with momentum give the
same per-epoch losses (auxiliary losses included) and the same weights."""

import keras
import numpy as np
import pytest

from keras_moe.kerashub import _blocks
from keras_moe.kerashub import _experts
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
    """The sparsified blocks (Gemma 4: the router) and their banks."""
    modules = (_blocks.__name__, _experts.__name__)
    return [
        layer for layer in model._flatten_layers() if type(layer).__module__ in modules
    ]


def assert_close(actual, expected, rtol=RTOL):
    """Within `rtol` relative to the largest magnitude of `expected`."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def fit(model, x, y, weights):
    """Two epochs of `fit`, one sequence a step (4 steps), with a new
    optimizer whose momentum carries each step's gradients into the next;
    returns the per-epoch losses and the weights after."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        sampler="greedy",
        weighted_metrics=[],
    )
    history = model.fit(
        x, y, sample_weight=weights, batch_size=1, epochs=2, shuffle=False, verbose=0
    )
    return history.history["loss"], values(model)


def generate(model, x):
    prompt = {
        "token_ids": x["token_ids"].copy(),
        "padding_mask": x["padding_mask"].copy(),
    }
    prompt["padding_mask"][:, 3:] = 0  # three prompt tokens, then generate
    prompt["token_ids"][:, 3:] = 0
    return to_numpy(model.generate(prompt, stop_token_ids=None)["token_ids"])


# The checkpoints carry the trained optimizer's momentum, which Keras does not
# load into the reloaded model's unbuilt optimizer; only model weights matter.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
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
    model.compile(sampler="greedy")

    dense_logits = to_numpy(model(x))
    dense_tokens = generate(model, x)
    dense_losses, dense_trained = fit(model, x, y, weights)
    set_values(model, initial)

    assert sparsify(model) is model
    blocks = sparse_blocks(model)
    assert len(blocks) == 2  # the block (Gemma 4: the router) and its bank
    # The experts' variables are the new banks' (`test_experts.py`), with
    # the same paths, order and values.
    assert [v.path for v in model.weights] == paths
    assert len({id(v) for v in model.weights}) == len(paths)
    for before, after in zip(initial, values(model), strict=True):
        np.testing.assert_array_equal(after, before)

    assert_close(to_numpy(model(x))[real], dense_logits[real])
    np.testing.assert_array_equal(generate(model, x), dense_tokens)
    # The losses (with the blocks' auxiliary losses) and the gradients: the
    # same `fit` from the same weights and optimizer state moves every weight
    # as KerasHub's model does, each step from the weights the last one left.
    # Measured on all three backends: the per-epoch losses within 2e-7
    # relative, the weights' changes within 9e-6 relative to each variable's
    # largest change (float32 sums in another order, through four steps).
    sparse_losses, sparse_trained = fit(model, x, y, weights)
    assert len(sparse_losses) == len(dense_losses) == 2
    np.testing.assert_allclose(sparse_losses, dense_losses, rtol=RTOL)
    for sparse, dense, before in zip(sparse_trained, dense_trained, initial):
        assert_close(sparse - before, dense - before, rtol=1e-4)

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
