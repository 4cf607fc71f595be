"""The benchmark suite runs at tiny sizes on every backend (it must not rot).

These tests check the structure of what the benchmarks produce and that the
reference formulations compute the layers' functions; they never assert a
time.
"""

import json

import keras
import numpy as np
import pytest
from benchmarks import cases
from benchmarks import formulations
from benchmarks import harness
from benchmarks import kerashub_families
from benchmarks import report
from benchmarks import soft_mixing
from benchmarks import suite

import keras_moe
from keras_moe.layers import FeedForwardExperts
from tests.conftest import BACKEND
from tests.conftest import to_numpy

pytestmark = pytest.mark.filterwarnings("ignore:You are using a softmax")
TIMED_CASES = ["dense_soft", "conv2d", "expert_sweep"]


@pytest.fixture(autouse=True)
def _eager_torch(monkeypatch):
    # torch.compile takes minutes per case on a small CPU; the structure is
    # the same in eager mode.
    monkeypatch.setenv("KERAS_MOE_BENCH_TORCH", "eager")


@pytest.fixture(scope="module")
def tiny_results():
    import os

    previous = os.environ.get("KERAS_MOE_BENCH_TORCH")
    os.environ["KERAS_MOE_BENCH_TORCH"] = "eager"
    try:
        # A subset in one mode keeps the compilations (the tests' cost) few;
        # `test_every_case_builds_and_its_variants_agree_on_shapes` covers the rest.
        return suite.run_backend(
            TIMED_CASES, tiny=True, repeats=2, modes=("forward_backward",)
        )
    finally:
        if previous is None:
            os.environ.pop("KERAS_MOE_BENCH_TORCH")
        else:
            os.environ["KERAS_MOE_BENCH_TORCH"] = previous


@pytest.mark.parametrize("name", list(cases.CASES))
def test_every_case_builds_and_its_variants_agree_on_shapes(name):
    case = cases.CASES[name](cases.TINY)
    names = [v.name for v in case["variants"]]
    assert case["baseline"] in names
    assert len(set(names)) == len(names)
    for t in case["targets"]:
        assert {t["variant"], t["over"]} <= set(names) | {"kerashub_mixtral"}
    shapes = set()
    for variant in case["variants"]:
        layer, inputs = variant.build()
        if variant.name == "roofline":  # same FLOPs, not the same output
            assert layer(inputs[0] if variant.train_step else inputs) is not None
            continue
        if variant.train_step:  # a compiled Sequential: its shape, no eager call
            shapes.add((len(inputs[0]),) + tuple(layer.output_shape[1:]))
            continue
        if isinstance(layer, kerashub_families.TokenBackbone):
            # Eager calls of whole backbones take seconds each;
            # `test_kerashub_family_case_runs_both_variants` runs them.
            shapes.add(tuple(layer.compute_output_shape(inputs.shape)))
            # No trainable weight outside the output: TensorFlow's gradient
            # of an untied LM head is None, which the harness cannot time.
            paths = [v.path for v in layer.trainable_variables]
            assert not [p for p in paths if "reverse_embeddings" in p], paths
            continue
        outputs = layer(inputs)
        if isinstance(outputs, list | tuple):  # Mixtral: (outputs, logits)
            outputs = outputs[0]
        shapes.add(tuple(outputs.shape))
    assert len(shapes) == 1, shapes


# The cases whose roofline is a matmul: it must run on 2-D `(tokens, d)` inputs.
MATMUL_ROOFLINES = ["dense_soft", "dense_topk", "moe_feed_forward"]
_CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def _expert_flops(layer, n_tokens):
    """FLOPs of the experts a token is routed to (2 per multiply-add)."""
    if isinstance(getattr(layer, "experts", None), FeedForwardExperts):
        kernels = layer.experts.trainable_variables  # `MoEFeedForward`'s bank
    else:
        kernels = [v for v in layer.trainable_variables if "expert_" in v.name]
    kernels = [v for v in kernels if v.name.endswith("kernel")]
    assert kernels, layer
    size = sum(int(np.prod(v.shape)) for v in kernels)
    active = (layer.top_k or layer.n_experts) / layer.n_experts
    return 2 * n_tokens * size * active


def _dot_generals(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_generals(inner)


def _dot_flops(eqn):
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    kept = [n for i, n in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    return 2 * int(np.prod(lhs)) * int(np.prod(kept))


def _jax_dots(layer, inputs, backward):
    import jax

    trainable = [v.value for v in layer.trainable_variables]

    def forward(tv):
        return layer.stateless_call(tv, [], inputs)[0]

    def objective(tv):
        return keras.ops.mean(keras.ops.square(forward(tv)))

    function = jax.grad(objective) if backward else forward
    return list(_dot_generals(jax.make_jaxpr(function)(trainable).jaxpr))


@pytest.mark.parametrize("name", MATMUL_ROOFLINES)
def test_matmul_roofline_is_2d_tokens_with_the_active_flops_of_the_layer(name):
    case = cases.CASES[name](cases.TINY)
    variants = {v.name: v for v in case["variants"]}
    (target,) = [t for t in case["targets"] if t["over"] == "roofline"]
    layer, x = variants[target["variant"]].build()
    roofline, flat = variants["roofline"].build()
    n_tokens = int(np.prod(x.shape[:-1]))
    assert flat.shape == (n_tokens, x.shape[-1])
    np.testing.assert_array_equal(flat, x.reshape(flat.shape))
    layer(x)
    roofline(flat)
    expected = _expert_flops(layer, n_tokens)
    kernels = [v for v in roofline.trainable_variables if len(v.shape) == 2]
    assert 2 * n_tokens * sum(int(np.prod(v.shape)) for v in kernels) == expected
    if BACKEND == "jax":  # what the compiled program multiplies
        forward = _jax_dots(roofline, flat, backward=False)
        assert sum(_dot_flops(eqn) for eqn in forward) == expected
        for eqn in _jax_dots(roofline, flat, backward=True):
            assert [len(v.aval.shape) for v in eqn.invars] == [2, 2], eqn
    if "keras_ffn_3d" in variants:  # the user's FFN keeps the layer's input
        _, user_inputs = variants["keras_ffn_3d"].build()
        assert user_inputs.shape == x.shape and x.ndim == 3


def test_every_other_roofline_is_a_convolution_of_the_layers_input():
    for name, build_case in cases.CASES.items():
        case = build_case(cases.TINY)
        variants = {v.name: v for v in case.get("variants", [])}
        if name in MATMUL_ROOFLINES or "roofline" not in variants:
            continue
        roofline, inputs = variants["roofline"].build()
        assert isinstance(roofline, _CONVS), name
        assert inputs is variants["keras_moe"].build()[1], name


def test_timed_cases_run_every_variant(tiny_results):
    assert set(tiny_results) == set(TIMED_CASES)
    for name, result in tiny_results.items():
        assert result["backend"] == BACKEND
        assert result["variants"], name
        for variant, entry in result["variants"].items():
            assert "error" not in entry, (name, variant, entry.get("error"))
            assert entry["params"] > 0
            for mode in result["modes"]:
                timing = entry[mode]
                assert len(timing["samples_s"]) == 2
                assert timing["median_s"] > 0
                assert timing["ratio"] > 0
                assert "peak_bytes" in timing["memory"]
        baseline = result["variants"][result["baseline"]]
        for mode in result["modes"]:
            assert baseline[mode]["ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(kerashub_families.CASES))
def test_kerashub_family_case_runs_both_variants(name):
    # Forward only: compiling a whole backbone's backward takes seconds per
    # variant (twice the forward's), too long for six families on three
    # backends; the shape test checks what broke the backward on TensorFlow.
    mode = "forward"
    (result,) = suite.run_backend([name], tiny=True, repeats=1, modes=(mode,)).values()
    family = name.removeprefix("kerashub_")
    assert kerashub_families.CLASSES[family] in result["title"]
    assert result["backend"] == BACKEND
    assert result["modes"] == [mode]
    (e,) = cases.TINY["hub"]["experts"]
    variants = result["variants"]
    assert set(variants) == {f"kerashub_{e}", f"sparsified_{e}"}
    for variant, entry in variants.items():
        assert "error" not in entry, (variant, entry.get("error"))
        assert entry[mode]["median_s"] > 0
        assert "peak_bytes" in entry[mode]["memory"]
    assert "sparsify" in variants[f"sparsified_{e}"]["note"]
    # `sparsify` computes on the backbone's own weights: none added or lost.
    assert variants[f"sparsified_{e}"]["params"] == variants[f"kerashub_{e}"]["params"]
    assert variants[f"kerashub_{e}"][mode]["ratio"] == pytest.approx(1.0)
    checked = result["checked_targets"]
    if family == "mixtral" and BACKEND == "jax":
        # Mixtral's target is on forward+backward, not run here.
        assert [c["variant"] for c in checked] == [f"kerashub_{e}"]
        assert checked[0]["mode"] == "forward_backward"
        assert checked[0]["passed"] is None
    else:
        assert checked == []


def test_kerashub_family_cases_share_one_shape_and_keep_mixtrals_targets():
    for size in (cases.FULL, cases.TINY):
        s = size["hub"]
        for name, build_case in kerashub_families.CASES.items():
            case = build_case(size)
            assert case["name"] == name
            assert f"{s['batch']}x{s['seq']} tokens, d={s['dim']}" in case["title"]
            assert [v.name for v in case["variants"]] == [
                f"{kind}_{e}"
                for e in s["experts"]
                for kind in ("kerashub", "sparsified")
            ]
    mixtral = kerashub_families.CASES["kerashub_mixtral"](cases.FULL)
    assert [(t["variant"], t["over"], t["min_ratio"]) for t in mixtral["targets"]] == [
        ("kerashub_8", "sparsified_8", 1.7),
        ("kerashub_16", "sparsified_16", 2.5),
    ]
    assert {t["mode"] for t in mixtral["targets"]} == {"forward_backward"}
    for name in set(kerashub_families.CASES) - {"kerashub_mixtral"}:
        assert kerashub_families.CASES[name](cases.FULL)["targets"] == []


def test_memory_is_reported_where_the_backend_can(tiny_results):
    memory = tiny_results["dense_soft"]["variants"]["keras_moe"]["forward_backward"][
        "memory"
    ]
    if BACKEND == "jax":
        assert memory["peak_bytes"] > 0
        assert memory["temp_bytes"] >= 0
    else:
        assert memory["peak_bytes"] is None
        assert "only on" in memory["why"]


def test_targets_are_checked_on_their_backends(tiny_results):
    for result in tiny_results.values():
        for checked in result.get("checked_targets", []):
            assert BACKEND in checked["backends"]
            assert isinstance(checked["passed"], bool)
            assert checked["value"] > 0


def test_report_and_plot(tiny_results, tmp_path):
    merged = {
        "cases": {name: {BACKEND: r} for name, r in tiny_results.items()},
        "meta": {
            "command": "python -m benchmarks --tiny",
            "machine": "test",
            "versions": "test",
            "repeats": 2,
            "torch_mode": "eager",
        },
    }
    json.dumps(merged)  # the results are JSON-serialisable
    text = report.markdown(merged)
    assert "| variant |" in text
    assert "keras_moe: keras_moe.DenseMoE" in text
    assert "## Targets" in text
    path = report.plot_sweep(merged, tmp_path / "sweep.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_check_targets_arithmetic():
    result = {
        "variants": {
            "a": {"forward_backward": {"median_s": 3.0}},
            "b": {"forward_backward": {"median_s": 2.0}},
        },
        "targets": [
            cases.target("a", "b", "forward_backward", max_ratio=1.4, backends=["x"]),
            cases.target("a", "b", "forward_backward", min_ratio=1.2, backends=["x"]),
            cases.target("a", "b", "forward_backward", max_ratio=9, backends=["y"]),
        ],
    }
    checked = cases.check_targets(result, "x")
    assert [c["passed"] for c in checked] == [False, True]
    assert checked[0]["value"] == pytest.approx(1.5)


def test_compare_rejects_unknown_baseline():
    x = np.ones((2, 3), "float32")
    variants = [harness.Variant("a", lambda: (keras.layers.Dense(2), x))]
    with pytest.raises(ValueError, match="baseline"):
        harness.compare(variants, "b")


def test_train_step_variants_time_train_on_batch():
    x = np.ones((4, 3), "float32")
    y = np.arange(4) % 2

    def build(units):
        def build_model():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])
            model.compile("adam", "mse", jit_compile=BACKEND != "torch")
            return model, (x, np.ones((4, units), "float32") * y[:, None])

        return build_model

    variants = [
        harness.Variant("small", build(2), train_step=True),
        harness.Variant("large", build(8), train_step=True),
    ]
    result = harness.compare(variants, "small", repeats=2, warmup=0, min_sample_s=0)
    for name in ("small", "large"):
        entry = result["variants"][name]
        assert set(entry) >= {"train_step", "params"}
        assert "forward" not in entry
        assert len(entry["train_step"]["samples_s"]) == 2
    assert result["variants"]["small"]["train_step"]["ratio"] == pytest.approx(1.0)


def test_failing_variant_is_reported_not_raised():
    x = np.ones((2, 3), "float32")

    def broken():
        raise RuntimeError("no such layer")

    variants = [
        harness.Variant("ok", lambda: (keras.layers.Dense(2), x)),
        harness.Variant("broken", broken),
    ]
    result = harness.compare(variants, "ok", repeats=1, warmup=0, min_sample_s=0)
    assert "no such layer" in result["variants"]["broken"]["error"]
    assert result["variants"]["ok"]["forward"]["ratio"] == pytest.approx(1.0)


def assert_same_function(x, original, layer, kernel, bias, tolerance):
    """Gives `layer` the original formulation's random weights, its expert
    kernel and bias through `kernel` and `bias`, and compares the outputs."""
    original(x)
    layer(x)
    rng = np.random.default_rng(2)
    ek, eb, gk, gb = (
        rng.standard_normal(v.shape).astype("float32")
        for v in original.trainable_variables
    )
    original.set_weights([ek, eb, gk, gb])
    layer.expert_kernel.assign(kernel(ek))
    layer.expert_bias.assign(bias(eb))
    layer.gating_kernel.assign(gk)
    layer.gating_bias.assign(gb)
    np.testing.assert_allclose(
        to_numpy(original(x)), to_numpy(layer(x)), rtol=tolerance, atol=tolerance
    )


def test_original_dense_formulation_is_the_layer_function():
    assert_same_function(
        np.random.default_rng(1).standard_normal((5, 6)).astype("float32"),
        formulations.OriginalDenseMoE(4, 3, **cases.MOE),
        keras_moe.DenseMoE(4, 3, **cases.MOE),
        kernel=lambda ek: np.transpose(ek, (0, 2, 1)),
        bias=lambda eb: eb.T,
        tolerance=1e-5,
    )


def test_original_conv_formulation_is_the_layer_function():
    assert_same_function(
        np.random.default_rng(1).standard_normal((2, 5, 5, 3)).astype("float32"),
        formulations.OriginalConvMoE(2, 4, 2, 3, "same", **cases.MOE),
        keras_moe.Conv2DMoE(4, 2, 3, padding="same", **cases.MOE),
        kernel=lambda ek: ek,
        bias=lambda eb: eb.reshape(4, 2),
        tolerance=1e-4,
    )


def test_cifar_networks_have_the_original_shapes():
    cnn = formulations.cifar10_cnn()
    moe = formulations.cifar10_moe()
    assert cnn.output_shape == moe.output_shape == (None, 10)
    # The original networks: 1.25M parameters (CNN), 7.56M (MoE).
    assert cnn.count_params() == pytest.approx(1.25e6, rel=0.01)
    assert moe.count_params() == pytest.approx(7.56e6, rel=0.01)


def test_command_runs_a_backend_in_its_own_process_with_the_repeats_asked(tmp_path):
    """`python -m benchmarks --repeats N`: N timed samples per variant, in meta."""
    from benchmarks import __main__ as command

    command.main(
        [
            "--backends",
            BACKEND,
            "--cases",
            "dense_soft",
            "--tiny",
            "--repeats",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["meta"]["repeats"] == 3
    variants = data["cases"]["dense_soft"][BACKEND]["variants"]
    for entry in variants.values():
        assert len(entry["forward_backward"]["samples_s"]) == 3
    assert (tmp_path / "benchmarks.md").read_text().startswith("# keras-moe benchmarks")


def test_soft_mixing_variants_compute_the_layer_and_are_all_timed(capsys):
    x = np.random.default_rng(3).standard_normal((5, 6)).astype("float32")
    layer = keras_moe.DenseMoE(4, 3, **soft_mixing.MOE)
    expected = to_numpy(layer(x))
    for mixing in soft_mixing.MIXINGS:
        variant = soft_mixing.MixingDenseMoE(4, 3, mixing=mixing, **soft_mixing.MOE)
        variant(x)
        variant.set_weights(layer.get_weights())
        np.testing.assert_allclose(to_numpy(variant(x)), expected, rtol=1e-5, atol=1e-6)

    result = soft_mixing.main(
        ["--repeats", "1", "--min-sample-s", "0", "--size", "8,6,4,3"]
    )
    assert set(result["variants"]) == {"layer", "original", *soft_mixing.MIXINGS}
    for entry in result["variants"].values():
        for mode in ("forward", "forward_backward"):
            assert entry[mode]["ratio"] > 0
    assert "forward_backward" in capsys.readouterr().out
