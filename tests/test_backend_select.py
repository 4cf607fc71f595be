import json
import os
import subprocess
import sys

import pytest

from keras_moe import _backend_select


def _config(tmp_path, **config):
    (tmp_path / "keras.json").write_text(json.dumps(config))
    return {"KERAS_HOME": str(tmp_path)}


@pytest.mark.parametrize(
    "environ, config, installed, expected",
    [
        ({}, None, ["jax", "torch", "tensorflow"], "jax"),
        ({}, None, ["torch", "tensorflow"], "torch"),
        ({}, None, ["tensorflow"], "tensorflow"),
        ({}, None, [], None),
        ({"KERAS_BACKEND": "tensorflow"}, None, ["jax"], None),
        ({}, {"backend": "torch"}, ["jax", "torch"], None),
        ({}, {"floatx": "float32"}, ["jax", "torch"], "jax"),
        ({}, {"backend": "tensorflow"}, ["jax", "torch"], "jax"),
        ({}, {"backend": "numpy"}, ["jax", "torch"], None),
    ],
)
def test_choose_backend(tmp_path, environ, config, installed, expected):
    environ = {"KERAS_HOME": str(tmp_path), **environ}
    if config is not None:
        environ.update(_config(tmp_path, **config))
    assert _backend_select.choose_backend(environ, installed) == expected


def test_unreadable_config_names_nothing(tmp_path):
    (tmp_path / "keras.json").write_text("{not json")
    assert _backend_select.configured_backend({"KERAS_HOME": str(tmp_path)}) is None


def _backend_in_clean_process(tmp_path, extra_env):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KERAS_BACKEND", "KERAS_HOME")
    }
    env.update(KERAS_HOME=str(tmp_path), HOME=str(tmp_path), **extra_env)
    code = "import keras_moe, keras; print(keras.backend.backend())"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def test_import_picks_jax_when_nothing_names_a_backend(tmp_path):
    assert _backend_select.installed_backends()[0] == "jax"
    assert _backend_in_clean_process(tmp_path, {}) == "jax"
    # The choice is recorded in the new config file, so the next run agrees.
    assert json.loads((tmp_path / "keras.json").read_text())["backend"] == "jax"
    assert _backend_in_clean_process(tmp_path, {}) == "jax"


def test_import_keeps_the_configured_backend(tmp_path):
    _config(tmp_path, backend="torch")
    assert _backend_in_clean_process(tmp_path, {}) == "torch"
    assert _backend_in_clean_process(tmp_path, {"KERAS_BACKEND": "jax"}) == "jax"
