"""What keras-moe 0.2.0 users wrote keeps working in 0.3.0, with a
`DeprecationWarning` that names the replacement (removed in 0.4.0):
`MoEFeedForward`'s family options (`MOVED_OPTIONS`) and weight attributes
(`MOVED_ATTRIBUTES`), `router="expert_choice"` (a string),
`ExpertChoiceRouter(capacity_factor=None)`, `sparse_mixture`'s old layout
names and 0.2.0's expert functions `expert_fn(layout, rows)`. A config saved
by 0.2.0 loads without any warning (its user did not write the options)."""

import inspect
import io
import json
import re
import warnings
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import MoEFeedForward
from keras_moe import backend
from keras_moe import routing
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import SharedExpert
from keras_moe.layers import moe_feed_forward_options
from keras_moe.routing import ExpertChoiceRouter
from keras_moe.routing import TopKRouter
from tests.conftest import REPO
from tests.conftest import to_numpy
from tests.layers.test_moe_feed_forward import randomize
from tests.layers.test_moe_feed_forward import with_same_weights

D, M, E = 4, 5, 3

# 0.2.0 option -> (a value other than its 0.2.0 default, the other 0.2.0
# arguments it needs).
OPTIONS = {
    "router_bias": (True, {}),
    "normalize_top_k": (False, {}),
    "noisy_gating": (True, {}),
    "router_dtype": ("compute", {}),
    "softmax_before_top_k": (True, {}),
    "router_input_norm": (True, {}),
    "router_norm_epsilon": (1e-3, {}),
    "gate_up_layout": ("concatenated", {"gated": True}),
    "gate_bias": (True, {"gated": True}),
    "activation_dtype": ("float32", {}),
    "swiglu_limit": (7.0, {"gated": True}),
    "swiglu_alpha": (1.5, {"gated": True}),
    "expert_output_scale": (True, {}),
    "kernel_regularizer": ("l2", {}),
    "bias_regularizer": ("l1", {}),
    "kernel_constraint": ("non_neg", {}),
    "bias_constraint": ("non_neg", {}),
    "shared_intermediate_dim": (3, {}),
    "shared_expert_gate": (True, {"shared_intermediate_dim": 3}),
}

OWNERS = {
    "experts": "keras_moe.layers.FeedForwardExperts",
    "router": "keras_moe.routing.TopKRouter",
    "shared_expert": "keras_moe.layers.SharedExpert",
}


def deprecated(old, new):
    """The regex of a deprecation warning of `old` naming `new` (each set in
    backticks, unless it is a phrase with its own)."""
    old, new = (text if "`" in text else f"`{text}`" for text in (old, new))
    return re.escape(
        f"{old} is deprecated and will be removed in keras-moe 0.4.0. "
    ) + (re.escape(f"Use {new}"))


def test_every_moved_option_is_tested():
    assert sorted(OPTIONS) == sorted(moe_feed_forward_options.MOVED_OPTIONS)


def expected_sublayer(sublayer, new, value, companions):
    """The sublayer the option configures, written with 0.3.0's API."""
    if sublayer == "experts":
        return FeedForwardExperts(
            M, E, gated=companions.get("gated", False), name="experts", **{new: value}
        )
    if sublayer == "router":
        return TopKRouter(E, load_balance_weight=0.01, name="router", **{new: value})
    return SharedExpert(
        companions.get("shared_intermediate_dim", value),
        output_gate=new == "output_gate",
        name="shared_expert",
    )


@pytest.mark.parametrize("old", sorted(OPTIONS))
def test_a_moved_option_warns_and_configures_its_sublayer(old):
    value, companions = OPTIONS[old]
    sublayer, new = moe_feed_forward_options.MOVED_OPTIONS[old]
    match = deprecated(
        f"`MoEFeedForward({old}=...)`", f"`{OWNERS[sublayer]}({new}=...)` passed as"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the companions'
        with pytest.warns(DeprecationWarning, match=match):
            layer = MoEFeedForward(M, E, **companions, **{old: value})
    expected = expected_sublayer(sublayer, new, value, companions)
    got = getattr(layer, sublayer)
    if sublayer == "shared_expert":
        assert got.intermediate_dim == expected.intermediate_dim
        assert got.output_gate == expected.output_gate
    else:
        assert got.get_config() == expected.get_config()
    # And it works.
    y = layer(np.random.default_rng(0).normal(size=(2, 3, D)).astype("float32"))
    assert tuple(y.shape) == (2, 3, D)
    assert np.isfinite(to_numpy(y)).all()


def test_the_warnings_name_the_users_code():
    """Attributed to the line that made the layer or read the attribute."""
    with pytest.warns(DeprecationWarning) as made:
        line = inspect.currentframe().f_lineno + 1
        layer = MoEFeedForward(M, E, router_bias=True)
    layer.build((None, D))
    with pytest.warns(DeprecationWarning) as read:
        read_line = inspect.currentframe().f_lineno + 1
        layer.expert_up_kernel  # noqa: B018
    assert [(w.filename, w.lineno) for w in made] == [(__file__, line)]
    assert [(w.filename, w.lineno) for w in read] == [(__file__, read_line)]


def test_moved_options_with_a_given_sublayer_are_refused():
    with pytest.warns(DeprecationWarning):
        with pytest.raises(
            ValueError,
            match=r"`experts` is given as a layer: set these options on it. "
            r"Received: \['gate_up_layout'\]",
        ):
            MoEFeedForward(
                experts=FeedForwardExperts(M, E, gated=True),
                gate_up_layout="concatenated",
            )
    with pytest.warns(DeprecationWarning):
        with pytest.raises(
            ValueError, match=r"`shared_expert` is given: set its options on it"
        ):
            MoEFeedForward(M, E, shared_expert=SharedExpert(3), shared_expert_gate=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"shared_expert_gate": True},
            r"`shared_expert_gate`.*`shared_intermediate_dim`.*"
            r"Received: shared_expert_gate=True, shared_intermediate_dim=None",
        ),
        (
            {"shared_intermediate_dim": 0},
            r"`shared_intermediate_dim` must be an integer >= 1. "
            r"Received: shared_intermediate_dim=0",
        ),
        (
            {"routing": "expert_choice", "capacity_factor": 1.0, "noisy_gating": True},
            r"`noisy_gating` applies to `routing='token_choice'` only. "
            r"Received: noisy_gating=True",
        ),
    ],
)
def test_bad_moved_options_are_named_as_written(kwargs, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=match):
            MoEFeedForward(M, E, **kwargs)


def test_every_moved_attribute_warns_and_is_the_sublayers():
    separate = MoEFeedForward(
        experts=FeedForwardExperts(
            M, E, gated=True, use_gate_bias=True, output_scale=True
        ),
        router=TopKRouter(E, input_norm=True),
    )
    fused = MoEFeedForward(
        experts=FeedForwardExperts(M, E, gated=True, gate_up_layout="interleaved"),
        router=TopKRouter(E),
    )
    for layer in (separate, fused):
        layer.build((None, D))
    tested = set()
    for old, (sublayer, attribute) in moe_feed_forward_options.MOVED_ATTRIBUTES.items():
        for layer in (separate, fused):
            current = getattr(getattr(layer, sublayer), attribute)
            if current is None:
                continue
            match = deprecated(
                f"MoEFeedForward.{old}", f"MoEFeedForward.{sublayer}.{attribute}"
            )
            with pytest.warns(DeprecationWarning, match=match):
                assert getattr(layer, old) is current
            tested.add(old)
    assert tested == set(moe_feed_forward_options.MOVED_ATTRIBUTES)
    # Not listed (saving does not visit them); other names are still errors.
    assert not set(moe_feed_forward_options.MOVED_ATTRIBUTES) & set(dir(separate))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="no_such_attribute"):
            separate.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("name", ["token_choice", "expert_choice"])
def test_a_router_kind_given_as_router_warns(name):
    """0.2.0's `router="expert_choice"` is `routing="expert_choice"` (its
    capacity factor None meant 1.0)."""
    match = deprecated(f"MoEFeedForward(router={name!r})", f"`routing={name!r}`")
    with pytest.warns(DeprecationWarning, match=match):
        layer = MoEFeedForward(M, E, router=name, name="block")
    expected = MoEFeedForward(
        M,
        E,
        routing=name,
        capacity_factor=1.0 if name == "expert_choice" else None,
        name="block",
    )
    assert layer.get_config() == expected.get_config()
    kind = ExpertChoiceRouter if name == "expert_choice" else TopKRouter
    assert type(layer.router) is kind
    x = with_same_weights(layer, expected, (2, 3, D), seed=1)
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(expected(x)))


def test_an_expert_choice_router_without_a_capacity_factor_warns():
    match = deprecated(
        "ExpertChoiceRouter(capacity_factor=None)",
        "ExpertChoiceRouter(capacity_factor=1.0)",
    )
    with pytest.warns(DeprecationWarning, match=match):
        router = ExpertChoiceRouter(E, capacity_factor=None)
    assert router.capacity_factor == 1.0
    assert router.get_config() == ExpertChoiceRouter(E, name=router.name).get_config()


def routed(seed=2, n=7, k=2):
    """Tokens, their top-k experts and weights, and a built bank."""
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(n, D)).astype("float32")
    experts = np.stack([rng.permutation(E)[:k] for _ in range(n)]).astype("int32")
    weights = rng.uniform(size=(n, k)).astype("float32")
    bank = FeedForwardExperts(M, E, gated=True)
    bank.build((None, E, 1, D))
    randomize(bank, seed)
    return tokens, experts, weights, bank


def has_grouped_matmul():
    return backend.fast_path("grouped_matmul") is not None


@pytest.mark.parametrize(
    "old, new, capacity_factor",
    [("capacity", "tiers", None), ("rows", "grouped", None)],
)
def test_old_layout_names_of_sparse_mixture_warn(old, new, capacity_factor):
    tokens, experts, weights, bank = routed()
    expected, _, _ = routing.sparse_mixture(
        tokens, experts, weights, E, bank, layout="tiers"
    )
    phrase = " without a capacity_factor" if old == "capacity" else ""
    match = deprecated(f"layout={old!r}{phrase}", f"layout={new!r}")
    if new == "grouped" and not has_grouped_matmul():
        assert keras.backend.backend() == "tensorflow"
        with pytest.warns(DeprecationWarning, match=match):
            with pytest.raises(ValueError, match="needs a backend grouped matmul"):
                routing.sparse_mixture(tokens, experts, weights, E, bank, layout=old)
        return
    with pytest.warns(DeprecationWarning, match=match):
        outputs, _, _ = routing.sparse_mixture(
            tokens, experts, weights, E, bank, layout=old
        )
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), rtol=1e-5, atol=1e-6
    )


def expert_fn_of(bank):
    """An expert function as keras-moe 0.2.0 documented it: `fn(layout, x)`
    with `layout.matmul(x, kernel)` of `(e, d, m)` kernels (`expert_axis=1`
    for `(d, e, m)` ones) and `layout.add_bias(x, bias)` of `(e, m)` biases."""

    def expert_fn(layout, x):
        gate = layout.matmul(x, ops.moveaxis(bank.gate_kernel, 0, 1), expert_axis=1)
        h = layout.add_bias(layout.matmul(x, bank.up_kernel), bank.up_bias)
        h = keras.activations.gelu(gate) * h
        return layout.add_bias(layout.matmul(h, bank.down_kernel), bank.down_bias)

    return expert_fn


@pytest.mark.parametrize("layout", ["capacity", "tiers", "blocks", "grouped"])
def test_an_expert_function_of_0_2_0_warns_and_runs(layout):
    tokens, experts, weights, bank = routed()
    capacity_factor = 2.0 if layout == "capacity" else None
    if layout == "grouped" and not has_grouped_matmul():
        layout = "tiers"  # TensorFlow has no grouped matmul
    expected, _, _ = routing.sparse_mixture(
        tokens, experts, weights, E, bank, capacity_factor, layout=layout
    )
    match = deprecated(
        "an expert function `expert_fn(layout, rows)`",
        "an expert bank layer called as `expert_bank(rows, layout=...)`",
    )
    with pytest.warns(DeprecationWarning, match=match):
        outputs, _, _ = routing.sparse_mixture(
            tokens,
            experts,
            weights,
            E,
            expert_fn_of(bank),
            capacity_factor,
            layout=layout,
        )
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), rtol=1e-5, atol=1e-5
    )


def test_an_expert_function_of_0_2_0_with_other_argument_names():
    tokens, experts, weights, bank = routed(seed=4)
    expected, _, _ = routing.sparse_mixture(tokens, experts, weights, E, bank)
    expert_fn = expert_fn_of(bank)
    with pytest.warns(DeprecationWarning, match="expert_fn"):
        outputs, _, _ = routing.sparse_mixture(
            tokens, experts, weights, E, lambda plan, rows: expert_fn(plan, rows)
        )
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), rtol=1e-5, atol=1e-5
    )


def test_an_expert_function_of_0_2_0_runs_under_expert_choice():
    tokens, _, _, bank = routed(seed=3)
    router = ExpertChoiceRouter(E, top_k=2)
    router.build((None, D))
    weights, indices = router(tokens)
    expected = routing.expert_choice_mixture(tokens, weights, indices, bank)
    with pytest.warns(DeprecationWarning, match="expert_fn"):
        outputs = routing.expert_choice_mixture(
            tokens, weights, indices, expert_fn_of(bank)
        )
    np.testing.assert_allclose(
        to_numpy(outputs), to_numpy(expected), rtol=1e-5, atol=1e-5
    )


def saved_config(path):
    """The config of a `.keras` file's model."""
    with zipfile.ZipFile(path) as archive:
        return json.load(io.TextIOWrapper(archive.open("config.json")))


LEGACY_FEED_FORWARD = sorted(
    (REPO / "tests" / "data").glob("v*/feed_forward*.keras"), key=str
)


@pytest.mark.parametrize(
    "path",
    LEGACY_FEED_FORWARD,
    ids=[f"{p.parent.name}/{p.stem}" for p in LEGACY_FEED_FORWARD],
)
def test_a_config_of_0_2_0_loads_without_warnings(path):
    """A saved config names 0.2.0's options (and has no `format_version`):
    its user wrote none of them, so loading it warns of nothing, and the
    layer it makes has 0.3.0's config."""
    config = saved_config(path)
    (layer_config,) = [
        layer["config"]
        for layer in config["config"]["layers"]
        if layer["class_name"] == "MoEFeedForward"
    ]
    assert "format_version" not in layer_config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = MoEFeedForward.from_config(layer_config)
        model = keras.saving.load_model(path)
    assert [str(w.message) for w in caught if "keras-moe" in str(w.message)] == []
    assert layer.get_config()["format_version"] == 2
    (loaded,) = [lay for lay in model.layers if isinstance(lay, MoEFeedForward)]
    assert loaded.get_config() == {**layer.get_config(), "name": loaded.name}
