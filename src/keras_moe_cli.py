"""The `keras-moe` command's entry point: picks a Keras backend, then runs
`keras_moe.cli.main`.

It lives outside the `keras_moe` package because the choice must come before
anything imports Keras, and importing `keras_moe` imports Keras (and picks
nothing: a program that uses the library names its backend as Keras asks,
`KERAS_BACKEND` or `~/.keras/keras.json`). The command picks one for its
user when nothing names a usable one:

Keras falls back to TensorFlow when neither `KERAS_BACKEND` nor its config
file (`$KERAS_HOME/keras.json`, else `~/.keras/keras.json`) names a backend,
and then fails where TensorFlow is not installed. Worse, the first
`import keras` writes that fallback into a new config file, so "tensorflow"
is named there from then on. keras-moe runs on every backend, so:

- `KERAS_BACKEND` set: always respected.
- the config names a backend: respected, unless it is one of JAX, PyTorch and
  TensorFlow and not installed (the recorded fallback on a machine without
  TensorFlow).
- otherwise: `KERAS_BACKEND` is set to the first installed of JAX, PyTorch
  and TensorFlow and, where no config file exists yet, one is written naming
  that choice (as Keras would write its own), so later runs agree.

This module must be imported before `keras`; it chooses nothing after.
"""

import importlib.util
import json
import os
import sys

PREFERENCE = ("jax", "torch", "tensorflow")

# The backend this module set, or None when it left the choice to Keras.
SELECTED = None


def keras_config_path(environ):
    """The config file Keras itself reads (see keras/src/backend/config.py)."""
    if "KERAS_HOME" in environ:
        keras_dir = environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        keras_dir = os.path.join(base, ".keras")
    return os.path.expanduser(os.path.join(keras_dir, "keras.json"))


def configured_backend(environ):
    """The backend the Keras config file names, else None."""
    try:
        with open(keras_config_path(environ)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    backend = config.get("backend") if isinstance(config, dict) else None
    return backend or None


def installed_backends():
    return [name for name in PREFERENCE if importlib.util.find_spec(name) is not None]


def choose_backend(environ, installed):
    """The backend to set, or None to leave the choice to Keras."""
    if environ.get("KERAS_BACKEND") or not installed:
        return None
    configured = configured_backend(environ)
    if configured is not None and (
        configured not in PREFERENCE or configured in installed
    ):
        return None
    return installed[0]


def _write_config(path, backend):
    config = {
        "floatx": "float32",
        "epsilon": 1e-07,
        "backend": backend,
        "image_data_format": "channels_last",
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "x") as f:
            f.write(json.dumps(config, indent=4))
    except OSError:
        pass  # Read-only home, or another process wrote it first: fine.


def select(environ=os.environ):
    global SELECTED
    if "keras" in sys.modules:
        return None
    backend = choose_backend(environ, installed_backends())
    if backend is not None:
        environ["KERAS_BACKEND"] = backend
        SELECTED = backend
        path = keras_config_path(environ)
        if not os.path.exists(path):
            _write_config(path, backend)
    return backend


def main(argv=None):
    """The `keras-moe` command (`keras_moe.cli.main`), after `select()`."""
    select()
    from keras_moe.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
