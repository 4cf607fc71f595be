import os
import pathlib

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
