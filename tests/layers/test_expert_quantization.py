"""`FeedForwardExperts.quantize`: int8 and int4 expert kernels through
Keras's quantization protocol."""

import pathlib

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import MoEFeedForward
from keras_moe.layers import SharedExpert
from keras_moe.layers import SoftMoE
from keras_moe.layers import expert_quantization
from keras_moe.routing.layouts import Assignments
from keras_moe.routing.layouts import BlockLayout
from keras_moe.routing.layouts import Layout
from tests.conftest import write_on_jax

REPO = pathlib.Path(__file__).resolve().parents[2]
E, D, M = 4, 64, 128

# The relative error `|y_q - y| / |y|` of a quantized bank's outputs, on
# glorot-uniform kernels and normal inputs, and the bank's bytes (kernels,
# their scales, biases) over float32's. Measured 2026-12-08 on JAX (CPU) for
# the two banks of `test_storage_dtypes_and_outputs_close_to_float32`
# (`bank_and_copy(mode, **kwargs)`, E=4, d=64, m=128, gated): error int8
# 0.0069-0.0071, int4 0.119-0.121; bytes int8 0.269-0.273, int4 0.145-0.149.
ERROR_BOUNDS = {"int8": 0.02, "int4": 0.25}
BYTE_RATIOS = {"int8": 0.3, "int4": 0.2}


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def nbytes(layer):
    return sum(to_numpy(v).nbytes for v in layer.weights)


def bank_and_copy(mode, **kwargs):
    """A float bank on `(E, 3, D)` rows and a quantized copy of it."""
    bank = FeedForwardExperts(M, E, **kwargs)
    rows = np.random.default_rng(0).normal(size=(E, 3, D)).astype("float32")
    bank(rows)
    copy = FeedForwardExperts.from_config(bank.get_config())
    copy.build(rows.shape)
    copy.set_weights(bank.get_weights())
    copy.quantize(mode)
    return bank, copy, rows


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"gated": True},
        {"gated": True, "gate_up_layout": "interleaved", "output_scale": True},
    ],
)
def test_storage_dtypes_and_outputs_close_to_float32(mode, kwargs):
    bank, quantized, rows = bank_and_copy(mode, **kwargs)
    assert quantized.dtype_policy.name == f"{mode}_from_float32"
    assert quantized.quantization_mode == mode
    kernels = expert_quantization.kernel_shapes(quantized)
    for name, (e, d, m) in kernels.items():
        kernel = getattr(quantized, name)
        assert kernel.dtype == "int8"
        assert not kernel.trainable
        assert tuple(kernel.shape) == ((e, d, m // 2) if mode == "int4" else (e, d, m))
        assert tuple(getattr(quantized, f"{name}_scale").shape) == (e, m)
        assert getattr(quantized, f"{name}_scale").dtype == "float32"
    # Biases and the output scale stay float (and trainable).
    assert {v.name for v in quantized.trainable_weights} == {
        v.name for v in bank.weights if "kernel" not in v.name
    }
    ratio = nbytes(quantized) / nbytes(bank)
    assert ratio <= BYTE_RATIOS[mode], ratio
    y, y_q = to_numpy(bank(rows)), to_numpy(quantized(rows))
    error = np.linalg.norm(y_q - y) / np.linalg.norm(y)
    assert 0 < error <= ERROR_BOUNDS[mode], error


def test_int4_packs_two_values_per_byte_as_keras_dense():
    values = np.random.default_rng(1).normal(size=(2, 3, 5)).astype("float32")
    packed, scale = expert_quantization.quantize_values(values, "int4")
    # Dense packs along the output axis: expert 0 as a Dense kernel.
    dense = keras.layers.Dense(5, use_bias=False)
    dense.build((None, 3))
    dense.kernel.assign(values[0])
    dense.quantize(
        "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=-1)
    )
    np.testing.assert_array_equal(to_numpy(packed)[0], to_numpy(dense._kernel))
    np.testing.assert_allclose(to_numpy(scale)[0], to_numpy(dense.kernel_scale))


class TwoExperts(Layout):
    """Runs experts 0 and 2 only: `(2, c, d)` rows."""

    def select(self, weights):
        return ops.take(weights, ops.convert_to_tensor([0, 2]), axis=0)

    def matmul(self, x, kernel):
        return ops.einsum("ecd,edm->ecm", x, kernel)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_only_the_selected_experts_are_dequantized(mode, monkeypatch):
    _, bank, _ = bank_and_copy(mode, gated=True)
    rows = np.random.default_rng(2).normal(size=(2, 3, D)).astype("float32")
    y = to_numpy(bank(rows, layout=TwoExperts()))
    seen = []
    dequantize = expert_quantization.dequantize

    def recording(values, *args):
        seen.append(tuple(values.shape))
        return dequantize(values, *args)

    monkeypatch.setattr(expert_quantization, "dequantize", recording)
    # Experts 1 and 3 corrupted: the outputs of experts 0 and 2 do not move.
    rng = np.random.default_rng(3)
    for name in expert_quantization.kernel_shapes(bank):
        kernel = getattr(bank, name)
        values = to_numpy(kernel).copy()
        values[[1, 3]] = rng.integers(-100, 100, size=values[[1, 3]].shape)
        kernel.assign(values)
    np.testing.assert_array_equal(to_numpy(bank(rows, layout=TwoExperts())), y)
    assert len(seen) == 3 and all(shape[0] == 2 for shape in seen), seen


def test_a_block_layout_dequantizes_its_blocks_experts():
    _, bank, _ = bank_and_copy("int8", gated=True)
    tokens = np.random.default_rng(4).normal(size=(16, D)).astype("float32")
    experts = np.array([[0], [1]] * 8, "int32")
    plan = BlockLayout(
        Assignments(experts, np.ones((16, 1), "float32"), E), block_size=8
    )

    def run():
        return to_numpy(
            plan.run(tokens, lambda layout, rows: bank(rows, layout=layout))
        )

    y = run()
    # Expert 2, chosen by no token, owns no block: its values do not count.
    values = to_numpy(bank.up_kernel).copy()
    values[2] = 127
    bank.up_kernel.assign(values)
    np.testing.assert_array_equal(run(), y)


def moe_model(shared=False):
    inputs = keras.Input((5, 16))
    layer = MoEFeedForward(
        32,
        n_experts=4,
        top_k=2,
        gated=True,
        shared_expert=SharedExpert(24) if shared else None,
        seed=1,
    )
    return keras.Model(inputs, layer(inputs)), layer


def test_model_quantize_reaches_the_experts_and_leaves_the_router_float():
    model, layer = moe_model(shared=True)
    x = np.random.default_rng(5).normal(size=(2, 5, 16)).astype("float32")
    y = to_numpy(model(x))
    model.quantize("int8")
    assert layer.experts.quantization_mode == "int8"
    assert layer.experts.up_kernel.dtype == "int8"
    # Keras quantizes the shared expert's `Dense` layers itself.
    assert layer.shared_expert.up.quantization_mode == "int8"
    assert layer.router.quantization_mode is None
    assert all(v.dtype == "float32" for v in layer.router.weights)
    error = np.linalg.norm(to_numpy(model(x)) - y) / np.linalg.norm(y)
    assert 0 < error <= ERROR_BOUNDS["int8"], error


def test_soft_moe_experts_quantize():
    inputs = keras.Input((6, 8))
    layer = SoftMoE(16, n_experts=4)
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(6).normal(size=(2, 6, 8)).astype("float32")
    y = to_numpy(model(x))
    model.quantize("int4")
    assert layer.experts.quantization_mode == "int4"
    assert layer.router_kernel.dtype == "float32"
    error = np.linalg.norm(to_numpy(model(x)) - y) / np.linalg.norm(y)
    assert 0 < error <= ERROR_BOUNDS["int4"], error


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_keras_file_round_trip_is_exact(mode, tmp_path):
    model, layer = moe_model()
    model.quantize(mode)
    x = np.random.default_rng(7).normal(size=(2, 5, 16)).astype("float32")
    y = to_numpy(model(x))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    experts = loaded.layers[-1].experts
    assert experts.dtype_policy.name == f"{mode}_from_float32"
    for name in ("up_kernel", "gate_kernel", "down_kernel"):
        np.testing.assert_array_equal(
            to_numpy(getattr(experts, name)), to_numpy(getattr(layer.experts, name))
        )
    np.testing.assert_array_equal(to_numpy(loaded(x)), y)


def test_mixed_precision_bank_quantizes_and_computes_in_bfloat16():
    bank = FeedForwardExperts(M, E, gated=True, dtype="mixed_bfloat16")
    rows = np.random.default_rng(8).normal(size=(E, 3, D)).astype("float32")
    y = to_numpy(ops.cast(bank(rows), "float32"))
    bank.quantize("int8")
    assert bank.dtype_policy.name == "int8_from_mixed_bfloat16"
    out = bank(rows)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    out = to_numpy(ops.cast(out, "float32"))
    assert np.linalg.norm(out - y) / np.linalg.norm(y) <= 0.05


@pytest.mark.parametrize("mode", ["float8"])
def test_other_keras_modes_are_not_implemented(mode):
    bank, _, _ = bank_and_copy("int8")
    with pytest.raises(NotImplementedError, match=f"mode={mode!r}"):
        bank.quantize(mode)
    for other in ("gptq", "awq"):
        with pytest.raises(NotImplementedError, match=f"mode={other!r}"):
            expert_quantization.check_mode(bank, other)
    with pytest.raises(
        ValueError, match=r"`mode` must be one of .*Received: mode='int3'"
    ):
        expert_quantization.check_mode(bank, "int3")


class OwnProject(FeedForwardExperts):
    def project(self, layout, x, name):
        return super().project(layout, x, name)


class OwnCall(FeedForwardExperts):
    def call(self, inputs, layout=None, extra=None):
        return super().call(inputs, layout=layout)


def test_type_check_refuses_a_subclass_that_reads_the_kernels_itself():
    rows = np.ones((E, 2, D), "float32")
    bank = OwnProject(M, E)
    bank(rows)
    with pytest.raises(NotImplementedError, match="OwnProject"):
        bank.quantize("int8")
    bank.quantize("int8", type_check=False)
    assert bank.quantization_mode == "int8"
    bank = OwnCall(M, E)
    y = to_numpy(bank(rows, extra=1))
    bank.quantize("int8")
    y_q = to_numpy(bank(rows, extra=1))
    assert np.linalg.norm(y_q - y) / np.linalg.norm(y) <= ERROR_BOUNDS["int8"]


def test_quantize_refuses_an_unbuilt_or_quantized_bank():
    with pytest.raises(ValueError, match="isn't yet built"):
        FeedForwardExperts(M, E).quantize("int8")
    _, bank, _ = bank_and_copy("int8")
    with pytest.raises(ValueError, match="already quantized"):
        bank.quantize("int4")


# Saves the quantized models on JAX; the test loads them on this backend.
JAX_WRITER = """
import sys
import numpy as np
import keras
from keras_moe.layers import MoEFeedForward
assert keras.backend.backend() == "jax", keras.backend.backend()
keras.utils.set_random_seed(7)
x = np.random.default_rng(9).normal(size=(2, 5, 16)).astype("float32")
for mode in ("int8", "int4"):
    inputs = keras.Input((5, 16))
    layer = MoEFeedForward(32, n_experts=4, top_k=2, gated=True, seed=1)
    model = keras.Model(inputs, layer(inputs))
    model.quantize(mode)
    model.save(f"{sys.argv[1]}/{mode}.keras")
    np.savez(
        f"{sys.argv[1]}/{mode}.npz",
        x=x,
        y=np.asarray(model(x)),
        up=np.asarray(layer.experts.up_kernel),
    )
"""


def test_keras_files_quantized_on_jax_load_here(tmp_path):
    write_on_jax(JAX_WRITER, tmp_path)
    for mode in ("int8", "int4"):
        saved = np.load(tmp_path / f"{mode}.npz")
        model = keras.saving.load_model(tmp_path / f"{mode}.keras")
        experts = model.layers[-1].experts
        assert experts.quantization_mode == mode
        np.testing.assert_array_equal(to_numpy(experts.up_kernel), saved["up"])
        y = to_numpy(model(saved["x"]))
        np.testing.assert_allclose(y, saved["y"], rtol=1e-5, atol=1e-5)
        assert np.abs(saved["y"]).max() > 0.1
