"""`router_dtype="float32"` on a quantized or LoRA router `Dense`.

The float32 router computes what the router layer computes (dequantized
kernel, Keras's input quantizer, LoRA, bias), whether the layer was quantized
or adapted before `sparsify` or after it: in a float32 policy it equals the
compute router (KerasHub's own `Dense` call). What it cannot reproduce
(float8) it refuses, naming `router_dtype` and the layer.
"""

import keras
import numpy as np
import pytest

from keras_moe.kerashub import sparsify
from tests.conftest import to_numpy
from tests.kerashub import families
from tests.kerashub.test_blocks import inputs
from tests.kerashub.test_blocks import make_block
from tests.kerashub.test_blocks import run
from tests.kerashub.test_blocks import sparsify_block
from tests.kerashub.test_sparsify import assert_close

FAMILIES = families.FAMILIES

# variant -> what is done to the router `Dense`: Keras's quantization modes
# (int4 per output channel, and in groups of 8 inputs with zero points,
# whose call skips the input quantizer) and LoRA, alone or on int8.
VARIANTS = ["int8", "int4", "int4_grouped", "lora", "int8_lora"]
ORDERS = ["adapt_then_sparsify", "sparsify_then_adapt"]


def router_of(block, family):
    """The block's router `Dense`."""
    if family == "gemma4":
        return block.moe_router.proj
    if family == "gpt_oss":
        return block.router.router_dense
    if family == "qwen3_5_moe":
        return block._router_gate
    return block._sparse_feedforward_gate_dense


def adapt(dense, variant):
    """Quantizes the router and/or gives it LoRA factors far from zero."""
    if variant.startswith("int8"):
        dense.quantize("int8")
    elif variant == "int4":
        dense.quantize(
            "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=-1)
        )
    elif variant == "int4_grouped":
        dense.quantize(
            "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=8)
        )
    if variant.endswith("lora"):
        dense.enable_lora(2)
        rng = np.random.default_rng(5)
        for factor in (dense.lora_kernel_a, dense.lora_kernel_b):
            factor.assign(rng.normal(size=factor.shape).astype("float32"))


def adapted_block(family, variant, order, router_dtype):
    block = make_block(family)
    if order == "sparsify_then_adapt":
        sparsify_block(block, router_dtype)
    adapt(router_of(block, family), variant)
    if order == "adapt_then_sparsify":
        sparsify_block(block, router_dtype)
    return block


# Every family with an int8 router with LoRA (the router's place in each
# block); every variant on GPT-OSS's router, which has a bias too.
CASES = [(family, "int8_lora") for family in FAMILIES] + [
    ("gpt_oss", variant) for variant in VARIANTS if variant != "int8_lora"
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("family", "variant"), CASES)
def test_float32_router_computes_the_quantized_or_lora_router(family, variant, order):
    x = inputs()
    plain = [to_numpy(y) for y in run(make_block(family), family, x)]
    results = {}
    for router_dtype in ("compute", "float32"):
        block = adapted_block(family, variant, order, router_dtype)
        results[router_dtype] = [to_numpy(y) for y in run(block, family, x)]
    (outputs, routing), (expected_outputs, expected_routing) = (
        results["float32"],
        results["compute"],
    )
    # The variant changes the router by far more than the tolerance below.
    assert np.abs(expected_routing - plain[1]).max() > 1e-3
    # The returned router logits (GPT-OSS: scores; Gemma 4: dispatch weights)
    # and the outputs, the float32 router's as the router layer's own.
    assert_close(routing, expected_routing)
    assert_close(outputs, expected_outputs)


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_float32_router_trains_a_quantized_lora_model_as_the_compute_router():
    """An int8 model with LoRA on its attention and router, then sparsified:
    two steps of `fit` move the LoRA factors alike with either router (the
    gradients reach the attention through the router's input, as Keras's
    int8 `Dense` passes them)."""
    x = families.inputs("mixtral")
    y = np.random.default_rng(4).integers(0, families.VOCAB, x["token_ids"].shape)
    trained = {}
    for router_dtype in ("compute", "float32"):
        keras.utils.set_random_seed(3)
        model = families.causal_lm("mixtral")
        families.randomize(model)
        model.quantize("int8")
        model.backbone.enable_lora(
            2, target_layer_names=["query", "value", "sparse_feedforward_gate_dense"]
        )
        for variable in model.trainable_weights:
            noise = np.random.default_rng(6).normal(size=variable.shape)
            variable.assign((0.3 * noise).astype("float32"))
        sparsify(model, router_dtype)
        model.compile(optimizer=keras.optimizers.SGD(0.1), weighted_metrics=[])
        history = model.fit(
            x,
            y,
            sample_weight=x["padding_mask"],
            batch_size=1,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        trained[router_dtype] = (
            history.history["loss"],
            [to_numpy(v) for v in model.trainable_weights],
        )
    (losses, weights), (expected_losses, expected_weights) = (
        trained["float32"],
        trained["compute"],
    )
    assert len(weights) == 6  # the query, value and router LoRA factor pairs
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for actual, expected in zip(weights, expected_weights):
        assert_close(actual, expected, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_router_refuses_a_router_it_cannot_reproduce(family):
    # Quantized before `sparsify`: refused by `sparsify`.
    block = make_block(family)
    router_of(block, family).quantize("float8")
    message = (
        '`router_dtype="float32"` computes.*Received: router_dtype="float32", '
        "layer .* of type Dense with quantization_mode='float8'"
    )
    with pytest.raises(ValueError, match=message):
        sparsify_block(block, "float32")
    # After: refused when the block runs.
    block = sparsify_block(make_block(family), "float32")
    router_of(block, family).quantize("float8")
    with pytest.raises(ValueError, match=message):
        run(block, family, inputs())
