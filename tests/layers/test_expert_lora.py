"""`FeedForwardExperts.enable_lora`: per-expert low-rank adapters through
Keras's LoRA protocol, on float and on int8/int4 banks (QLoRA)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import backend
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import MoEFeedForward
from keras_moe.layers import expert_quantization

E, D, M, R = 4, 8, 16, 2
# A grouped matmul where the backend has one (TensorFlow has none).
GROUPED = "grouped" if backend.grouped_matmul_available() else "blocks"


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def built_bank(**kwargs):
    bank = FeedForwardExperts(M, E, **kwargs)
    rows = np.random.default_rng(0).normal(size=(E, 3, D)).astype("float32")
    bank(rows)
    return bank, rows


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_enabling_changes_no_output_and_freezes_the_kernels(mode):
    bank, rows = built_bank(gated=True)
    if mode:
        bank.quantize(mode)
    y = to_numpy(bank(rows))
    bank.enable_lora(R)
    np.testing.assert_array_equal(to_numpy(bank(rows)), y)
    assert bank.lora_enabled and bank.lora_rank == R and bank.lora_alpha == R
    kernels = expert_quantization.kernel_shapes(bank)
    assert not any(getattr(bank, name).trainable for name in kernels)
    trainable = {v.name for v in bank.trainable_weights}
    factors = {f"{name}_lora_{f}" for name in kernels for f in "ab"}
    assert trainable == factors | {"up_bias", "down_bias"}
    for name, (e, d, m) in kernels.items():
        assert tuple(getattr(bank, f"{name}_lora_a").shape) == (e, d, R)
        assert tuple(getattr(bank, f"{name}_lora_b").shape) == (e, R, m)
        assert getattr(bank, f"{name}_lora_a").dtype == "float32"


def test_lora_output_matches_a_numpy_reference():
    bank, rows = built_bank(activation="relu")
    bank.enable_lora(R, lora_alpha=6)
    rng = np.random.default_rng(1)
    for name in ("up_kernel", "down_kernel"):
        factor = getattr(bank, f"{name}_lora_b")
        factor.assign(rng.normal(size=factor.shape).astype("float32"))
    w = {v.name: to_numpy(v) for v in bank.weights}

    def project(x, name, bias):
        kernel = w[name] + 3.0 * w[f"{name}_lora_a"] @ w[f"{name}_lora_b"]
        return np.einsum("ecd,edm->ecm", x, kernel) + w[bias][:, None]

    h = np.maximum(project(rows, "up_kernel", "up_bias"), 0)
    expected = project(h, "down_kernel", "down_bias")
    np.testing.assert_allclose(to_numpy(bank(rows)), expected, rtol=1e-4, atol=1e-4)


def lora_model(mode=None, layout="auto"):
    inputs = keras.Input((5, D))
    layer = MoEFeedForward(M, n_experts=E, top_k=2, gated=True, layout=layout, seed=1)
    model = keras.Model(inputs, layer(inputs))
    if mode:
        model.quantize(mode)
    layer.experts.enable_lora(R)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model, layer.experts


def data():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5, D)).astype("float32")
    return x, rng.normal(size=(4, 5, D)).astype("float32")


# QLoRA on the dropless layouts too: a block layout gathers the int8 rows
# of its blocks' experts, a grouped matmul takes the whole bank.
@pytest.mark.parametrize(
    "mode, layout", [(None, "auto"), ("int8", "blocks"), ("int4", GROUPED)]
)
def test_fit_moves_the_adapters_only(mode, layout):
    model, experts = lora_model(mode, layout)
    x, y = data()
    kernels = expert_quantization.kernel_shapes(experts)
    before = {v.name: to_numpy(v) for v in experts.weights}
    losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
    after = {v.name: to_numpy(v) for v in experts.weights}
    for name in kernels:
        np.testing.assert_array_equal(after[name], before[name])
        if mode:
            np.testing.assert_array_equal(
                after[f"{name}_scale"], before[f"{name}_scale"]
            )
        for factor in ("a", "b"):
            changed = np.abs(
                after[f"{name}_lora_{factor}"] - before[f"{name}_lora_{factor}"]
            )
            assert changed.max() > 0, (name, factor)
    assert losses[-1] < losses[0], losses


def test_saving_merges_the_adapters_into_float_kernels(tmp_path):
    model, experts = lora_model()
    x, y = data()
    for _ in range(3):
        model.train_on_batch(x, y)
    out = to_numpy(model(x))
    merged = {
        name: to_numpy(getattr(experts, name))
        + to_numpy(getattr(experts, f"{name}_lora_a"))
        @ to_numpy(getattr(experts, f"{name}_lora_b"))
        for name in expert_quantization.kernel_shapes(experts)
    }
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras").layers[-1].experts
    assert loaded.lora_enabled and loaded.lora_rank == R
    for name, kernel in merged.items():
        np.testing.assert_allclose(to_numpy(getattr(loaded, name)), kernel, atol=1e-6)
        assert not np.any(to_numpy(getattr(loaded, f"{name}_lora_b")))
        # `A` keeps values: fine-tuning the reloaded bank can go on.
        assert np.any(to_numpy(getattr(loaded, f"{name}_lora_a")))
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(to_numpy(reloaded(x)), out, rtol=1e-5, atol=1e-5)


def test_saving_a_qlora_bank_quantizes_the_merged_kernels(tmp_path):
    model, experts = lora_model("int8")
    x, y = data()
    for _ in range(3):
        model.train_on_batch(x, y)
    out = to_numpy(model(x))
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    loaded = reloaded.layers[-1].experts
    assert loaded.quantization_mode == "int8" and loaded.lora_enabled
    assert loaded.up_kernel.dtype == "int8"
    # The merged kernel is quantized again: int8's error, not exact.
    y_loaded = to_numpy(reloaded(x))
    assert np.linalg.norm(y_loaded - out) / np.linalg.norm(out) <= 0.02


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rank": 0}, ValueError, r"`rank` must be .*Received: rank=0"),
        ({"rank": 1.5}, TypeError, r"`rank` must be .*Received: rank=1.5"),
        (
            {"rank": 2, "lora_alpha": -1},
            ValueError,
            r"`lora_alpha` must be .*Received: lora_alpha=-1",
        ),
        (
            {"rank": 2, "a_initializer": "no_such"},
            ValueError,
            r"`a_initializer`.*Received: a_initializer='no_such'",
        ),
    ],
)
def test_bad_arguments(kwargs, error, message):
    bank, _ = built_bank()
    with pytest.raises(error, match=message):
        bank.enable_lora(**kwargs)
    assert not bank.lora_enabled


def test_enable_lora_refuses_unbuilt_twice_and_constrained_banks():
    with pytest.raises(ValueError, match="needs a built"):
        FeedForwardExperts(M, E).enable_lora(R)
    bank, _ = built_bank()
    bank.enable_lora(R)
    with pytest.raises(ValueError, match="Received: .*already 2"):
        bank.enable_lora(R)
    bank, _ = built_bank(kernel_constraint="non_neg")
    with pytest.raises(ValueError, match="Received: kernel_constraint="):
        bank.enable_lora(R)
    with pytest.raises(
        ValueError, match=r"`lora_rank` must be .*Received: lora_rank=0"
    ):
        FeedForwardExperts(M, E, lora_rank=0)
