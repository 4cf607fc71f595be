"""Expert parallelism on Keras's distribution API.

`expert_parallel_layout_map` returns a `keras.distribution.LayoutMap` that
shards every keras-moe expert weight along its expert axis over one axis of a
`keras.distribution.DeviceMesh`. Pass it to
`keras.distribution.ModelParallel(layout_map=..., batch_dim_name=...)`: Keras
and the JAX compiler (GSPMD) do the rest. There is no keras-moe runtime.

How a weight's expert axis is found: every keras-moe layer declares it in
`expert_weight_axes()` (weight name -> axis). A `LayoutMap` only sees a
variable's path (`".../layer_name/weight_name"`), so the map looks up the layer
that is creating the variable (the innermost Keras name scope, opened by
`Layer.add_weight` with the layer as its caller) and asks it. This keys the
layout on the layer, not on guessed layer names: a renamed or nested keras-moe
layer is sharded all the same, and a weight called `expert_kernel` in somebody
else's layer is left alone.
"""

import keras
from keras.src.backend.common import global_state
from keras.src.backend.common.name_scope import current_path

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


def _creating_layer(path):
    """The keras-moe layer that owns the variable at `path`, or None.

    `Layer.add_weight` creates its variable inside
    `backend.name_scope(layer.name, caller=layer)`, and Keras asks the
    distribution for the variable's layout inside that scope. When Keras
    defers the initialisation (variables first created while JAX traces a
    subclassed model's call), the layout is asked for later, inside an outer
    layer's scope: the variable is then found among that layer's sublayers.
    """
    stack = global_state.get_global_attribute("name_scope_stack") or []
    callers = [scope.caller for scope in reversed(stack)]
    if callers and path.rpartition("/")[0] == current_path():
        # Created now, by the innermost caller.
        return callers[0] if hasattr(callers[0], "expert_weight_axes") else None
    for caller in callers:
        if not isinstance(caller, keras.layers.Layer):
            continue
        for layer in caller._flatten_layers(include_self=True):
            if hasattr(layer, "expert_weight_axes") and any(
                v.path == path for v in layer.weights
            ):
                return layer
    return None


class _ExpertParallelLayoutMap(keras.distribution.LayoutMap):
    """A `LayoutMap` that also lays out the expert weights of keras-moe layers.

    A variable created by a layer with `expert_weight_axes()` that lists the
    variable's name gets the layout
    `(None,) * axis + (expert_axis,)`; every other path is looked up in the
    entries, as in `LayoutMap`.
    """

    def __init__(self, device_mesh, expert_axis):
        super().__init__(device_mesh)
        self.expert_axis = expert_axis

    def expert_layout(self, path):
        """The expert-parallel `TensorLayout` of the variable at `path`, or None."""
        layer = _creating_layer(path)
        declare = getattr(layer, "expert_weight_axes", None)
        if declare is None:
            return None
        axis = declare().get(path.rpartition("/")[2])
        if axis is None:
            return None
        return keras.distribution.TensorLayout(
            (None,) * axis + (self.expert_axis,), self.device_mesh
        )

    def __getitem__(self, key):
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
