import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("KERAS_MOE_SHARED", REPO.parent / "shared"))
SEED_COMPAT = SHARED / "seed-compat"
CIFAR10_TAR = SHARED / "data" / "cifar10-jpeg.tar.gz"

BACKEND = keras.backend.backend()
# CI must prove everything: what would be a skip here is a failure there.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason):
    """Skips a test whose prerequisite is missing locally; fails it in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI={os.environ['CI']}: a missing prerequisite fails)")
    pytest.skip(reason)


@pytest.fixture
def seed_compat_dir():
    if not (SEED_COMPAT / "layer_vectors.npz").exists():
        skip_or_fail(f"../shared/seed-compat is absent (looked in {SEED_COMPAT})")
    return SEED_COMPAT


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "only_backend(name): runs under that KERAS_BACKEND only; the suite's run "
        "on every other backend does not collect it (deselected, not skipped)",
    )


def pytest_collection_modifyitems(config, items):
    kept, other = [], []
    for item in items:
        marker = item.get_closest_marker("only_backend")
        if marker is None or marker.args[0] == BACKEND:
            kept.append(item)
        else:
            other.append(item)
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = kept


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
    # free_memory=False: the full gc.collect() costs ~0.3 s of CPU per test
    # on torch; Python's own gc thresholds still collect.
    keras.backend.clear_session(free_memory=False)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def reloaded_with_same_outputs(model, path, x, predict=False):
    """Saves `model` to `path`, loads it back, asserts that both give the
    same outputs on `x` (through `predict`, or eager calls: compiling
    `predict` doubles a test's cost on PyTorch, torch.compile) and returns
    the loaded model."""
    model.save(path)
    restored = keras.models.load_model(path)
    if predict:
        got, expected = restored.predict(x, verbose=0), model.predict(x, verbose=0)
    else:
        got, expected = restored(x), model(x)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-5, atol=1e-6)
    return restored


def assert_a_training_step_moves_every_weight(layer, x, y):
    """One SGD step of a model of `layer` on `(x, y)` changes every one of
    its trainable weights: the gradients reach them all."""
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    before = {v.path: to_numpy(v).copy() for v in layer.trainable_weights}
    model.train_on_batch(x, y)
    for v in layer.trainable_weights:
        assert not np.allclose(to_numpy(v), before[v.path]), v.path


def load_docs_hook(name):
    """The documentation build's hook `docs/hooks/<name>.py`, imported."""
    path = REPO / "docs" / "hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_on_eight_devices(worker, argument, timeout, **env):
    """Runs the script `worker` with `argument` in its own process, on JAX
    with eight simulated CPU devices (and any other environment `env`)."""
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        **env,
    }
    return subprocess.run(
        [sys.executable, str(worker), str(argument)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_on_jax(source, out):
    """Runs the Python `source` with the folder `out` as its argument in its
    own process on JAX (this checkout's `src` first), and asserts it ran."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", source, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def worker_report(path, run):
    """The JSON report a worker `run` wrote to `path`."""
    assert path.exists(), (
        f"worker wrote no report (rc={run.returncode}):\n{run.stderr[-4000:]}"
    )
    return json.loads(path.read_text())


def assert_keras_masking_reaches(layer, x):
    """`layer` after `keras.layers.Masking(0.0)` on `x`, whose second sequence
    is zero from step 2 on: those steps' outputs are zero, the first
    sequence's are not."""
    x = np.array(x, "float32")
    x[1, 2:] = 0.0
    inputs = keras.Input(x.shape[1:])
    outputs = layer(keras.layers.Masking(0.0)(inputs))
    y = to_numpy(keras.Model(inputs, outputs)(x))
    assert np.all(y[1, 2:] == 0.0) and np.all(y[0] != 0.0)
