"""`sparsify`'s errors: not a KerasHub model, no MoE block, a subclass of a
block it knows, a bad `router_dtype`, an unsupported keras-hub version."""

import importlib
import pathlib

import keras
import keras_hub
import pytest
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock

from keras_moe.kerashub import SUPPORTED_KERAS_HUB
from keras_moe.kerashub import sparsify
from tests.kerashub import families

# The module, which the package's `sparsify` function shadows.
sparsify_module = importlib.import_module("keras_moe.kerashub.sparsify")


def test_not_a_kerashub_model():
    model = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(TypeError, match="`model` must be a KerasHub.*Sequential"):
        sparsify(model)


def test_a_model_without_moe_blocks():
    backbone = keras_hub.models.MistralBackbone(intermediate_dim=8, **families.SHARED)
    with pytest.raises(ValueError, match="no MoE block.*Mixtral.*MistralBackbone"):
        sparsify(backbone)


def test_a_subclass_of_a_known_block():
    class MyBlock(MixtralSparseMoeBlock):
        pass

    model = families.backbone("mixtral")
    decoder = model.transformer_layers[0]
    decoder._sparse_moe_block.__class__ = MyBlock
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock.*subclass.*MyBlock"):
        sparsify(model)


def test_bad_router_dtype():
    with pytest.raises(ValueError, match="`router_dtype` must be one of"):
        sparsify(families.backbone("qwen3_moe"), router_dtype="bfloat16")


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0", "dev"])
def test_unsupported_keras_hub_version(version):
    with pytest.raises(ValueError, match=f"keras-hub.*Received.*{version!r}"):
        sparsify_module.check_keras_hub_version(version)


def test_supported_range_is_the_extras_pin():
    pyproject = pathlib.Path(__file__).parents[2] / "pyproject.toml"
    assert f'kerashub = ["keras-hub{SUPPORTED_KERAS_HUB}"]' in pyproject.read_text()
    sparsify_module.check_keras_hub_version(keras_hub.__version__)
    sparsify_module.check_keras_hub_version("0.32.1")
