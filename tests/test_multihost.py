"""Multi-host expert parallelism: several JAX processes, one mesh.

`test_two_processes_match_one_device` runs `examples/expert_parallel.py
--processes 2`: two local JAX processes with 4 simulated CPU devices each
(gloo collectives, a coordinator on 127.0.0.1 and a free port), a mesh
(batch=2, expert=4) over the 8 devices, each process feeding its rows
(`keras_moe.distribution.process_local_data`), and the launching process's
one-device run of the same model and data. The run is JAX's; it happens once
per suite run, in the suite's JAX run: on the other backends the test checks
the `NotImplementedError` that keras-moe's distribution helpers raise there.

`process_local_data` is checked here too, on distributions that report the
process count and index `keras.distribution.initialize` would give them.
"""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_moe
from keras_moe.distribution import process_local_data
from tests.conftest import BACKEND
from tests.conftest import REPO
from tests.test_distribution import jax_only
from tests.test_distribution import one_device_mesh

EXAMPLE = REPO / "examples" / "expert_parallel.py"
# The launcher kills its processes after RUN_TIMEOUT seconds; the test kills
# the launcher's whole process group a little later if it hangs itself.
RUN_TIMEOUT = 300
TOLERANCE = 2e-5
EXPERT_SHARDS = 4


def run_example(out):
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        # Compiling is most of this run's CPU time. LLVM at -O0 and XLA:CPU's
        # older loop emitters instead of its fusion emitters cut it by about
        # two thirds (measured: 62 s -> 22 s of CPU for this model's 8-device
        # and one-device programs). Every program of the run, the one-device
        # reference's too, is compiled so.
        "XLA_FLAGS": (
            "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
        ),
    }
    command = [
        sys.executable,
        str(EXAMPLE),
        "--processes=2",
        "--steps=4",
        f"--timeout={RUN_TIMEOUT}",
        f"--out={out}",
    ]
    # Its own process group: on a timeout the launcher and its workers go.
    launcher = subprocess.Popen(
        command,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = launcher.communicate(timeout=RUN_TIMEOUT + 60)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        output, _ = launcher.communicate()
        pytest.fail(f"the 2-process run timed out:\n{output[-4000:]}")
    return launcher.returncode, output


def check_split(rows, ways):
    """Each row's local shards are `1 / ways` of it along its expert axis."""
    assert rows
    for row in rows:
        expected = list(row["shape"])
        expected[row["axis"]] //= ways
        assert row["shape"][row["axis"]] == ways * expected[row["axis"]], row
        assert row["local_shards"] == [expected], row


def test_two_processes_match_one_device(tmp_path):
    if BACKEND != "jax":
        # The suite's JAX run covers the run; here, the clear error.
        mesh = one_device_mesh()
        with pytest.raises(NotImplementedError, match=r"KERAS_BACKEND=jax"):
            keras_moe.expert_parallel_layout_map(mesh)
        distribution = keras.distribution.ModelParallel(
            layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"
        )
        with pytest.raises(NotImplementedError, match=r"KERAS_BACKEND=jax"):
            process_local_data(np.zeros((4, 2)), 2, distribution=distribution)
        return

    code, output = run_example(tmp_path)
    report_path = tmp_path / "report.json"
    assert report_path.exists(), f"no report (rc={code}):\n{output[-6000:]}"
    report = json.loads(report_path.read_text())
    processes = report["processes"]

    # Two processes of 4 devices, one mesh (2, 4) over the 8.
    assert [p["process_id"] for p in processes] == [0, 1]
    for p in processes:
        assert len(p["local_devices"]) == 4 and p["global_devices"] == 8, p
        assert p["mesh"] == [2, EXPERT_SHARDS]
        # Half of each global batch of 16, half of the 64 rows.
        assert p["local_batch"] == 8 and p["local_rows"] == 32, p

    # Training and predictions as on one device.
    reference = report["reference_losses"]
    assert len(reference) == 2
    for p in processes:
        np.testing.assert_allclose(p["losses"], reference, rtol=0, atol=TOLERANCE)
    expected = np.load(tmp_path / "reference-predictions.npy")
    assert expected.shape == (64, 1)
    for i in range(2):
        predictions = np.load(tmp_path / f"process-{i}-predictions.npy")
        np.testing.assert_allclose(predictions, expected, rtol=0, atol=TOLERANCE)

    # Each device holds a quarter of every expert weight of both layers.
    for p in processes:
        paths = {row["path"] for row in p["expert_weights"]}
        assert {
            "moe_ffn/experts/up_kernel",
            "moe_ffn/experts/gate_kernel",
            "moe_ffn/experts/down_kernel",
            "dense_moe/expert_kernel",
        } <= paths
        check_split(p["expert_weights"], EXPERT_SHARDS)

    # The checkpoint process 0 wrote loads in the launching process, on one
    # device and on a (1, 8) mesh, with the outputs of the trained model.
    assert report["one_device_load_diff"] < TOLERANCE
    assert report["mesh_load_shape"] == [1, 8]
    assert report["mesh_load_diff"] < TOLERANCE
    check_split(report["mesh_load_shards"], 8)
    assert code == 0, output[-6000:]
    assert "largest difference" in output


# `process_local_data` ------------------------------------------------------


def emulated(process_id, processes=2, mesh_shape=(2, 4), auto_shard_dataset=False):
    """A `ModelParallel` as process `process_id` of `processes` would see it
    after `keras.distribution.initialize` (the helper reads only the
    distribution's process count, index and mesh shape)."""
    devices = ["cpu:0"] * int(np.prod(mesh_shape))
    mesh = keras.distribution.DeviceMesh(mesh_shape, ["batch", "expert"], devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh),
        batch_dim_name="batch",
        auto_shard_dataset=auto_shard_dataset,
    )
    distribution._num_processes = processes
    distribution._process_id = process_id
    distribution._is_multi_process = processes > 1
    return distribution


@jax_only
def test_each_process_gets_its_rows_of_every_global_batch():
    x = np.arange(44 * 3).reshape(44, 3)  # 5 batches of 8 and one of 4
    y = np.arange(44)
    parts = [process_local_data((x, y), 8, emulated(p)) for p in range(2)]
    for (local_x, local_y), local_batch in parts:
        assert local_batch == 4
        assert len(local_x) == len(local_y) == 22
        np.testing.assert_array_equal(local_x[:, 0] // 3, local_y)
    # Global batch i = process 0's local batch i, then process 1's.
    (x0, _), _ = parts[0]
    (x1, _), _ = parts[1]
    for i in range(5):
        batch = np.concatenate([x0[4 * i : 4 * i + 4], x1[4 * i : 4 * i + 4]])
        np.testing.assert_array_equal(batch, x[8 * i : 8 * i + 8])
    np.testing.assert_array_equal(np.concatenate([x0[20:], x1[20:]]), x[40:])


@jax_only
def test_structure_is_kept():
    data = {"tokens": np.zeros((16, 2)), "mask": np.ones((16,), bool)}
    local, local_batch = process_local_data(data, 8, emulated(1))
    assert set(local) == {"tokens", "mask"} and local_batch == 4
    assert local["tokens"].shape == (8, 2) and local["mask"].shape == (8,)


@jax_only
@pytest.mark.parametrize(
    "processes, mesh_shape",
    [
        (2, (2, 4)),  # a data-parallel group per process
        (2, (4, 2)),  # two groups per process
        (4, (2, 4)),  # a group spans two processes: both feed its rows
        (2, (1, 8)),  # no data parallelism: every process feeds the batch
    ],
)
def test_same_rows_as_keras_auto_sharded_tf_data(processes, mesh_shape):
    """Per-process arrays and a global `tf.data.Dataset` that Keras shards
    (`Distribution.distribute_dataset`) feed each process the same rows."""
    import tensorflow as tf

    x = np.arange(48)
    for p in range(processes):
        dataset = tf.data.Dataset.from_tensor_slices(x).batch(8)
        sharded = emulated(p, processes, mesh_shape, auto_shard_dataset=True)
        batches = [b.numpy() for b in sharded.distribute_dataset(dataset)]
        local, local_batch = process_local_data(
            x, 8, emulated(p, processes, mesh_shape)
        )
        assert {len(b) for b in batches} == {local_batch}
        np.testing.assert_array_equal(np.concatenate(batches), local)


def test_without_distribution_the_arrays_come_back_whole():
    x = np.zeros((10, 2))
    local, local_batch = process_local_data((x,), 4)
    assert local[0] is x and local_batch == 4


@jax_only
def test_one_process_or_no_data_parallelism_keeps_the_arrays():
    x = np.zeros((10, 2))
    for distribution in (emulated(0, processes=1), emulated(1, mesh_shape=(1, 8))):
        local, local_batch = process_local_data(x, 4, distribution)
        assert local is x and local_batch == 4


@jax_only
def test_auto_sharding_of_numpy_arrays_is_an_error():
    distribution = emulated(0, auto_shard_dataset=True)
    with pytest.raises(
        ValueError,
        match=r"`auto_shard_dataset=False`.*Received: auto_shard_dataset=True",
    ):
        process_local_data(np.zeros((16, 2)), 8, distribution)


def _generator():
    yield np.zeros((2, 2))


@pytest.mark.parametrize(
    "data, batch_size, distribution, exception, message",
    [
        (np.zeros((8, 2)), 0, None, ValueError, r"`batch_size` must be an integer"),
        (np.zeros((8, 2)), "8", None, TypeError, r"`batch_size` must be an integer"),
        (_generator(), 4, None, TypeError, r"`data` must be NumPy arrays.*generator"),
        (np.float32(1), 4, None, TypeError, r"`data` must be NumPy arrays"),
        ((), 4, None, ValueError, r"`data` must hold at least one array"),
        (
            (np.zeros((8, 2)), np.zeros((6,))),
            4,
            None,
            ValueError,
            r"the same number of rows.*\[\(8, 2\), \(6,\)\]",
        ),
        (np.zeros((8, 2)), 4, "mesh", TypeError, r"`distribution` must be"),
    ],
)
def test_bad_arguments(data, batch_size, distribution, exception, message):
    with pytest.raises(exception, match=message):
        process_local_data(data, batch_size, distribution)


@jax_only
@pytest.mark.parametrize(
    "rows, batch_size, mesh_shape, message",
    [
        (24, 6, (4, 2), r"batch_size=6, rows=24 \(last batch 0 rows\), batch axis=4"),
        (27, 8, (2, 4), r"rows=27 \(last batch 3 rows\), batch axis=2, shards=2"),
        (30, 8, (4, 2), r"rows=30 \(last batch 6 rows\), batch axis=4, shards=2"),
    ],
)
def test_batches_that_do_not_split_evenly(rows, batch_size, mesh_shape, message):
    with pytest.raises(ValueError, match=r"must split evenly.*" + message):
        process_local_data(
            np.zeros((rows, 2)), batch_size, emulated(0, mesh_shape=mesh_shape)
        )
