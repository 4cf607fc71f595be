"""Data + expert parallelism with Keras's distribution API, on simulated devices.

Run: `python examples/expert_parallel.py` (it sets `KERAS_BACKEND=jax` and
simulates 8 CPU devices; on a machine with 8 accelerators drop `XLA_FLAGS`).
Options: `--devices N` (default 8), `--expert-shards E` (default 4: a mesh of
N/E data-parallel groups x E expert shards), `--steps S`.

It trains a small token model whose `MoEFeedForward` experts are split over
the mesh's "expert" axis while the batch is split over its "batch" axis, shows
which part of each expert weight every device holds, and checks that the
sharded model computes what the same weights compute on one device.
"""

import argparse
import os
import sys


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--expert-shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.expert_shards < 1:
        parser.error("--devices and --expert-shards must be positive")
    if args.devices % args.expert_shards:
        parser.error(
            "--expert-shards must divide --devices. Received: "
            f"devices={args.devices}, expert_shards={args.expert_shards}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    # Before JAX is imported: the backend and the simulated CPU devices.
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={args.devices}"
    )
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
    for v in model.weights:
        if "expert" in v.name:
            shard = v.value.addressable_shards[0].data.shape
            print(f"  {v.path:32s} {tuple(v.shape)} -> per device {shard}")

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
    return diff


if __name__ == "__main__":
    sys.exit(0 if main() < 1e-4 else 1)
