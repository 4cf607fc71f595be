"""The experts of a sparsified KerasHub model: keras-moe `FeedForwardExperts`
layers that own their variables, in place of KerasHub's expert banks, with
KerasHub's variable names, paths, order and values, so that the model has
the same weights (no duplicate, none of the old banks') and writes the same
checkpoint as KerasHub's own model."""

import h5py
import keras
import numpy as np
import pytest
from keras_hub.src.models.gemma4.gemma4_moe import Gemma4MoEBlock
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssExperts
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralMoeExperts
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeExperts
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3MoeExperts
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenMoeExperts

from keras_moe.kerashub import sparsify
from keras_moe.layers import FeedForwardExperts
from tests.conftest import to_numpy
from tests.kerashub import families

KERAS_HUB_BANKS = (
    MixtralMoeExperts,
    QwenMoeExperts,
    Qwen3MoeExperts,
    Qwen3_5MoeExperts,
    GptOssExperts,
    Gemma4MoEBlock,
)


def layers_of(model, cls):
    return [layer for layer in model._flatten_layers() if isinstance(layer, cls)]


def h5_arrays(path):
    """`{dataset path: array}` of a `.weights.h5` file."""
    arrays = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            arrays[name] = item[()]

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


@pytest.mark.parametrize("family", families.FAMILIES)
def test_the_experts_are_feed_forward_experts_owning_the_variables(family, tmp_path):
    model = families.backbone(family)
    families.randomize(model)
    old_banks = layers_of(model, KERAS_HUB_BANKS)
    old_ids = {id(v) for bank in old_banks for v in bank.weights}
    paths = [v.path for v in model.weights]
    trainable = [v.path for v in model.trainable_weights]
    values = {v.path: to_numpy(v).copy() for v in model.weights}
    model.save_weights(tmp_path / "kerashub.weights.h5")

    sparsify(model)
    banks = layers_of(model, FeedForwardExperts)
    assert len(banks) == len(old_banks) >= 1
    assert not layers_of(model, KERAS_HUB_BANKS)
    for bank, old in zip(banks, old_banks, strict=True):
        assert bank.built
        assert bank.path == old.path
        assert bank.name == old.name
        assert [v.path for v in bank.weights] == [v.path for v in old.weights]
        assert bank.trainable_weights == bank.weights
        assert sorted(bank.expert_weight_axes()) == sorted(v.name for v in bank.weights)
    # The model's weights: the same paths in the same order, each variable
    # once, the experts' variables the new banks' own, none of the old ones.
    ids = [id(v) for v in model.weights]
    assert [v.path for v in model.weights] == paths
    assert [v.path for v in model.trainable_weights] == trainable
    assert len(set(ids)) == len(ids)
    assert not old_ids & set(ids)
    assert {id(v) for bank in banks for v in bank.weights} <= set(ids)
    for variable in model.weights:
        np.testing.assert_array_equal(to_numpy(variable), values[variable.path])

    # The checkpoint is KerasHub's: the same datasets, the same arrays.
    model.save_weights(tmp_path / "sparse.weights.h5")
    kerashub = h5_arrays(tmp_path / "kerashub.weights.h5")
    sparse = h5_arrays(tmp_path / "sparse.weights.h5")
    assert sorted(sparse) == sorted(kerashub)
    for name, array in kerashub.items():
        np.testing.assert_array_equal(sparse[name], array)

    # Sparsified again (another router dtype): the same banks.
    sparsify(model, router_dtype="float32")
    assert [id(layer) for layer in layers_of(model, FeedForwardExperts)] == [
        id(bank) for bank in banks
    ]
    assert [id(v) for v in model.weights] == ids


@pytest.mark.only_backend("torch")
@pytest.mark.parametrize("family", ["mixtral", "gemma4"])
def test_torch_parameters_are_the_new_variables(family):
    """Every PyTorch module's parameters are its layer's weights: none of the
    old banks' (which they would keep alive)."""
    model = sparsify(families.backbone(family))
    for layer in model._flatten_layers(include_self=True):
        parameters = {id(p) for p in layer.torch_params.values()}
        assert parameters == {id(v.value) for v in layer.weights}, layer.path


def test_a_bank_whose_variables_differ_is_refused():
    """A KerasHub bank with other variables than its replacement's (a
    KerasHub release that changed it) fails loudly."""
    model = families.backbone("mixtral")
    bank = layers_of(model, MixtralMoeExperts)[0]
    bank.intermediate_dim += 1
    with pytest.raises(ValueError, match="cannot replace.*KerasHub's layers"):
        sparsify(model)


def test_gemma4_bank_runs_as_feed_forward_experts():
    """Gemma 4's bank takes its decoder's `(tokens, dispatch_weights)` call,
    and a dispatch's `(rows, layout=...)` call like any `FeedForwardExperts`
    (no layout: `(E, c, d)` rows)."""
    model = sparsify(families.backbone("gemma4"))
    bank = layers_of(model, FeedForwardExperts)[0]
    rng = np.random.default_rng(0)
    for variable in bank.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    rows = rng.normal(size=(4, 3, families.D)).astype("float32")
    up = np.einsum("ecd,edm->ecm", rows, to_numpy(bank.up_kernel))
    gate = np.einsum("ecd,edm->ecm", rows, to_numpy(bank.gate_kernel))
    gelu = to_numpy(keras.activations.gelu(gate, approximate=True))
    expected = np.einsum("ecm,emd->ecd", gelu * up, to_numpy(bank.down_kernel))
    expected = expected * to_numpy(bank.scale)[:, None, None]
    np.testing.assert_allclose(to_numpy(bank(rows)), expected, rtol=1e-5, atol=1e-5)
    # Token 0 to expert 2 alone, token 1 to experts 0 and 3.
    dispatch = np.zeros((2, 4), "float32")
    dispatch[0, 2] = 1.0
    dispatch[1, [0, 3]] = [0.25, 0.75]
    tokens = rows[0, :2]
    per_expert = to_numpy(bank(np.broadcast_to(tokens, (4, 2, families.D))))
    mixed = np.einsum("te,etd->td", dispatch, per_expert)
    np.testing.assert_allclose(
        to_numpy(bank(tokens, dispatch)), mixed, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("family", ["mixtral", "gemma4"])
def test_a_symbolic_call_of_a_bank_has_the_tokens_shape(family):
    """The banks take symbolic inputs as `FeedForwardExperts` does: the
    mixed tokens have the tokens' shape."""
    model = sparsify(families.backbone(family))
    bank = layers_of(model, FeedForwardExperts)[0]
    tokens = keras.Input((families.D,), batch_size=6)
    if family == "gemma4":
        outputs = bank(tokens, keras.Input((4,), batch_size=6))
    else:
        weights = keras.Input((2,), batch_size=6)
        experts = keras.Input((2,), batch_size=6, dtype="int32")
        outputs = bank(tokens, gates=(weights, experts))
    assert tuple(outputs.shape) == (6, families.D)
