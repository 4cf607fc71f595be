import json

import numpy as np
import pytest

from keras_moe import cli
from keras_moe.experiments import upcycling
from tests.conftest import skip_or_fail

TINY = [
    "--layers", "1", "--hidden-dim", "8", "--intermediate-dim", "8",
    "--sequence-length", "8", "--batch-size", "2", "--experts", "4",
    "--dense-steps", "2", "--continue-steps", "2", "--eval-every", "2",
    "--eval-windows", "2",
]  # fmt: skip


def test_the_standard_library_is_split_by_file():
    train, val, info = upcycling.load_stdlib_bytes()
    assert info["train_bytes"] == train.size and info["validation_bytes"] == val.size
    assert 0.05 < val.size / (train.size + val.size) < 0.3
    assert train.dtype == np.int32 and 0 <= train.min() and train.max() < 256
    assert b"def " in bytes(train[:200_000].astype(np.uint8))


def test_windows_hold_inputs_and_next_bytes():
    data = np.arange(100, dtype="int32")
    x, y = upcycling.windows(data, [0, 10], 4)
    np.testing.assert_array_equal(x["token_ids"], [[0, 1, 2, 3], [10, 11, 12, 13]])
    np.testing.assert_array_equal(y, [[1, 2, 3, 4], [11, 12, 13, 14]])
    assert x["padding_mask"].shape == (2, 4)


def test_flops_count_the_active_experts_only():
    args = cli.build_parser().parse_args(["upcycling", *TINY])
    dense = upcycling.forward_macs_per_token(args)
    moe = upcycling.forward_macs_per_token(args, experts=4, top_k=2)
    # One more feed-forward block per layer (3 d m) and the router (d E).
    assert moe - dense == 3 * 8 * 8 + 8 * 4
    # q, k, v, o projections, causal attention over (8 + 1) / 2 positions,
    # the feed-forward block and the output projection to 256 bytes.
    assert dense == 8 * 8 + 2 * 8 * 4 + 8 * 8 + 2 * 8 * 4.5 + 3 * 8 * 8 + 8 * 256


def test_tiny_run_writes_results_plot_and_summary_and_is_exact_at_upcycling(tmp_path):
    try:
        import keras_hub  # noqa: F401
    except ImportError as error:
        skip_or_fail(f"keras_hub is not importable ({error})")
    out = tmp_path / "u"
    cli.main(["upcycling", "--quick", *TINY, "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "upcycling"
    assert set(results["models"]) == {"pretrain", "dense", "upcycled"}
    upcycled = results["models"]["upcycled"]
    assert upcycled["step"] == [2, 4]
    flops = results["training_flops_per_step"]
    assert upcycled["training_flops"][-1] == pytest.approx(
        2 * flops["dense"] + 2 * flops["upcycled"]
    )
    point = results["upcycling_point"][0]
    assert point["params_upcycled"] > point["params_dense"]
    assert point["max_relative_logit_difference"] <= 1e-5
    assert point["val_bits_per_byte_upcycled"] == pytest.approx(
        point["val_bits_per_byte_dense"], abs=1e-5
    )
    assert results["comparisons"][0]["a"] == "upcycled"
    assert (out / "upcycling_val_loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "exact at initialisation" in summary and "[start:results]" in summary


def test_the_longest_window_fits_the_data_and_one_more_byte_does_not(capsys):
    train, val, info = upcycling.load_stdlib_bytes()
    # The sizes come from the files' sizes, without reading them.
    assert upcycling.stdlib_sizes() == (train.size, val.size)
    longest = min(train.size, val.size) - 2
    args = cli.build_parser().parse_args(
        ["upcycling", "--sequence-length", str(longest), "--eval-windows", "3"]
    )
    upcycling.prepare(args)
    starts = np.linspace(0, val.size - longest - 2, 3).astype("int64")
    x, y = upcycling.windows(val, starts, longest)
    assert y.shape == (3, longest) and y[0, -1] == val[longest]
    x, y = upcycling.training_batches(train, np.random.default_rng(0), 1, args)
    assert x["token_ids"].shape == (args.batch_size, longest)
    args.sequence_length = longest + 1
    with pytest.raises(ValueError, match=f"at most {longest} "):
        upcycling.prepare(args)
