import pytest

from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe import cli
from keras_moe.experiments import common
from keras_moe.experiments import routing
from keras_moe.routing import ExpertChoiceRouter
from keras_moe.routing import TopKRouter
from tests.experiments.conftest import quick_results
from tests.experiments.conftest import small_images_error


def arguments(*options):
    return cli.build_parser().parse_args(["routing", *options])


@pytest.mark.parametrize(
    "image, tokens, slots",
    [((32, 32, 3), 64, 16), ((16, 16, 3), 16, 4)],
)
def test_soft_moe_runs_as_many_rows_as_top_2_token_choice(image, tokens, slots):
    args = arguments()
    assert routing.slots_per_expert(tokens, args.top_k, args.n_experts) == slots
    model = routing.build_model("soft-moe", args, image, 10)
    layers = [layer for layer in model.layers if isinstance(layer, SoftMoE)]
    assert [layer.name for layer in layers] == ["moe_1", "moe_3"]
    assert {layer.slots_per_expert for layer in layers} == {slots}
    assert {layer.intermediate_dim for layer in layers} == {128}
    rows = routing.expert_rows_per_image("soft-moe", args, tokens)
    assert rows == routing.expert_rows_per_image("token-choice", args, tokens)


def test_token_choice_is_the_example_network():
    args = arguments()
    model = routing.build_model("token-choice", args, (32, 32, 3), 10)
    (layer, other) = [x for x in model.layers if isinstance(x, MoEFeedForward)]
    assert (layer.n_experts, layer.top_k, layer.experts.intermediate_dim) == (8, 2, 128)
    assert layer.router.load_balance_weight == 0.01
    assert routing.moe_names(model) == ["moe_1", "moe_3"]
    # The example's ViT: same layers, same parameters.
    from examples.vit_moe_cifar10 import build_vit_moe

    assert common.count_params(model) == common.count_params(build_vit_moe())


def test_expert_choice_and_the_balance_bias_are_their_routers():
    args = arguments()
    model = routing.build_model("expert-choice", args, (16, 16, 3), 10)
    (layer, _) = [x for x in model.layers if isinstance(x, MoEFeedForward)]
    assert isinstance(layer.router, ExpertChoiceRouter)
    assert (layer.router.top_k, layer.router.capacity_factor) == (2, 1.0)
    model = routing.build_model("token-choice-bias", args, (16, 16, 3), 10)
    (layer, _) = [x for x in model.layers if isinstance(x, MoEFeedForward)]
    assert isinstance(layer.router, TopKRouter)
    assert layer.router.load_balance_weight == 0.0
    assert layer.router.balance_bias_rate == args.balance_bias_rate > 0


def test_quick_run_writes_results_plot_and_summary(tmp_path):
    options = ["--models", "token-choice", "soft-moe", "--verbose", "0"]
    out, results = quick_results(tmp_path, "routing", 16, options)
    assert results["data"]["tokens_per_image"] == 16
    assert list(results["models"]) == ["token-choice", "soft-moe"]
    for model in results["models"].values():
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert len(model["val_accuracy_mean"]) == 1
        assert model["expert_rows_per_image"] == 32
        assert model["step_seconds_median"] > 0
    token_choice = results["models"]["token-choice"]
    (load,) = token_choice["busiest_load_mean"]
    assert 1.0 <= load <= 8.0
    assert token_choice["last_dropped_fraction"] == 0.0
    assert (out / "routing.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "| `soft-moe` Soft MoE, 16 slots per expert |" in summary
    assert results["settings"]["dim"] == 16 and results["settings"]["depth"] == 2


def test_images_smaller_than_a_patch_are_one_line(tmp_path, capsys):
    err = small_images_error(tmp_path, capsys, "routing", size=3)
    assert "must hold images of at least 4 x 4 pixels (one patch)" in err
