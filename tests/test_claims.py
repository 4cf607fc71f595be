"""Quantitative claims of the docs that no other test checks.

Each test names the page and the claim it guards: how the sparse layers' cost
scales (docs/sparse-routing.md), what the mixed-kernel path saves and the
parameter counts (docs/conv-gating.md), the defaults of the original
arguments (docs/porting.md) and the package's dependencies
(docs/getting-started.md). Costs are the compiled program's own counts
(`cost_analysis`, `memory_analysis`), never timings.
"""

import ast
import inspect
import re

import keras
import numpy as np
import pytest
from packaging.requirements import Requirement

from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe.experiments import cifar10
from keras_moe.experiments import common
from tests.conftest import REPO

DOCS = REPO / "docs"


def doc(name, flat=True):
    """The text of a docs page, its runs of whitespace made single spaces
    (a quoted phrase may break across lines) unless `flat=False`."""
    text = (DOCS / name).read_text(encoding="utf-8")
    return " ".join(text.split()) if flat else text


# ------------------------------------------- docs/sparse-routing.md: the cost

TOKENS, D, M = 256, 16, 256


def compiled_cost(layer):
    """FLOPs and temporary bytes of the compiled forward+backward of `layer`
    on `(TOKENS, D)` inputs (JAX's counts for the whole program)."""
    import jax

    layer.build((None, D))
    x = np.random.default_rng(0).normal(size=(TOKENS, D)).astype("float32")
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable):
        y = layer.stateless_call(trainable, non_trainable, x, training=True)[0]
        return jax.numpy.sum(y**2)

    compiled = jax.jit(jax.grad(loss)).lower(trainable).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"]), compiled.memory_analysis().temp_size_in_bytes


SPARSE_LAYERS = {
    "MoEFeedForward": lambda e, k: MoEFeedForward(M, e, top_k=k, capacity_factor=1.0),
    "DenseMoE": lambda e, k: DenseMoE(M, e, top_k=k, capacity_factor=1.0),
}


@pytest.mark.only_backend("jax")
@pytest.mark.parametrize("name", sorted(SPARSE_LAYERS))
def test_compute_and_memory_grow_with_k_not_with_the_number_of_experts(name):
    """docs/sparse-routing.md (and the layers' docstrings): "Compute and memory
    grow with `k`, not with the number of experts", with a `capacity_factor`.

    From 8 to 64 experts at `k=2`, the FLOPs grow by no more than the router's
    own `(tokens, d) x (d, E)` logits cost (`6 * T * d * dE` forward and
    backward, allowed twice over for its softmax and top-k), and the temporary
    memory by no more than four `(tokens, E)` float32 arrays of the router; the
    experts' part does not grow. The experts are large enough (`M = 16 d`)
    that these allowances are at most 27% of the 8-expert layer's FLOPs and
    11% of its temporary memory (jax 0.10.2: DenseMoE 10.2 MFLOP, 2.15 MB;
    MoEFeedForward 32.1 MFLOP, 2.67 MB): experts' work or buffers that grew
    with `E` by more fail. From `k=2` to `k=4` both nearly double (1.75-2.0x).
    (Dropless routing on JAX and TensorFlow compiles a padded-block fallback
    whose rows grow with the experts; see docs/sparse-routing.md.)
    """
    make = SPARSE_LAYERS[name]
    flops_8, temp_8 = compiled_cost(make(8, 2))
    flops_64, temp_64 = compiled_cost(make(64, 2))
    flops_k4, temp_k4 = compiled_cost(make(8, 4))
    more_experts = 64 - 8
    assert flops_64 - flops_8 <= 2 * 6 * TOKENS * D * more_experts, (flops_8, flops_64)
    assert temp_64 - temp_8 <= 4 * 4 * TOKENS * more_experts, (temp_8, temp_64)
    assert flops_k4 >= 1.8 * flops_8, (flops_8, flops_k4)
    assert temp_k4 >= 1.5 * temp_8, (temp_8, temp_k4)


# ------------------------------------ docs/conv-gating.md: the mixed kernel


def conv_forward_flops(layer, shape):
    import jax

    layer.build(shape)
    x = np.ones(shape, "float32")
    trainable = [v.value for v in layer.trainable_variables]
    compiled = jax.jit(lambda tv: layer.stateless_call(tv, [], x)[0])
    cost = compiled.lower(trainable).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.only_backend("jax")
def test_mixed_kernel_path_needs_about_one_kth_of_the_experts_flops():
    """docs/conv-gating.md: with linear experts and "pooled" gates the layer
    uses the mixed-kernel path by itself from 8 experts per filter, "which
    needs 1/K of the experts' FLOPs" (plus mixing the kernels per sample:
    within 25% of 1/K of the general path's FLOPs)."""
    k, shape = 8, (4, 16, 16, 8)
    kwargs = {"padding": "same", "gating_input": "pooled"}
    mixed = conv_forward_flops(Conv2DMoE(16, k, 3, **kwargs), shape)
    general = conv_forward_flops(
        Conv2DMoE(16, k, 3, mixed_kernel=False, **kwargs), shape
    )
    assert mixed <= 1.25 * general / k, (mixed, general)


# --------------------------------------- docs/conv-gating.md: the parameters


def quoted(count):
    return f"{count:,}"


# Parameter counts do not depend on the backend: they are counted on the one
# where building is cheapest (JAX compiles every initializer's random draw,
# about 25 s of CPU for the 7.5M-parameter network).
counted_once = pytest.mark.only_backend("torch")


@counted_once
@pytest.mark.parametrize(
    "gating_input, count", [("flatten", 198_464), ("pooled", 2_048), ("local", 3_584)]
)
def test_parameters_of_one_conv_layer(gating_input, count):
    """docs/conv-gating.md: "Parameters of `Conv2DMoE(32, 2, (3, 3))` on
    32×32×3: 198,464 with "flatten", 2,048 with "pooled", 3,584 with "local"."""
    layer = Conv2DMoE(32, 2, (3, 3), padding="same", gating_input=gating_input)
    layer.build((None, 32, 32, 3))
    assert layer.count_params() == count
    assert f'{quoted(count)} with `"{gating_input}"`' in doc("conv-gating.md")


def cifar_moe_network(gating_input, head):
    """The original CIFAR-10 MoE network as docs/conv-gating.md describes it:
    four `Conv2DMoE` with 2 experts per filter, then `head`."""
    layers = [keras.Input((32, 32, 3))]
    for filters in (32, 64):
        for padding in ("same", "valid"):
            layers.append(
                Conv2DMoE(
                    filters,
                    2,
                    (3, 3),
                    padding=padding,
                    expert_activation="relu",
                    gating_activation="softmax",
                    gating_input=gating_input,
                )
            )
        layers += [keras.layers.MaxPooling2D(2), keras.layers.Dropout(0.25)]
    layers += [
        keras.layers.Flatten(),
        head,
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ]
    return keras.Sequential(layers)


def moe_head():
    return DenseMoE(512, 2, expert_activation="relu", gating_activation="softmax")


@counted_once
@pytest.mark.parametrize(
    "network, count",
    [
        (lambda: cifar_moe_network("flatten", moe_head()), 7_560_140),
        (lambda: cifar_moe_network("pooled", moe_head()), 2_516_108),
        (
            lambda: cifar_moe_network(
                "pooled", keras.layers.Dense(512, activation="relu")
            ),
            1_331_338,
        ),
        (lambda: cifar10.build_model("cnn", augmentation=False), 1_250_858),
    ],
    ids=["flatten", "pooled", "pooled-dense-head", "cnn"],
)
def test_parameters_of_the_cifar10_networks(network, count):
    """docs/conv-gating.md: 7,560,140 parameters with "flatten", 2,516,108
    with "pooled", 1,331,338 with "pooled" and a plain `Dense(512)` head,
    against the CNN's 1,250,858."""
    assert common.count_params(network()) == count
    assert quoted(count) in doc("conv-gating.md")


@counted_once
def test_the_experiments_networks_are_the_ones_counted():
    """The experiment's `moe` network is the one docs/conv-gating.md counts;
    its `moe-pooled` (a `DenseMoE(256, 2)` head) has the 1.33M parameters of
    docs/experiments/cifar10 ("1.33M parameters against 1.25M")."""
    moe = cifar10.build_model("moe", augmentation=False)
    assert common.count_params(moe) == 7_560_140
    pooled = common.count_params(cifar10.build_model("moe-pooled", augmentation=False))
    assert pooled == 1_333_388
    assert round(pooled / 1e6, 2) == 1.33


# ---------------------------------------------- docs/porting.md: the defaults

LAYER_GROUPS = {
    "Dense": [DenseMoE],
    "Conv": [Conv1DMoE, Conv2DMoE, Conv3DMoE],
    "all": [DenseMoE, Conv1DMoE, Conv2DMoE, Conv3DMoE],
}
WEIGHTS = ("expert_kernel", "gating_kernel", "expert_bias", "gating_bias")


def porting_arguments():
    """`(argument, layer group, default)` rows of docs/porting.md's table;
    `*_regularizer` stands for the four weights' regularizers (and so on),
    a default of "–" for a required argument."""
    section = (
        doc("porting.md", flat=False).split("## Arguments", 1)[1].split("\n## ", 1)[0]
    )
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[1] not in LAYER_GROUPS:
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            if name.startswith("*_"):
                rows += [(f"{w}{name[1:]}", cells[1], cells[2]) for w in WEIGHTS]
            else:
                rows.append((name, cells[1], cells[2]))
    return rows


def test_porting_table_defaults_are_the_signatures():
    """docs/porting.md's argument table: every argument it lists exists in
    each layer it names, with the default it states."""
    rows = porting_arguments()
    assert len(rows) >= 20, rows
    for name, group, default in rows:
        expected = inspect.Parameter.empty
        if default != "–":
            expected = ast.literal_eval(default.strip("`"))
        for cls in LAYER_GROUPS[group]:
            parameters = inspect.signature(cls.__init__).parameters
            assert name in parameters, (cls.__name__, name)
            assert parameters[name].default == expected, (cls.__name__, name)


# -------------------------------------- docs/getting-started.md: dependencies


def test_depends_only_on_keras_and_numpy():
    """docs/getting-started.md: "keras-moe depends only on `keras>=3.10` and
    NumPy" (pyproject.toml's dependencies, extras apart)."""
    # A regular expression, not tomllib: Python 3.10 has none.
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S)
    dependencies = re.findall(r'"([^"]+)"', block.group(1))
    requirements = {Requirement(r).name.lower(): Requirement(r) for r in dependencies}
    assert sorted(requirements) == ["keras", "numpy"], dependencies
    assert requirements["keras"].specifier.contains("3.10")
    assert not requirements["keras"].specifier.contains("3.9.9")


# ------------------------------- README: CI fails what would be a skip locally


def test_skip_or_fail_fails_in_ci_and_skips_locally(monkeypatch):
    """README: with `CI=true` "a test whose prerequisite is missing
    (`../shared/seed-compat`, keras-hub) fails instead of skipping"."""
    from tests import conftest

    def outcome():
        # pytest's outcomes are BaseExceptions; one that escaped this test
        # would skip it instead of failing it.
        try:
            conftest.skip_or_fail("no data")
        except BaseException as error:
            return type(error), str(error)
        return None, ""

    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(conftest, "IN_CI", True)
    kind, message = outcome()
    assert kind is pytest.fail.Exception, kind
    assert "no data" in message and "missing prerequisite fails" in message
    monkeypatch.setattr(conftest, "IN_CI", False)
    kind, message = outcome()
    assert kind is pytest.skip.Exception, kind
    assert "no data" in message


SKIPS = re.compile(r"pytest\.skip\(|importorskip|mark\.skip|mark\.xfail|\.xfail\(")


def test_every_skip_goes_through_skip_or_fail():
    """No test skips by itself (a skip that CI would not turn into a failure):
    the seed-compat fixture, the KerasHub parity tests and every other missing
    prerequisite call `tests.conftest.skip_or_fail`."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        if path.name != "conftest.py" or path.parent != REPO / "tests"
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if SKIPS.search(line) and path.name != "test_claims.py"
    ]
    assert not offenders, offenders
    feed_forward = (REPO / "tests/layers/test_moe_feed_forward.py").read_text("utf-8")
    parity = feed_forward.split("def test_equals_keras_hub_mixtral_block", 1)[1]
    assert "skip_or_fail(" in parity.split("\ndef ", 1)[0]
    conftest = (REPO / "tests/conftest.py").read_text("utf-8")
    fixture = conftest.split("def seed_compat_dir", 1)[1].split("\ndef ", 1)[0]
    assert "skip_or_fail(" in fixture
