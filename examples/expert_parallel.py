"""Data + expert parallelism with Keras's distribution API, on simulated devices.

Run: `python examples/expert_parallel.py` (it sets `KERAS_BACKEND=jax` and
simulates 8 CPU devices; on a machine with 8 accelerators drop `XLA_FLAGS`).
Options: `--devices N` (default 8), `--expert-shards E` (default 4: a mesh of
N/E data-parallel groups x E expert shards), `--steps S`.

It trains a small token model whose `MoEFeedForward` experts are split over
the mesh's "expert" axis while the batch is split over its "batch" axis, shows
which part of each expert weight every device holds, and checks that the
sharded model computes what the same weights compute on one device.

Several processes (the multi-host layout, on one machine):
`python examples/expert_parallel.py --processes 2` starts 2 local processes
with N/2 simulated devices each (a coordinator on 127.0.0.1 and a free port),
as one process per host would run. Each calls `keras.distribution.initialize`,
builds the mesh over all N devices (the expert axis inside a process, the
batch axis across processes), feeds its rows of every global batch
(`keras_moe.distribution.process_local_data`; `--data tf.data` instead feeds
a global `tf.data.Dataset` that Keras shards) and trains a model with an
`MoEFeedForward` and a sparse `DenseMoE`; process 0 writes the `.keras`
checkpoint. This (launching) process trains the same model on one device,
prints each process's losses next to that run's, and loads the checkpoint on
one device and on a (1, E) mesh. Exit status 0 when every comparison holds to
float32 rounding. On real hosts, each host runs the worker part:
`python examples/expert_parallel.py --processes P --process-id I
--coordinator HOST0:PORT --devices ALL_DEVICES --out DIR`.
See docs/multi-host.md.
"""

import argparse
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

N_EXPERTS = 8
SEQ_LEN, WIDTH = 8, 16
LOCAL_BATCH = 8  # rows per data-parallel group and step
EPOCHS = 2
TOLERANCE = 2e-5


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--expert-shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--processes", type=int, help="run as this many processes (one per host)"
    )
    parser.add_argument(
        "--process-id", type=int, help="this process's index (a worker's argument)"
    )
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (worker)")
    parser.add_argument(
        "--data",
        choices=["arrays", "tf.data"],
        default="arrays",
        help="how each process feeds its rows: its part of the NumPy arrays "
        "(keras_moe.distribution.process_local_data), or a global "
        "tf.data.Dataset that Keras shards",
    )
    parser.add_argument("--out", help="folder for the reports and the checkpoint")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds the processes may run"
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.expert_shards < 1 or args.steps < 1:
        parser.error("--devices, --expert-shards and --steps must be positive")
    if args.devices % args.expert_shards:
        parser.error(
            "--expert-shards must divide --devices. Received: "
            f"devices={args.devices}, expert_shards={args.expert_shards}"
        )
    if args.processes is None:
        if args.process_id is not None or args.coordinator is not None:
            parser.error("--process-id and --coordinator need --processes")
        return args
    if args.processes < 1 or args.devices % args.processes:
        parser.error(
            "--processes must be positive and divide --devices. Received: "
            f"processes={args.processes}, devices={args.devices}"
        )
    local = args.devices // args.processes
    # Expert axis inside a process: every process then holds all the experts
    # (its devices hold one shard each), so process 0 alone can write the
    # checkpoint, and the experts' traffic stays on the fast in-host links.
    if local % args.expert_shards or N_EXPERTS % args.expert_shards:
        parser.error(
            "--expert-shards must divide the devices of one process "
            f"(--devices / --processes = {local}) and n_experts={N_EXPERTS}. "
            f"Received: expert_shards={args.expert_shards}"
        )
    if args.process_id is not None:
        if not 0 <= args.process_id < args.processes or args.coordinator is None:
            parser.error(
                "a worker needs --coordinator and 0 <= --process-id < --processes. "
                f"Received: process_id={args.process_id}, "
                f"coordinator={args.coordinator!r}"
            )
        if args.out is None:
            parser.error("a worker needs --out")
    return args


def use_jax_with_devices(n):
    """Before JAX is imported: the backend and `n` simulated CPU devices."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    )


# One process, simulated devices ---------------------------------------------


def run_simulated(args):
    use_jax_with_devices(args.devices)
    import keras
    import numpy as np

    import keras_moe

    n_experts, seq_len, d = 8, 16, 32
    batch_groups = args.devices // args.expert_shards
    if n_experts % args.expert_shards:
        raise SystemExit(f"--expert-shards must divide n_experts={n_experts}")

    mesh = keras.distribution.DeviceMesh(
        (batch_groups, args.expert_shards), ["batch", "expert"]
    )
    layout_map = keras_moe.expert_parallel_layout_map(mesh, expert_axis="expert")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )

    def build():
        inputs = keras.Input((seq_len, d))
        h = keras_moe.MoEFeedForward(
            64, n_experts, top_k=2, gated=True, capacity_factor=2.0, name="moe_ffn"
        )(inputs)
        h = keras.layers.GlobalAveragePooling1D()(h)
        outputs = keras.layers.Dense(1, name="head")(h)
        return keras.Model(inputs, outputs)

    rng = np.random.default_rng(0)
    batch = 8 * batch_groups
    x = rng.normal(size=(batch * args.steps, seq_len, d)).astype("float32")
    y = np.tanh(x.mean(axis=(1, 2)) * 4.0)[:, None].astype("float32")

    keras.utils.set_random_seed(0)
    with distribution.scope():
        model = build()
        model.compile(keras.optimizers.Adam(1e-3), "mse")
    print(f"mesh: {mesh.shape} {mesh.axis_names} over {len(mesh.devices.flat)} devices")
    for row in expert_weight_shards(model):
        shard = tuple(row["local_shards"][0])
        print(f"  {row['path']:32s} {tuple(row['shape'])} -> per device {shard}")

    # One device, same weights, before training: same outputs.
    single = build()
    single.set_weights(model.get_weights())
    with distribution.scope():
        sharded_out = model.predict(x[:batch], batch_size=batch, verbose=0)
    diff = np.max(np.abs(sharded_out - single.predict(x[:batch], verbose=0)))
    print(f"max |sharded - one device| before training: {diff:.2e}")

    with distribution.scope():
        history = model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
        loss = model.evaluate(x, y, batch_size=batch, verbose=0)
    print(f"loss per epoch: {[round(v, 4) for v in history.history['loss']]}")
    print(f"evaluate: {loss:.4f}")
    return 0 if diff < 1e-4 else 1


# Several processes: the model, the data, one worker -------------------------


def build_model():
    """Token model: a dropless `MoEFeedForward` and a sparse `DenseMoE`.

    Dropless routing keeps the sharded run equal to the one-device run: under
    a distribution each batch shard routes its own tokens, so a capacity that
    overflows in one shard and not globally would drop other tokens.
    """
    import keras

    import keras_moe

    inputs = keras.Input((SEQ_LEN, WIDTH))
    h = keras_moe.MoEFeedForward(32, N_EXPERTS, top_k=2, gated=True, name="moe_ffn")(
        inputs
    )
    h = keras_moe.DenseMoE(16, N_EXPERTS, top_k=2, name="dense_moe")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    return model


def make_data(rows):
    """The global arrays: every process makes (or reads) the same ones."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, SEQ_LEN, WIDTH)).astype("float32")
    y = np.tanh(x.mean(axis=(1, 2)) * 4.0)[:, None].astype("float32")
    return x, y


def global_batch(args):
    return LOCAL_BATCH * (args.devices // args.expert_shards)


def expert_weight_shards(model):
    """Each expert weight's shape, declared expert axis and the shapes of
    this process's shards of it (one per local device).

    The layers that declare expert weights (`expert_weight_axes()`) may be
    sublayers: `MoEFeedForward`'s experts are its `FeedForwardExperts` bank.
    """
    from keras_moe.callbacks import layer_paths

    rows = []
    for layer in layer_paths(model).values():
        declare = getattr(layer, "expert_weight_axes", None)
        if declare is None:
            continue
        axes = declare()
        for v in layer.weights:
            # The layer's own weights (a `DenseMoE`'s router has its own).
            if v.name in axes and v.path == f"{layer.path}/{v.name}":
                local = {tuple(s.data.shape) for s in v.value.addressable_shards}
                local = [list(shape) for shape in local]
                rows.append(
                    {
                        "path": v.path,
                        "shape": list(v.shape),
                        "axis": axes[v.name],
                        "local_shards": sorted(local),
                    }
                )
    return rows


def run_worker(args):
    """What each process (host) runs."""
    use_jax_with_devices(args.devices // args.processes)
    import jax

    # CPU collectives between processes: JAX 0.10's default, set for older
    # versions that did not default to it (GPUs and TPUs use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras
    import numpy as np

    import keras_moe
    from keras_moe.distribution import process_local_data

    keras.utils.set_random_seed(0)  # the same initial weights in every process
    keras.distribution.initialize(args.coordinator, args.processes, args.process_id)
    out = pathlib.Path(args.out)

    # All devices of all processes, one row of `expert_shards` devices per
    # data-parallel group: `list_devices()` orders them by process, so the
    # expert axis stays inside a process and the batch axis crosses processes.
    mesh = keras.distribution.DeviceMesh(
        (args.devices // args.expert_shards, args.expert_shards), ["batch", "expert"]
    )
    # `predict` fetches each batch's outputs to NumPy in every process: an
    # output left split over the processes could not be fetched, so the
    # model's output is laid out whole on every device.
    outputs = keras.distribution.LayoutMap(mesh)
    outputs[".*head/output"] = (None, None)
    arrays = args.data == "arrays"
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(
            mesh, expert_axis="expert", layout_map=outputs
        ),
        batch_dim_name="batch",
        # Per-process arrays are this process's rows already; a global
        # tf.data.Dataset is split by Keras (rebatch + shard).
        auto_shard_dataset=not arrays,
    )
    batch = global_batch(args)
    x, y = make_data(batch * args.steps)
    if arrays:
        (x, y), local_batch = process_local_data(
            (x, y), batch_size=batch, distribution=distribution
        )
        train = {"x": x, "y": y, "batch_size": local_batch, "shuffle": False}
        test = {"x": x, "batch_size": local_batch}
    else:
        import tensorflow as tf

        local_batch = batch // args.processes  # Keras's split of each batch
        # Whole batches only: Keras splits each batch over the processes.
        train = {
            "x": tf.data.Dataset.from_tensor_slices((x, y)).batch(
                batch, drop_remainder=True
            )
        }
        test = {
            "x": tf.data.Dataset.from_tensor_slices(x).batch(batch, drop_remainder=True)
        }
    with distribution.scope():
        model = build_model()
        history = model.fit(**train, epochs=EPOCHS, verbose=0)
        # The global batches' outputs, in every process.
        predictions = model.predict(**test, verbose=0)

    np.save(out / f"process-{args.process_id}-predictions.npy", predictions)
    report = {
        "process_id": args.process_id,
        "local_devices": [str(d) for d in jax.local_devices()],
        "global_devices": len(jax.devices()),
        "mesh": list(mesh.shape),
        "data": args.data,
        "local_batch": local_batch,
        "local_rows": len(x) if arrays else None,
        "losses": [float(v) for v in history.history["loss"]],
        "expert_weights": expert_weight_shards(model),
    }
    # Every process holds every weight whole (the expert axis is inside a
    # process), so one process writes the checkpoint.
    if args.process_id == 0:
        model.save(out / "model.keras")
    (out / f"process-{args.process_id}.json").write_text(json.dumps(report))
    return 0


# The launcher: local processes, the one-device run, the checkpoint ----------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(args, out):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    workers = []
    for i in range(args.processes):
        command = [
            sys.executable,
            os.path.abspath(__file__),
            f"--processes={args.processes}",
            f"--process-id={i}",
            f"--coordinator={coordinator}",
            f"--devices={args.devices}",
            f"--expert-shards={args.expert_shards}",
            f"--steps={args.steps}",
            f"--data={args.data}",
            f"--out={out}",
        ]
        log = open(out / f"process-{i}.log", "w")
        workers.append(
            (subprocess.Popen(command, env=env, stdout=log, stderr=log), log)
        )
    return coordinator, workers


def wait_for(workers, deadline):
    """The processes' exit codes. When one fails, or at `deadline`, the
    others are killed (-9): a process whose peer is gone would wait for it."""
    codes = [None] * len(workers)
    try:
        while None in codes:
            codes = [process.poll() for process, _ in workers]
            if any(codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for i, (process, log) in enumerate(workers):
            if codes[i] is None:
                process.kill()
                codes[i] = process.wait()
            log.close()
    return codes


def max_diff(a, b):
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")


def split_evenly(rows, ways):
    """Whether every expert weight's shards are `1 / ways` of it on its
    expert axis, the other axes whole."""
    for row in rows:
        shape = list(row["shape"])
        shape[row["axis"]] //= ways
        if row["local_shards"] != [shape]:
            return False
    return bool(rows)


def one_device_run(args):
    """The same model and data on one device: losses and predictions."""
    batch = global_batch(args)
    x, y = make_data(batch * args.steps)
    import keras

    keras.utils.set_random_seed(0)
    model = build_model()
    history = model.fit(x, y, batch_size=batch, epochs=EPOCHS, shuffle=False, verbose=0)
    losses = [float(v) for v in history.history["loss"]]
    return x, losses, model.predict(x, batch_size=batch, verbose=0)


def load_checkpoint(path, x, batch, trained, devices):
    """`path` (written by process 0) on one device and on a (1, E) mesh."""
    import keras

    import keras_moe

    single = keras.saving.load_model(path)
    one_device = max_diff(single.predict(x, batch_size=batch, verbose=0), trained)
    shards = math.gcd(N_EXPERTS, devices)
    mesh = keras.distribution.DeviceMesh(
        (1, shards),
        ["batch", "expert"],
        devices=keras.distribution.list_devices()[:shards],
    )
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(mesh),
        batch_dim_name="batch",
    )
    with distribution.scope():
        sharded = keras.saving.load_model(path)
        on_mesh = max_diff(sharded.predict(x, batch_size=batch, verbose=0), trained)
    return {
        "one_device_load_diff": one_device,
        "mesh_load_shape": list(mesh.shape),
        "mesh_load_diff": on_mesh,
        "mesh_load_shards": expert_weight_shards(sharded),
    }


def launch(args):
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="expert_parallel_"))
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.timeout
    coordinator, workers = start_workers(args, out)
    # Meanwhile, here: the same model on one device. This process has
    # `devices` simulated devices for the (1, E) mesh of the checkpoint.
    use_jax_with_devices(args.devices)
    import numpy as np

    try:
        x, reference_losses, reference_predictions = one_device_run(args)
    except BaseException:
        wait_for(workers, deadline=0)
        raise
    codes = wait_for(workers, deadline)
    if any(codes):
        for i, code in enumerate(codes):
            tail = (out / f"process-{i}.log").read_text()[-3000:]
            print(f"process {i} exited with {code}; the end of its log:\n{tail}")
        return 1
    reports = [
        json.loads((out / f"process-{i}.json").read_text())
        for i in range(args.processes)
    ]
    predictions = [
        np.load(out / f"process-{i}-predictions.npy") for i in range(args.processes)
    ]
    batch = global_batch(args)
    results = {
        "reference_losses": reference_losses,
        "processes": reports,
        "loss_diff": max(
            abs(a - b)
            for r in reports
            for a, b in zip(r["losses"], reference_losses, strict=True)
        ),
        "prediction_diff": [max_diff(p, reference_predictions) for p in predictions],
        **load_checkpoint(out / "model.keras", x, batch, predictions[0], args.devices),
    }
    np.save(out / "reference-predictions.npy", reference_predictions)
    (out / "report.json").write_text(json.dumps(results, indent=1))

    mesh = tuple(reports[0]["mesh"])
    print(
        f"{args.processes} processes x {args.devices // args.processes} devices, "
        f"mesh {mesh} ('batch', 'expert'), coordinator {coordinator}, "
        f"data: {args.data}; global batch {batch} = "
        f"{reports[0]['local_batch']} rows from each process"
    )
    print("expert weights: shape -> each local device's shard (process 0)")
    for row in reports[0]["expert_weights"]:
        print(f"  {row['path']:30s} {tuple(row['shape'])} -> {row['local_shards'][0]}")
    print(
        "epoch  one device  " + "  ".join(f"process {r['process_id']}" for r in reports)
    )
    for epoch in range(EPOCHS):
        cells = "  ".join(f"{r['losses'][epoch]:9.6f}" for r in reports)
        print(f"{epoch + 1:5d}  {reference_losses[epoch]:10.6f}  {cells}")
    for r, p, diff in zip(reports, predictions, results["prediction_diff"]):
        print(
            f"process {r['process_id']}: predictions {p.shape}, "
            f"max |process - one device| {diff:.2e}"
        )
    print(f"checkpoint written once, by process 0: {out / 'model.keras'}")
    print(
        "  loaded on one device: max |loaded - trained| "
        f"{results['one_device_load_diff']:.2e}"
    )
    ways = results["mesh_load_shape"][1]
    split = split_evenly(results["mesh_load_shards"], ways)
    print(
        f"  loaded on mesh {tuple(results['mesh_load_shape'])}: max |loaded - "
        f"trained| {results['mesh_load_diff']:.2e}, each device holds "
        f"1/{ways} of every expert weight: {split}"
    )
    worst = max(
        results["loss_diff"],
        *results["prediction_diff"],
        results["one_device_load_diff"],
        results["mesh_load_diff"],
    )
    split = split and all(
        split_evenly(r["expert_weights"], args.expert_shards) for r in reports
    )
    print(f"largest difference {worst:.2e} (tolerance {TOLERANCE:g})")
    return 0 if worst < TOLERANCE and split else 1


def main(argv=None):
    args = parse_args(argv)
    if args.processes is None:
        return run_simulated(args)
    if args.process_id is None:
        return launch(args)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
