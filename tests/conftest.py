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


@pytest.fixture
def seed_compat_dir():
    if not (SEED_COMPAT / "layer_vectors.npz").exists():
        pytest.skip(f"../shared/seed-compat is absent (looked in {SEED_COMPAT})")
    return SEED_COMPAT


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
