import json
import os
import pathlib
import subprocess
import sys

import pytest

import keras_moe_cli as _backend_select


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


def _run_in_clean_process(tmp_path, extra_env, code):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("KERAS_BACKEND", "KERAS_HOME")
    }
    env.update(KERAS_HOME=str(tmp_path), HOME=str(tmp_path), **extra_env)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def _command_backend(tmp_path, extra_env):
    """The backend Keras runs on after the `keras-moe` command's choice."""
    code = (
        "import keras_moe_cli; keras_moe_cli.select(); import keras; "
        "print(keras.backend.backend())"
    )
    return _run_in_clean_process(tmp_path, extra_env, code)


def test_the_command_picks_jax_when_nothing_names_a_backend(tmp_path):
    assert _backend_select.installed_backends()[0] == "jax"
    assert _command_backend(tmp_path, {}) == "jax"
    # The choice is recorded in the new config file, so the next run agrees.
    assert json.loads((tmp_path / "keras.json").read_text())["backend"] == "jax"
    assert _command_backend(tmp_path, {}) == "jax"


def test_the_command_keeps_the_configured_backend(tmp_path):
    _config(tmp_path, backend="torch")
    assert _command_backend(tmp_path, {}) == "torch"
    assert _command_backend(tmp_path, {"KERAS_BACKEND": "jax"}) == "jax"


def test_importing_the_library_sets_and_writes_nothing(tmp_path):
    # `import keras_moe` leaves the choice to Keras: no environment variable,
    # and no file besides the config that `import keras` writes itself.
    code = (
        "import os; before = dict(os.environ); import {}; "
        "changed = sorted(k for k in os.environ if os.environ[k] != before.get(k)); "
        "print(changed)"
    )
    library, keras_alone = tmp_path / "library", tmp_path / "keras"
    library.mkdir()
    keras_alone.mkdir()
    assert _run_in_clean_process(library, {}, code.format("keras_moe")) == "[]"
    assert _run_in_clean_process(keras_alone, {}, code.format("keras")) == "[]"

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(library) == files(keras_alone)
    config = pathlib.Path("keras.json")
    if (keras_alone / config).exists():
        assert (library / config).read_text() == (keras_alone / config).read_text()
