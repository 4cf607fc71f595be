"""Expert-parallel checks on 8 simulated CPU devices, run in its own process.

`tests/test_distribution.py` runs `python tests/distribution_worker.py DIR`
with `KERAS_BACKEND=jax` and
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, so that the rest of the
suite keeps its single device. The test saves `DIR/single.keras` (a model
from `build_model` on one device, any backend) and its predictions on
`data()` (`save_single_device_model`); this script, on a mesh batch=2 x
expert=4, loads it under `ModelParallel`, checks shardings, outputs, a
training step against the single-device model with the same weights,
`fit`/`evaluate`/`predict`, the collectives of the compiled train step, the
per-device FLOPs of grouped routing, and saves `DIR/multi.keras` and its
predictions for the test to load on one device.

It writes `DIR/multi.json`: `{check: {"ok": bool, "detail": ...}}`, and
prints the figures docs/expert-parallelism.md quotes. Run by hand (it saves
the one-device model itself when `DIR` has none):

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/distribution_worker.py /tmp/expert-parallel
"""

import json
import os
import re
import sys
import traceback

import keras
import numpy as np

import keras_moe
from keras_moe import Conv2DMoE
from keras_moe import DenseMoE
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE

MESH_SHAPE = (2, 4)
BATCH = 12  # 6 per data-parallel replica
INPUT_SHAPE = (5, 5, 3)
TOKENS = 25  # the conv output's positions, as tokens of the routed layers
TOLERANCE = 2e-5


def build_model():
    """A small network with every expert-weight layout the map must handle:
    conv experts, token-routed experts (`MoEFeedForward` dropless, the
    default, and `DenseMoE` with `top_k` and a capacity), expert-choice
    routing (over the whole batch: the same on one device), a `SoftMoE` and a
    soft `DenseMoE`. The capacity is per routing group (each batch shard routes its
    own tokens under the distribution, one group on one device): 4.0 holds
    every assignment of a group of 150 tokens, so the two runs drop nothing
    and stay comparable."""
    inputs = keras.Input(INPUT_SHAPE)
    h = Conv2DMoE(
        4,
        3,
        (3, 3),
        padding="same",
        expert_activation="relu",
        gating_activation="softmax",
        name="conv_experts",
    )(inputs)
    h = keras.layers.Reshape((TOKENS, 4))(h)
    h = keras.layers.Dense(20, name="embed")(h)
    h = MoEFeedForward(24, 8, top_k=2, gated=True, name="ffn_experts")(h)
    h = MoEFeedForward(
        16, 8, routing="expert_choice", capacity_factor=1.0, name="ffn_expert_choice"
    )(h)
    h = SoftMoE(16, 4, name="soft_moe")(h)
    h = DenseMoE(
        14, 8, top_k=2, capacity_factor=4.0, expert_activation="relu", name="top2"
    )(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = DenseMoE(
        10,
        8,
        expert_activation="relu",
        gating_activation="softmax",
        name="my_dense_experts",
    )(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH,) + INPUT_SHAPE).astype("float32")
    y = rng.normal(size=(BATCH, 3)).astype("float32")
    return x, y


def numpy_kernels(model, seed=7):
    """Redraws every kernel (the randomly initialised weights; biases and
    scales start constant) from NumPy, Glorot-scaled: the one-device model
    is then the same whatever backend built it, and so are the checks'
    routing decisions (an expert choice's near tie, which a sharded sum
    can flip, once made `fit_weights_same` fail for PyTorch's draw only)."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_weights:
        if not v.name.endswith("kernel"):
            continue
        shape = tuple(v.shape)
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        scale = np.sqrt(2.0 / ((shape[-2] + shape[-1]) * receptive))
        v.assign(rng.normal(size=shape, scale=scale).astype("float32"))


def save_single_device_model(directory):
    """`DIR/single.keras` (`build_model`, kernels from `numpy_kernels`) and
    its predictions on `data()`, `DIR/single_pred.npy`, on one device of
    this process's backend."""
    keras.utils.set_random_seed(7)
    model = build_model()
    numpy_kernels(model)
    x, _ = data()
    model.save(os.path.join(directory, "single.keras"))
    pred = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    np.save(os.path.join(directory, "single_pred.npy"), pred)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class Checks:
    def __init__(self):
        self.results = {}

    def record(self, name, ok, detail):
        self.results[name] = {"ok": bool(ok), "detail": detail}

    def run(self, name, fn):
        try:
            ok, detail = fn()
        except Exception:
            ok, detail = False, traceback.format_exc()
        self.record(name, ok, detail)
        return ok


def expert_variables(model):
    """(variable, declared axis, layer) of every declared expert weight."""
    found = []
    for layer in model._flatten_layers():
        declare = getattr(layer, "expert_weight_axes", None)
        if declare is None:
            continue
        axes = declare()
        for v in layer.weights:
            if v.name in axes:
                found.append((v, axes[v.name], layer))
    return found


def sharding_report(model, mesh_size):
    """Each expert weight is split `mesh_size` ways along its declared axis."""
    rows, ok = [], True
    for v, axis, _ in expert_variables(model):
        value = v.value
        full = tuple(v.shape)
        expected = full[:axis] + (full[axis] // mesh_size,) + full[axis + 1 :]
        shards = sorted({tuple(s.data.shape) for s in value.addressable_shards})
        good = shards == [expected] and full[axis] % mesh_size == 0
        ok = ok and good
        rows.append(
            {
                "path": v.path,
                "full": full,
                "axis": axis,
                "spec": str(value.sharding.spec),
                "shard_shapes": shards,
                "ok": good,
            }
        )
    if not rows:
        ok = False
    return ok, rows


COLLECTIVE_OPS = (
    "all-gather",
    "all-reduce",
    "collective-permute",
    "all-to-all",
    "reduce-scatter",
)
COLLECTIVE = re.compile(
    r"=\s*(?P<type>\(?[^=]*?)\s+(?P<op>" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\("
)
SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text):
    """`[(op, [result array shapes], line)]` of the collectives of an HLO module."""
    found = []
    for line in hlo_text.splitlines():
        match = COLLECTIVE.search(line)
        if not match:
            continue
        shapes = [
            tuple(int(d) for d in filter(None, dims.split(",")))
            for dims in SHAPE.findall(match.group("type"))
        ]
        found.append((match.group("op"), shapes, line.strip()[:240]))
    return found


def moves_expert_weight(shape, weight_shape, axis, local):
    """Whether `shape` is `weight_shape` with more than the `local` experts
    a device holds on `axis`: a whole expert weight gathered, or per-row
    copies of expert weights (a gather by expert index sums them over the
    devices with an all-reduce)."""
    if len(shape) != len(weight_shape):
        return False
    others = shape[:axis] + shape[axis + 1 :]
    return (
        others == weight_shape[:axis] + weight_shape[axis + 1 :] and shape[axis] > local
    )


def no_expert_weight_moved(hlo_text, model, n_shards):
    """No collective carries more expert weights than one device holds.

    Checked for the expert kernels (rank >= 3: the bulk of the bytes, and
    shapes that no activation of this model has).
    """
    weights = [
        (v.path, tuple(v.shape), axis, v.shape[axis] // n_shards)
        for v, axis, _ in expert_variables(model)
        if len(v.shape) >= 3
    ]
    found = collectives(hlo_text)
    offending = [
        (op, path, line)
        for op, shapes, line in found
        for path, weight_shape, axis, local in weights
        if any(moves_expert_weight(s, weight_shape, axis, local) for s in shapes)
    ]
    kinds = dict.fromkeys(COLLECTIVE_OPS, 0)
    for op, _, _ in found:
        kinds[op] += 1
    detail = {
        "collectives": kinds,
        "expert_kernels": {path: shape for path, shape, _, _ in weights},
        "offending": offending,
        "not_all_reduce": [line for op, _, line in found if op != "all-reduce"],
    }
    return bool(weights) and not offending, detail


# Grouped routing's per-device FLOPs against one global routing's, at most:
# the batch axis has 2 devices, so the experts' work halves; the router and the
# sort of the integer keys are not split, so a little more than 1/2 (0.54 with
# jax 0.10.2).
GROUPED_FLOPS_RATIO = 0.6


def grouped_compute(model):
    """Each batch shard routes its own tokens: the per-device FLOPs of the
    token-routed layer's forward+backward are about `1 / batch-axis size` of
    one routing over the global batch (the experts' work is split, not
    repeated, over the `batch` axis)."""
    import jax
    import jax.numpy as jnp

    from keras_moe import routing

    layer = model.get_layer("ffn_experts")
    distribution = keras.distribution.distribution()
    shape = (BATCH, TOKENS, layer.experts.up_kernel.shape[1])
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    x = jax.device_put(x, distribution.get_data_layout(shape).backend_layout)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(tv):
        y = layer.stateless_call(tv, non_trainable, x, training=True)[0]
        return jnp.sum(y**2)

    flops = {}
    grouped = routing.distribution_groups
    try:
        for name, plan in (
            ("grouped", grouped),
            ("global", lambda n, axis=None: (1, None)),
        ):
            # The one place `sparse_mixture` asks for its groups.
            routing.dispatch.distribution_groups = plan
            compiled = jax.jit(jax.grad(loss)).lower(trainable).compile()
            analysis = compiled.cost_analysis()
            if isinstance(analysis, list):
                analysis = analysis[0]
            flops[name] = float(analysis["flops"])
    finally:
        routing.dispatch.distribution_groups = grouped
    flops["groups"] = grouped(BATCH * TOKENS)[0]
    flops["ratio"] = flops["grouped"] / flops["global"]
    ok = flops["groups"] == MESH_SHAPE[0] and flops["ratio"] <= GROUPED_FLOPS_RATIO
    return ok, flops


def check_expert_parallel(directory, checks):
    import jax

    devices = jax.devices()
    checks.record("eight_devices", len(devices) == 8, [str(d) for d in devices])
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, ["batch", "expert"])
    layout_map = keras_moe.expert_parallel_layout_map(mesh, expert_axis="expert")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    x, y = data()
    single_pred = np.load(os.path.join(directory, "single_pred.npy"))
    path = os.path.join(directory, "single.keras")

    with distribution.scope():
        model = keras.saving.load_model(path)
    reference = keras.saving.load_model(path)  # same weights, one device

    checks.run("shardings", lambda: sharding_report(model, MESH_SHAPE[1]))

    def replicated_elsewhere():
        names = {v.path for v, _, _ in expert_variables(model)}
        others = [v for v in model.weights if v.path not in names]
        bad = [v.path for v in others if not v.value.sharding.is_fully_replicated]
        return not bad and bool(others), {"not_replicated": bad}

    checks.run("other_weights_replicated", replicated_elsewhere)

    def reference_on_one_device():
        devices = {d for v in reference.weights for d in v.value.devices()}
        return len(devices) == 1, sorted(str(d) for d in devices)

    checks.run("reference_on_one_device", reference_on_one_device)

    with distribution.scope():
        pred = model.predict(x, batch_size=BATCH, verbose=0)
    checks.record(
        "loaded_single_checkpoint_predicts_same",
        max_diff(pred, single_pred) < TOLERANCE,
        max_diff(pred, single_pred),
    )

    # One training step each, same weights, same data: same new weights.
    # Optimizer variables must be created under the distribution too.
    with distribution.scope():
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    reference.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    with distribution.scope():
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    ref_history = reference.fit(
        x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0
    )
    loss, ref_loss = history.history["loss"][0], ref_history.history["loss"][0]
    checks.record(
        "fit_loss_same", abs(loss - ref_loss) < TOLERANCE, {"ep": loss, "one": ref_loss}
    )
    diffs = {
        v.path: max_diff(v.value, w.value)
        for v, w in zip(model.weights, reference.weights)
    }
    worst = max(diffs, key=diffs.get)
    weight_diff = {"max": diffs[worst], "path": worst}
    checks.record("fit_weights_same", weight_diff["max"] < TOLERANCE, weight_diff)
    checks.run("shardings_after_fit", lambda: sharding_report(model, MESH_SHAPE[1]))

    def optimizer_slots_sharded():
        specs = {
            v.path: str(v.value.sharding.spec)
            for v in model.optimizer.variables
            if "expert_kernel" in v.path
        }
        ok = bool(specs) and all("expert" in s for s in specs.values())
        return ok, specs

    checks.run("optimizer_slots_sharded", optimizer_slots_sharded)

    with distribution.scope():
        ep_eval = model.evaluate(x, y, batch_size=BATCH, verbose=0)
        ep_pred = model.predict(x, batch_size=BATCH, verbose=0)
    ref_pred = reference.predict(x, batch_size=BATCH, verbose=0)
    # The loss of the one-device model's predictions (no router losses out of
    # training): one compiled program fewer than `reference.evaluate`.
    ref_eval = float(np.mean((ref_pred - y) ** 2))
    checks.record(
        "evaluate_same",
        abs(ep_eval - ref_eval) < TOLERANCE,
        {"ep": ep_eval, "one": ref_eval},
    )
    checks.record(
        "predict_same",
        max_diff(ep_pred, ref_pred) < TOLERANCE,
        max_diff(ep_pred, ref_pred),
    )

    # The program Keras jits for a train step (the same function, its inputs
    # laid out as Keras lays them out); it holds the forward pass too.
    data_sharding = distribution.get_data_layout(x.shape).backend_layout
    xb = jax.device_put(x, data_sharding)
    yb = jax.device_put(y, distribution.get_data_layout(y.shape).backend_layout)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    state = (
        trainable,
        non_trainable,
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    # Traced under the distribution, as `fit` traces it.
    with distribution.scope():
        step = jax.jit(model.train_step).lower(state, (xb, yb))
    train_hlo = step.compile().as_text()
    checks.run(
        "train_step_no_expert_gather",
        lambda: no_expert_weight_moved(train_hlo, model, MESH_SHAPE[1]),
    )

    with distribution.scope():
        checks.run("grouped_routing_splits_compute", lambda: grouped_compute(model))

    model.save(os.path.join(directory, "multi.keras"))
    np.save(os.path.join(directory, "multi_pred.npy"), ep_pred)


def summary(results):
    """The figures docs/expert-parallelism.md quotes, as lines of text."""
    import jax

    lines = [f"jax {jax.__version__}, keras {keras.__version__}, mesh {MESH_SHAPE}"]
    flops = results.get("grouped_routing_splits_compute", {}).get("detail")
    if isinstance(flops, dict):
        lines.append(
            "MoEFeedForward forward+backward, per device: "
            f"{flops['grouped'] / 1e6:.2f} MFLOP with group-local routing, "
            f"{flops['global'] / 1e6:.2f} MFLOP with one global routing "
            f"(ratio {flops['ratio']:.2f}, checked <= {GROUPED_FLOPS_RATIO})"
        )
    moved = results.get("train_step_no_expert_gather", {})
    if isinstance(moved.get("detail"), dict):
        counts = ", ".join(
            f"{n} {op}" for op, n in moved["detail"]["collectives"].items()
        )
        lines.append(
            f"collectives of the compiled train step: {counts}; none carries "
            f"more of an expert kernel than the device's shard: {moved['ok']}"
        )
    failed = sorted(name for name, r in results.items() if not r["ok"])
    lines.append("failed checks: " + (", ".join(failed) if failed else "none"))
    return lines


def main(directory):
    os.makedirs(directory, exist_ok=True)
    if not os.path.exists(os.path.join(directory, "single.keras")):
        save_single_device_model(directory)
    checks = Checks()
    try:
        check_expert_parallel(directory, checks)
    except Exception:
        checks.record("completed", False, traceback.format_exc())
    else:
        checks.record("completed", True, "")
    with open(os.path.join(directory, "multi.json"), "w") as f:
        json.dump(checks.results, f, indent=1, default=str)
    print("\n".join(summary(checks.results)))


if __name__ == "__main__":
    main(sys.argv[1])
