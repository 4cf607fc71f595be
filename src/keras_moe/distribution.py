"""Expert parallelism on Keras's distribution API.

`expert_parallel_layout_map` returns a `keras.distribution.LayoutMap` that
shards every keras-moe expert weight along its expert axis over one axis of a
`keras.distribution.DeviceMesh`. Pass it to
`keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`: Keras
and the JAX compiler (GSPMD) do the rest. There is no keras-moe runtime.

How a weight's expert axis is found: every keras-moe layer declares it in
`expert_weight_axes()` (weight name -> axis) and creates its weights inside
`expert_weights(layer)`, which tells the map, for a variable's path
(`".../layer_name/weight_name"`), that the layer creating it now declared it.
This keys the layout on the layer, not on guessed layer names: a renamed or
nested keras-moe layer is sharded all the same, and a weight called
`up_kernel` in somebody else's layer is left alone. The routing finds the
mesh's expert axis with `expert_axis()`.

Multi-host runs (one JAX process per host, `keras.distribution.initialize`)
use the same map; `process_local_data` gives each process its rows of the
global arrays, batch by batch, so that `fit` on NumPy arrays sees the
one-device run's batches (see `docs/multi-host.md`).
"""

import contextlib

import keras
import numpy as np
from keras.src.distribution.distribution_lib import Distribution

from keras_moe import utils

# Keras 3.15's distribution API per backend (keras/src/backend/*/distribution_lib.py).
_UNSUPPORTED_BACKENDS = {
    "torch": (
        "Keras's PyTorch backend has no distribution implementation "
        "(`keras.distribution.list_devices()` fails, and a `ModelParallel` "
        "built on explicit devices is silently ignored)"
    ),
    "tensorflow": (
        "Keras's TensorFlow distribution backend is a prototype marked "
        "'DO NOT USE' (its `distribute_value` is a no-op, so a `ModelParallel` "
        "layout is silently ignored)"
    ),
}


def check_backend():
    """Raise a clear error unless Keras's distribution API works on this backend."""
    backend = keras.backend.backend()
    if backend != "jax":
        reason = _UNSUPPORTED_BACKENDS.get(
            backend, "Keras has no distribution implementation for it"
        )
        raise NotImplementedError(
            "Expert parallelism in keras-moe uses Keras's distribution API, "
            f"which it supports on the JAX backend only: {reason}. Set "
            "KERAS_BACKEND=jax to shard experts over devices. "
            f"Received: backend={backend!r}, keras {keras.version()}"
        )


# The expert weights of the keras-moe layers: while a layer creates its
# weights (`expert_weights`), the names it declares with their expert axes,
# innermost layer last; once created, each one's path and axis (a layout may
# be asked for after creation, when Keras defers a variable's initialisation
# while JAX traces a subclassed model's call).
_DECLARING = []
_EXPERT_PATHS = {}
# The path `expert_axis` asks a distribution's layout for: an expert-parallel
# map answers it with its expert axis, in an `_ExpertAxis` layout (no
# variable or layer output has a `:` in its path).
_EXPERT_AXIS_PATH = "keras_moe:expert_axis"


class _ExpertAxis(keras.distribution.TensorLayout):
    """An expert-parallel map's answer to `_EXPERT_AXIS_PATH`: `axes` is
    `(expert_axis,)`."""


@contextlib.contextmanager
def expert_weights(layer):
    """The context in which a keras-moe `layer` creates its weights.

    Its `expert_weight_axes()` (weight name -> expert axis) tells
    `expert_parallel_layout_map` which of the variables created inside have
    an expert axis, and where; after the context, their paths are
    remembered for layouts asked later. A sublayer that declares its own
    inside (a bank built in its host's context) keeps its declaration: the
    host's names apply to the host's variables only.
    """
    axes = layer.expert_weight_axes()
    existing = {id(variable) for variable in layer.weights}
    # (the declared axes, the paths declared by sublayers inside)
    _DECLARING.append((axes, set()))
    try:
        yield
    finally:
        _, inner = _DECLARING.pop()
    declared = set(inner)
    for variable in layer.weights:
        if id(variable) in existing or variable.path in inner:
            continue
        axis = axes.get(variable.path.rpartition("/")[2])
        if axis is not None:
            _EXPERT_PATHS[variable.path] = axis
            declared.add(variable.path)
    if _DECLARING:
        _DECLARING[-1][1].update(declared)


def _declared_axis(path):
    """The expert axis of the variable at `path`, or None."""
    name = path.rpartition("/")[2]
    if _DECLARING and name in _DECLARING[-1][0]:
        return _DECLARING[-1][0][name]
    return _EXPERT_PATHS.get(path)


def expert_axis(distribution=None):
    """The mesh axis the experts are split over under `distribution` (the
    current one by default), or None when its layout map is not
    `expert_parallel_layout_map`'s (or it has none, as `DataParallel`).

    The distribution is asked through its public `get_tensor_layout`, which
    `ModelParallel` answers from its layout map: another distribution on
    the same mesh, with another map, gets its own answer."""
    if distribution is None:
        distribution = keras.distribution.distribution()
    get_tensor_layout = getattr(distribution, "get_tensor_layout", None)
    if get_tensor_layout is None:
        return None
    layout = get_tensor_layout(_EXPERT_AXIS_PATH)
    if isinstance(layout, _ExpertAxis):
        return layout.axes[0]
    return None


class _ExpertParallelLayoutMap(keras.distribution.LayoutMap):
    """A `LayoutMap` that also lays out the expert weights of keras-moe layers.

    A variable that a keras-moe layer declared (`expert_weights`) gets the
    layout `(None,) * axis + (expert_axis,)`; every other path is looked up
    in the entries, as in `LayoutMap`.
    """

    def __init__(self, device_mesh, expert_axis):
        super().__init__(device_mesh)
        self.expert_axis = expert_axis

    def expert_layout(self, path):
        """The expert-parallel `TensorLayout` of the variable at `path`, or None."""
        axis = _declared_axis(path)
        if axis is None:
            return None
        return keras.distribution.TensorLayout(
            (None,) * axis + (self.expert_axis,), self.device_mesh
        )

    def __getitem__(self, key):
        if key == _EXPERT_AXIS_PATH:
            return _ExpertAxis((self.expert_axis,), self.device_mesh)
        layout = self.expert_layout(key)
        if layout is not None:
            return layout
        return super().__getitem__(key)


def expert_parallel_layout_map(mesh, expert_axis="expert", layout_map=None):
    """A `LayoutMap` that shards every keras-moe expert weight over `expert_axis`.

    Each keras-moe layer declares which of its weights have an expert axis and
    where (`expert_weight_axes()`); those weights are split along that axis
    over the devices of the mesh axis `expert_axis`, so each device holds
    `1 / mesh_size[expert_axis]` of the experts. The experts' optimizer
    slots follow their variables. Everything else (routers of the token-routed
    layers, other layers' weights) is laid out by `layout_map`'s entries, or
    replicated when none matches; an entry that would match a keras-moe
    expert weight does not override its expert layout. Use it with
    `keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`;
    a mesh `(batch, expert)` gives data parallelism over `batch` and expert
    parallelism over `expert`.

    Sharded axes: `DenseMoE` and `MoEFeedForward` shard their experts
    (`n_experts` must be divisible by the expert-axis size). The conv layers
    shard their filters with all the experts of each filter
    (`n_filters` divisible by it): gates of different filters never meet, so
    their gating weights are split the same way.

    Keras 3.15's distribution API works on the JAX backend only; on the other
    backends this raises `NotImplementedError` rather than letting a layout be
    silently ignored.

    Args:
        mesh: `keras.distribution.DeviceMesh` that has an axis named
            `expert_axis`.
        expert_axis: Name of the mesh axis the experts are split over.
        layout_map: Optional `keras.distribution.LayoutMap` on `mesh` with the
            user's own entries. It is not modified: its entries are copied
            into the returned map.

    Returns:
        A `keras.distribution.LayoutMap` (a subclass) on `mesh`.

    Example:

    ```python
    import keras
    from keras_moe import DenseMoE, expert_parallel_layout_map

    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "expert"])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=expert_parallel_layout_map(mesh),
            batch_dim_name="batch",
        )
    )
    model = keras.Sequential([keras.Input((16,)), DenseMoE(8, n_experts=8)])
    ```
    """
    if not isinstance(mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`mesh` must be a `keras.distribution.DeviceMesh`. "
            f"Received: mesh={mesh!r} of type {type(mesh).__name__}"
        )
    if not isinstance(expert_axis, str) or expert_axis not in mesh.axis_names:
        raise ValueError(
            "`expert_axis` must be the name of an axis of `mesh`. "
            f"Received: expert_axis={expert_axis!r}, "
            f"mesh.axis_names={list(mesh.axis_names)}"
        )
    if layout_map is not None and not isinstance(
        layout_map, keras.distribution.LayoutMap
    ):
        raise TypeError(
            "`layout_map` must be a `keras.distribution.LayoutMap` or None. "
            f"Received: layout_map={layout_map!r} of type {type(layout_map).__name__}"
        )
    if layout_map is not None and layout_map.device_mesh is not mesh:
        raise ValueError(
            "`layout_map` must be built on the same `mesh`. Received: "
            f"layout_map.device_mesh={layout_map.device_mesh!r}, mesh={mesh!r}"
        )
    check_backend()
    result = _ExpertParallelLayoutMap(mesh, expert_axis)
    for key in layout_map or ():
        result[key] = layout_map[key]
    return result


def _data_shards(distribution):
    """`(shards, shard)`: how many processes feed different rows of a global
    batch, and which of them this process is.

    Keras's own rule for a `tf.data.Dataset` under auto-sharding
    (`Distribution.distribute_tf_dataset`), so both data paths feed the same
    rows: one shard per process when each process holds whole data-parallel
    replicas, one per replica when a replica spans processes (the processes
    of a replica feed the same rows), one in all when the batch is not split.
    """
    if distribution.batch_dim_name is None or distribution.num_processes == 1:
        return 1, 0
    shards = min(distribution.num_model_replicas, distribution.num_processes)
    if shards == 1:
        return 1, 0
    return shards, distribution.data_shard_id


def process_local_data(data, batch_size, distribution=None):
    """This process's rows of global arrays, for `fit`, `evaluate`, `predict`.

    In a multi-process run (one process per host, after
    `keras.distribution.initialize()`), Keras builds each global batch from
    every process's local batch (`jax.make_array_from_process_local_data`):
    process `p` must feed the rows of the global batch that its devices hold.
    This takes the global arrays that every process can read (or the same
    rows of them) and returns, batch by batch, this process's part: global
    batch `i` is rows `[i * batch_size, (i + 1) * batch_size)` of `data`, of
    which this process gets its contiguous `batch_size / shards` rows, where
    `shards` is the number of processes along the mesh's batch axis. Passed to
    `fit(..., batch_size=local_batch_size, shuffle=False)`, the model sees
    exactly the batches a one-device `fit(data, batch_size=batch_size,
    shuffle=False)` sees, and the same batches as a global `tf.data.Dataset`
    that Keras auto-shards (Keras's own rule decides which process feeds
    which rows).

    The distribution must be created with `auto_shard_dataset=False`: the
    rows are already this process's. In a single process (or without a
    distribution, or with a batch axis of one device) the arrays come back
    whole.

    Args:
        data: A NumPy array or a nested structure (tuple, list, dict) of
            arrays with the same number of rows, e.g. `(x, y)`.
        batch_size: Global batch size: rows per training step over all
            processes. It must split evenly over the mesh's batch axis, and
            so must the last batch (`rows % batch_size`).
        distribution: The `keras.distribution.Distribution` the model runs
            under. Defaults to the current one
            (`keras.distribution.distribution()`).

    Returns:
        `(local_data, local_batch_size)`: `data`'s structure with this
        process's rows, and the batch size to pass to `fit`/`evaluate`/
        `predict`.

    Example:

    ```python
    keras.distribution.initialize()  # one process per host
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "expert"])
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_moe.expert_parallel_layout_map(mesh),
        batch_dim_name="batch",
        auto_shard_dataset=False,
    )
    (x_local, y_local), local_batch = keras_moe.distribution.process_local_data(
        (x, y), batch_size=64, distribution=distribution
    )
    with distribution.scope():
        model = build_model()
        model.compile("adam", "mse")
        model.fit(x_local, y_local, batch_size=local_batch, shuffle=False)
    ```
    """
    batch_size = utils.check_positive_int("batch_size", batch_size)
    if distribution is None:
        distribution = keras.distribution.distribution()
    leaves = keras.tree.flatten(data)
    if not leaves:
        raise ValueError(
            f"`data` must hold at least one array. Received: data={data!r}"
        )
    for leaf in leaves:
        if not hasattr(leaf, "__array__") or not np.ndim(leaf):
            shape = getattr(leaf, "shape", None)
            raise TypeError(
                "`data` must be NumPy arrays (or a tuple, list or dict of "
                "them) with a batch axis. A `tf.data.Dataset` needs no "
                "helper: pass the global, batched dataset to `fit` under a "
                "distribution with `auto_shard_dataset=True` (the default), "
                "and Keras gives each process its shard. Received: "
                f"data containing {type(leaf).__name__}"
                + ("" if shape is None else f" of shape {shape}")
            )
    lengths = {len(leaf) for leaf in leaves}
    if len(lengths) > 1:
        raise ValueError(
            "`data` must hold arrays with the same number of rows. Received: "
            f"data with shapes {[tuple(np.shape(leaf)) for leaf in leaves]}"
        )
    if distribution is None:
        return data, batch_size
    if not isinstance(distribution, Distribution):
        raise TypeError(
            "`distribution` must be a `keras.distribution` distribution "
            "(`ModelParallel`, `DataParallel`) or None. "
            f"Received: distribution={distribution!r} of type "
            f"{type(distribution).__name__}"
        )
    check_backend()
    if distribution.num_processes > 1 and distribution.auto_shard_dataset:
        raise ValueError(
            "`process_local_data` gives each process its own rows, so the "
            "distribution must not shard them again: create it with "
            "`auto_shard_dataset=False` (or feed a global `tf.data.Dataset` "
            "and keep auto-sharding). NumPy arrays cannot be auto-sharded "
            "across processes. Received: "
            f"auto_shard_dataset={distribution.auto_shard_dataset!r}, "
            f"num_processes={distribution.num_processes}"
        )
    shards, shard = _data_shards(distribution)
    if shards == 1:
        return data, batch_size
    (rows,) = lengths
    full, last = divmod(rows, batch_size)
    groups = distribution.num_model_replicas
    if batch_size % groups or last % groups:
        raise ValueError(
            "`batch_size` and the last batch must split evenly over the "
            f"mesh's batch axis ({groups} data-parallel groups, fed by "
            f"{shards} processes); pick a batch size that divides the "
            "number of rows, or drop the last rows. Received: "
            f"batch_size={batch_size}, rows={rows} (last batch {last} rows), "
            f"batch axis={groups}, shards={shards}"
        )
    local_batch = batch_size // shards
    local_last = last // shards
    index = (
        np.arange(full)[:, None] * batch_size
        + shard * local_batch
        + np.arange(local_batch)
    ).ravel()
    index = np.concatenate(
        [index, full * batch_size + shard * local_last + np.arange(local_last)]
    )
    return keras.tree.map_structure(lambda a: np.asarray(a)[index], data), local_batch
