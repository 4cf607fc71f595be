"""Expert parallelism: `keras_moe.expert_parallel_layout_map`.

The multi-device checks run on 8 simulated CPU devices with the JAX backend
in a separate process (`tests/distribution_worker.py`), whatever backend this
suite runs on, so the rest of the suite keeps its single device. The
checkpoints cross between that process and this one: a model saved here (one
device, this suite's backend) loads under `ModelParallel` there, and the
model trained there loads here.
"""

import json

import keras
import numpy as np
import pytest
from keras import ops

import keras_moe
from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE
from keras_moe import Conv3DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe.layers import FeedForwardExperts
from tests import distribution_worker
from tests.conftest import BACKEND
from tests.conftest import REPO
from tests.conftest import run_on_eight_devices
from tests.conftest import to_numpy
from tests.conftest import worker_report

WORKER = REPO / "tests" / "distribution_worker.py"
WORKER_TIMEOUT = 600

# Keras 3.15's distribution API runs on JAX only; on the other backends the
# map is an error (`test_this_backend`, `test_unsupported_backends_...`), and
# the multi-device run uses JAX in its own process on every backend's run.
jax_only = pytest.mark.only_backend("jax")


def one_device_mesh(axis_names=("batch", "expert")):
    shape = (1,) * len(axis_names)
    return keras.distribution.DeviceMesh(shape, list(axis_names), devices=["cpu:0"])


# The expert parallel run, 8 simulated devices, its own process -------------


def test_expert_parallel_on_eight_simulated_devices(tmp_path):
    distribution_worker.save_single_device_model(tmp_path)
    x, _ = distribution_worker.data()

    run = run_on_eight_devices(WORKER, tmp_path, WORKER_TIMEOUT)
    report = worker_report(tmp_path / "multi.json", run)
    failed = {name: r["detail"] for name, r in report.items() if not r["ok"]}
    assert not failed, json.dumps(failed, indent=1)[:8000]
    expected_checks = {
        "eight_devices",
        "shardings",
        "other_weights_replicated",
        "reference_on_one_device",
        "loaded_single_checkpoint_predicts_same",
        "fit_loss_same",
        "fit_weights_same",
        "shardings_after_fit",
        "optimizer_slots_sharded",
        "evaluate_same",
        "predict_same",
        "train_step_no_expert_gather",
        "grouped_routing_splits_compute",
        "completed",
    }
    assert expected_checks <= set(report), sorted(expected_checks - set(report))

    # Each device held a quarter of the experts of every expert weight.
    rows = report["shardings"]["detail"]
    assert {r["path"] for r in rows} >= {
        "conv_experts/expert_kernel",
        "my_dense_experts/expert_kernel",
        "ffn_expert_choice/experts/up_kernel",
        "soft_moe/experts/down_kernel",
    }
    for r in rows:
        assert r["shard_shapes"][0][r["axis"]] * 4 == r["full"][r["axis"]]

    # docs/expert-parallelism.md: group-local routing splits the token-routed
    # layer's work over the batch axis (2 devices): about half the FLOPs per
    # device of one routing over the global batch, not the same.
    flops = report["grouped_routing_splits_compute"]["detail"]
    assert flops["groups"] == 2
    assert flops["grouped"] <= distribution_worker.GROUPED_FLOPS_RATIO * flops["global"]

    # The checkpoint written on 8 devices loads here, on one device.
    loaded = keras.saving.load_model(tmp_path / "multi.keras")
    expected = np.load(tmp_path / "multi_pred.npy")
    np.testing.assert_allclose(
        to_numpy(loaded.predict(x, batch_size=distribution_worker.BATCH, verbose=0)),
        expected,
        atol=distribution_worker.TOLERANCE,
    )


def test_weight_movement_detector():
    """The HLO check flags per-row copies and whole gathers of an expert
    kernel `(8, 20, 24)` split 4 ways, and not a device's own shard."""
    moves = distribution_worker.moves_expert_weight
    weight = (8, 20, 24)
    assert moves((12, 20, 24), weight, 0, 2)  # a gather by expert index
    assert moves((8, 20, 24), weight, 0, 2)  # an all-gather
    assert not moves((2, 20, 24), weight, 0, 2)  # a gradient shard
    assert not moves((8, 23, 20), weight, 0, 2)  # a dispatch buffer
    line = (
        "%all-reduce.59 = (f32[12,20,24]{2,1,0}, f32[12,24]{1,0}) "
        "all-reduce(%a, %b), channel_id=1"
    )
    ((op, shapes, _),) = distribution_worker.collectives(line)
    assert (op, shapes) == ("all-reduce", [(12, 20, 24), (12, 24)])


# What the map does, in this process ----------------------------------------


@jax_only
@pytest.mark.parametrize(
    "layer, input_shape, expected",
    [
        (
            DenseMoE(6, 4),
            (2, 5),
            {
                "expert_kernel": (None, "expert"),
                "expert_bias": ("expert",),
                "gating_kernel": (None, None),
                "gating_bias": (None,),
            },
        ),
        (
            Conv1DMoE(4, 2, 3),
            (2, 7, 3),
            {
                "expert_kernel": (None, None, "expert"),
                "gating_kernel": (None, None, "expert"),
                "expert_bias": ("expert",),
                "gating_bias": ("expert",),
            },
        ),
        (
            Conv2DMoE(4, 2, 3, gating_input="pooled"),
            (2, 6, 6, 3),
            {
                "expert_kernel": (None, None, None, "expert"),
                "gating_kernel": (None, "expert"),
                "expert_bias": ("expert",),
                "gating_bias": ("expert",),
            },
        ),
    ],
)
def test_layouts_of_a_layer_built_under_the_distribution(layer, input_shape, expected):
    mesh = one_device_mesh()
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(mesh),
        batch_dim_name="batch",
    )
    with distribution.scope():
        layer.build(input_shape)
    # The layouts Keras asked the distribution for (one device: no real split).
    specs = {v.name: tuple(v._layout.axes) for v in layer.weights}
    specs = {k: v + (None,) * (len(expected[k]) - len(v)) for k, v in specs.items()}
    assert specs == expected


@jax_only
def test_user_entries_kept_and_user_map_not_modified():
    mesh = one_device_mesh()
    user = keras.distribution.LayoutMap(mesh)
    user[".*head/kernel"] = (None, "expert")
    user[".*expert_kernel"] = (None, None, None)
    result = keras_moe.expert_parallel_layout_map(mesh, layout_map=user)
    assert isinstance(result, keras.distribution.LayoutMap)
    assert result is not user
    assert list(user) == [".*head/kernel", ".*expert_kernel"]
    assert result["model/head/kernel"].axes == (None, "expert")
    distribution = keras.distribution.ModelParallel(
        layout_map=result, batch_dim_name="batch"
    )
    with distribution.scope():
        model = keras.Sequential(
            [keras.Input((5,)), DenseMoE(6, 4), keras.layers.Dense(3, name="head")]
        )
    moe, head = model.layers
    assert tuple(head.kernel._layout.axes) == (None, "expert")
    # A keras-moe expert weight takes its expert layout over a matching entry.
    assert tuple(moe.expert_kernel._layout.axes) == (None, "expert")


@jax_only
def test_nested_layer_of_a_subclassed_model_is_sharded():
    """Keras defers the variables' initialisation when a subclassed model
    first runs under a JAX trace: the layout is then asked for in the outer
    model's scope, and the expert weights must still be found."""

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.ffn = MoEFeedForward(8, 4, name="renamed_ffn")

        def call(self, x):
            return x + self.ffn(x)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = Block(name="block")
            self.head = keras.layers.Dense(2)

        def call(self, x):
            return self.head(self.block(x))

    mesh = one_device_mesh()
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(mesh),
        batch_dim_name="batch",
    )
    with distribution.scope():
        model = Net()
        model(np.ones((2, 3, 5), "float32"))
    ffn = model.block.ffn
    assert ffn.experts.weights
    for variable in ffn.experts.weights:
        assert tuple(variable._layout.axes)[:1] == ("expert",), variable.path
    assert tuple(ffn.router.kernel._layout.axes) == (None, None)


@jax_only
def test_same_name_in_another_layer_is_left_to_the_user_map():
    class NotMoE(keras.layers.Layer):
        def build(self, input_shape):
            self.expert_kernel = self.add_weight(name="expert_kernel", shape=(4, 4))

        def call(self, x):
            return x @ self.expert_kernel

    mesh = one_device_mesh()
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(mesh),
        batch_dim_name="batch",
    )
    layer = NotMoE()
    with distribution.scope():
        layer.build((2, 4))
    assert tuple(layer.expert_kernel._layout.axes) == (None, None)


class _DeclaredBank(keras.layers.Layer):
    """A layer of somebody else's that declares its expert weights: a
    `(d, E, u)` kernel split on axis 1, a per-expert bias on axis 0, and a
    shared scale that it does not declare."""

    def expert_weight_axes(self):
        return {"kernel": 1, "bias": 0}

    def build(self, input_shape):
        with keras_moe.distribution.expert_weights(self):
            self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 4, 3))
            self.bias = self.add_weight(name="bias", shape=(4, 3))
        self.scale = self.add_weight(name="scale", shape=(3,))

    def call(self, x):
        return ops.einsum("nd,deu->nu", x, self.kernel) + ops.sum(self.bias, 0)


class _Outer(keras.layers.Layer):
    """Declares `kernel` on axis 0 and holds a `_DeclaredBank` whose own
    `kernel` is on axis 1: the innermost declaration counts."""

    def expert_weight_axes(self):
        return {"kernel": 0}

    def build(self, input_shape):
        with keras_moe.distribution.expert_weights(self):
            self.inner = _DeclaredBank(name="inner")
            self.inner.build(input_shape)
            self.kernel = self.add_weight(name="kernel", shape=(4, input_shape[-1]))


@jax_only
def test_a_layer_declares_its_expert_weights():
    """`distribution.expert_weights(layer)`: the variables `layer` creates
    inside, named in its `expert_weight_axes()`, are split on their axis;
    the others are laid out by the user's entries (or replicated); the
    paths are remembered for layouts asked later."""
    mesh = one_device_mesh()
    user = keras.distribution.LayoutMap(mesh)
    user[".*scale"] = ("expert",)
    layout_map = keras_moe.expert_parallel_layout_map(mesh, layout_map=user)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        outer = _Outer(name="outer")
        outer.build((2, 5))
    bank = outer.inner

    def axes(variable):  # Keras drops the trailing Nones
        spec = tuple(variable._layout.axes)
        return spec + (None,) * (len(variable.shape) - len(spec))

    assert axes(bank.kernel) == (None, "expert", None)
    assert axes(bank.bias) == ("expert", None)
    assert axes(outer.kernel) == ("expert", None)
    # Created outside the declaration: the user's entry.
    assert axes(bank.scale) == ("expert",)
    # Asked after creation (as when Keras defers a variable's creation).
    assert tuple(layout_map[bank.kernel.path].axes) == (None, "expert")
    assert tuple(layout_map[outer.kernel.path].axes) == ("expert",)
    assert layout_map["somewhere/else/kernel"] is None


@jax_only
def test_expert_axis_names_the_current_maps_axis():
    assert keras_moe.distribution.expert_axis() is None
    mesh = one_device_mesh(("data", "experts_here"))
    layout_map = keras_moe.expert_parallel_layout_map(mesh, expert_axis="experts_here")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="data"
    )
    assert keras_moe.distribution.expert_axis(distribution) == "experts_here"
    with distribution.scope():
        assert keras_moe.distribution.expert_axis() == "experts_here"
    assert keras_moe.distribution.expert_axis() is None
    # Not keras-moe's map, or no map: no expert axis.
    plain = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="data"
    )
    assert keras_moe.distribution.expert_axis(plain) is None
    data_parallel = keras.distribution.DataParallel(devices=["cpu:0"])
    assert keras_moe.distribution.expert_axis(data_parallel) is None
    # Another expert-parallel map on the same mesh: its own axis.
    other = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(mesh, expert_axis="data"),
        batch_dim_name="experts_here",
    )
    assert keras_moe.distribution.expert_axis(other) == "data"
    assert keras_moe.distribution.expert_axis(distribution) == "experts_here"


@jax_only
def test_the_expert_axis_reaches_the_routing(monkeypatch):
    """Under the distribution, a router lays its experts' buffer out over
    the map's expert axis: the routing gets it as an argument."""
    mesh = one_device_mesh(("data", "experts_here"))
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(
            mesh, expert_axis="experts_here"
        ),
        batch_dim_name="data",
    )
    laid_out = []
    distribute_tensor = keras.distribution.distribute_tensor

    def record(x, layout):
        laid_out.append(tuple(layout.axes))
        return distribute_tensor(x, layout)

    monkeypatch.setattr(keras.distribution, "distribute_tensor", record)
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype("float32")
    with distribution.scope():
        layer = MoEFeedForward(8, 4, routing="expert_choice", capacity_factor=1.0)
        y = layer(x)
    assert tuple(y.shape) == x.shape
    # The (E, c, d) buffer and the experts' outputs on it.
    buffers = [axes for axes in laid_out if axes[:1] == ("experts_here",)]
    assert len(buffers) >= 2, laid_out


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (DenseMoE(6, 4), (2, 5)),
        (Conv1DMoE(4, 3, 3), (2, 7, 2)),
        (Conv2DMoE(4, 3, 3, data_format="channels_first"), (2, 2, 6, 6)),
        (Conv2DMoE(4, 3, 3, gating_input="pooled"), (2, 6, 6, 2)),
        (Conv2DMoE(4, 3, 3, gating_input="local"), (2, 6, 6, 2)),
        (Conv3DMoE(4, 3, 2, gating_input="local"), (2, 4, 4, 4, 2)),
        (DenseMoE(6, 4, top_k=2, capacity_factor=2.0), (2, 3, 5)),
        (MoEFeedForward(8, 4, gated=True), (2, 3, 5)),
        (MoEFeedForward(8, 4, use_bias=False), (2, 5)),
        (
            MoEFeedForward(8, 4, routing="expert_choice", capacity_factor=1.0),
            (2, 3, 5),
        ),
        (SoftMoE(8, 4, slots_per_expert=2), (2, 3, 5)),
    ],
)
def test_declared_expert_axes_match_the_weights(layer, input_shape):
    """On every backend: every expert weight is declared by the layer that
    creates it (the layer itself, or its `FeedForwardExperts` bank), on its
    experts (for the conv layers: filters) axis; nothing else is."""
    layer.build(input_shape)
    declaring = [
        sub for sub in layer._flatten_layers() if hasattr(sub, "expert_weight_axes")
    ]
    assert declaring
    conv = hasattr(layer, "n_filters")
    n = layer.n_filters if conv else layer.n_experts
    for sub in declaring:
        axes = sub.expert_weight_axes()
        # The layer's own weights, not its sublayers' (a router's, say).
        own = {v.name: v for v in sub.weights if v.path == f"{sub.path}/{v.name}"}
        assert set(axes) >= {name for name in own if name.startswith("expert_")}
        if isinstance(sub, FeedForwardExperts):
            assert set(own) <= set(axes)  # every weight of a bank is per expert
        for name, axis in axes.items():
            if name not in own:  # a weight this configuration does not have
                continue
            shape = tuple(own[name].shape)
            per_expert = 1
            if name == "expert_kernel" and conv:
                per_expert = layer.n_experts_per_filter  # channel f * K + k
            assert shape[axis] == n * per_expert, (sub.path, name, shape, axis)
    declared = {
        f"{sub.path}/{name}" for sub in declaring for name in sub.expert_weight_axes()
    }
    # No router or statistics variable is declared (they stay replicated).
    for v in layer.weights:
        if "/router/" in v.path or "/statistics/" in v.path:
            assert v.path not in declared, v.path


# Arguments and backends -----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exception, message",
    [
        (
            {"mesh": "mesh"},
            TypeError,
            r"`mesh` must be a `keras.distribution.DeviceMesh`",
        ),
        (
            {"expert_axis": "model"},
            ValueError,
            r"`expert_axis` must be the name of an axis.*model",
        ),
        ({"expert_axis": 0}, ValueError, r"`expert_axis` must be the name"),
        (
            {"layout_map": {"a": (None,)}},
            TypeError,
            r"`layout_map` must be a `keras.distribution.LayoutMap`",
        ),
        (
            {"layout_map": "other mesh"},
            ValueError,
            r"`layout_map` must be built on the same `mesh`",
        ),
    ],
)
def test_bad_arguments(kwargs, exception, message):
    mesh = one_device_mesh()
    if kwargs.get("layout_map") == "other mesh":
        kwargs["layout_map"] = keras.distribution.LayoutMap(one_device_mesh())
    kwargs = {"mesh": mesh, **kwargs}
    with pytest.raises(exception, match=message):
        keras_moe.expert_parallel_layout_map(**kwargs)


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "numpy"])
def test_unsupported_backends_get_a_clear_error(backend, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: backend)
    # An explicit device: `keras.distribution.list_devices()` fails on torch.
    mesh = one_device_mesh()
    with pytest.raises(
        NotImplementedError,
        match=rf"JAX backend only: .*Received: backend='{backend}'",
    ):
        keras_moe.expert_parallel_layout_map(mesh)


def test_this_backend():
    """JAX gets a LayoutMap; torch and TensorFlow, whose Keras 3.15 distribution
    support would silently ignore the layout, get the error."""
    mesh = one_device_mesh()
    if BACKEND == "jax":
        layout_map = keras_moe.expert_parallel_layout_map(mesh)
        assert isinstance(layout_map, keras.distribution.LayoutMap)
    else:
        with pytest.raises(NotImplementedError, match=r"KERAS_BACKEND=jax"):
            keras_moe.expert_parallel_layout_map(mesh)
