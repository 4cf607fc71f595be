"""Backend-specific fast paths, chosen once from `keras.backend.backend()`.

Each backend has one module (`jax_backend`, `torch_backend`,
`tensorflow_backend`) with one small function per need that `keras.ops`
lacks. Layers call `keras_moe.backend.<function>` and never test the backend
themselves. A function a backend does not provide raises `NotImplementedError`
that names the backend.
"""

import importlib

import keras

BACKEND = keras.backend.backend()
_MODULES = {
    "jax": "keras_moe.backend.jax_backend",
    "torch": "keras_moe.backend.torch_backend",
    "tensorflow": "keras_moe.backend.tensorflow_backend",
}
if BACKEND not in _MODULES:
    raise ImportError(
        "keras-moe supports the Keras backends 'jax', 'torch' and 'tensorflow'. "
        f"Received: KERAS_BACKEND={BACKEND!r}"
    )
_impl = importlib.import_module(_MODULES[BACKEND])

# Looked up once at import, not at each call: `torch.compile` cannot trace a
# lookup's `try`/`except`.
_FAST_PATHS = {
    name: getattr(_impl, name, None)
    for name in (
        "gather_rows",
        "grouped_matmul",
        "grouped_matmul_available",
        "grouped_matmul_preferred",
        "soft_mixture",
    )
}


def fast_path(name):
    """The backend's function `name` where it has one, else None (the
    generic `keras.ops` path applies)."""
    return _FAST_PATHS[name]


def grouped_matmul_available():
    """Whether the backend's `grouped_matmul` can run now: PyTorch's (not
    under `torch.compile`) and JAX's (on any device: XLA emulates it densely
    on a CPU); TensorFlow has none. `layout="grouped"` needs it."""
    if _FAST_PATHS["grouped_matmul"] is None:
        return False
    available = _FAST_PATHS["grouped_matmul_available"]
    return available is None or bool(available())


def grouped_matmul_preferred():
    """Whether `layout="auto"` takes the backend's `grouped_matmul`: where it
    can run and is fast (PyTorch; JAX on a GPU outside a
    `keras.distribution`)."""
    if not grouped_matmul_available():
        return False
    preferred = _FAST_PATHS["grouped_matmul_preferred"]
    return preferred is None or bool(preferred())


def __getattr__(name):
    if name.startswith("__"):
        # Python's own protocols (doctest, inspect, pickle) probe for these.
        raise AttributeError(name)
    try:
        return getattr(_impl, name)
    except AttributeError:
        raise NotImplementedError(
            f"`keras_moe.backend.{name}` is not available on the {BACKEND!r} backend."
        ) from None
