"""Weights written by the original Keras 2 mixture-of-experts layers.

The original `DenseMoE` and `Conv1DMoE`/`Conv2DMoE`/`Conv3DMoE` stored their
weights in their own shapes (listed in each converter below). These helpers
convert them to keras-moe's layout, so that a model trained with the original
code can be taken over unchanged:

- `load_seed_weights(layer, arrays)`: one layer, from the list that the
  original layer's `get_weights()` returned.
- `load_seed_h5(model, path)`: a whole model, from a Keras 2 `save_weights`
  HDF5 file, matching layers that own weights in order, as Keras 2 did.
"""

import numpy as np

from keras_moe.layers.base_conv_moe import BaseConvMoE
from keras_moe.layers.dense_moe import DenseMoE


def _original_names(layer):
    names = ["expert_kernel", "gating_kernel"]
    if layer.use_expert_bias:
        names.append("expert_bias")
    if layer.use_gating_bias:
        names.append("gating_bias")
    return names


def _dense_from_original(layer, weights):
    # Original: expert_kernel (d, units, e), expert_bias (units, e); the
    # layer's kernel has its experts axis where `expert_weight_axes` says
    # ((d, e, u) soft, (e, d, u) with `top_k`).
    kernel = np.transpose(weights["expert_kernel"], (0, 2, 1))
    axis = layer.expert_weight_axes()["expert_kernel"]
    converted = {
        "expert_kernel": np.moveaxis(kernel, 1, axis),
        "gating_kernel": weights["gating_kernel"],
    }
    if "expert_bias" in weights:
        converted["expert_bias"] = np.transpose(weights["expert_bias"], (1, 0))
    if "gating_bias" in weights:
        converted["gating_bias"] = weights["gating_bias"]
    return converted


def _dense_input_shape(layer, weights):
    return (None, weights["expert_kernel"].shape[0])


def _conv_from_original(layer, weights):
    # Original: expert_bias (1,) * rank + (n_filters, n_experts_per_filter).
    converted = dict(weights)
    if "expert_bias" in weights:
        converted["expert_bias"] = np.reshape(
            weights["expert_bias"], weights["expert_bias"].shape[-2:]
        )
    return converted


def _conv_input_shape(layer, weights):
    if layer.gating_input == "flatten":
        # The original gating kernel is input_shape[1:] + (n_filters, experts).
        return (None,) + tuple(weights["gating_kernel"].shape[:-2])
    # "pooled" and "local" gating kernels do not imply a spatial size: the
    # layer is built for any, with the expert kernel's input channels.
    in_channels = weights["expert_kernel"].shape[-2]
    spatial = (None,) * layer.rank
    if layer.data_format == "channels_first":
        return (None, in_channels) + spatial
    return (None,) + spatial + (in_channels,)


def _original_ranks(layer):
    """Ranks of the original weights (checked before any conversion)."""
    if isinstance(layer, DenseMoE):
        return {
            "expert_kernel": 3,
            "gating_kernel": 2,
            "expert_bias": 2,
            "gating_bias": 1,
        }
    ranks = {"expert_kernel": layer.rank + 2, "expert_bias": layer.rank + 2}
    ranks["gating_bias"] = 2
    # The original gates project the whole sample: input_shape[1:] + (F, K).
    if getattr(layer, "gating_input", "flatten") == "flatten":
        ranks["gating_kernel"] = layer.rank + 3
    return ranks


def _converters(layer):
    if isinstance(layer, DenseMoE):
        return _dense_from_original, _dense_input_shape
    if isinstance(layer, BaseConvMoE):
        return _conv_from_original, _conv_input_shape
    raise TypeError(
        "`layer` must be a keras-moe `DenseMoE` or `Conv1DMoE`/`Conv2DMoE`/"
        f"`Conv3DMoE`. Received: layer={layer!r} of type {type(layer).__name__}"
    )


def load_seed_weights(layer, arrays):
    """Set a layer's weights from the original layer's `get_weights()` list.

    Args:
        layer: A keras-moe `DenseMoE` or `ConvNDMoE`, built or not (an unbuilt
            layer is built from the weights' shapes).
        arrays: The original weights in the original order and shapes:
            `expert_kernel`, `gating_kernel`, then `expert_bias` and
            `gating_bias` where the layer uses them. A convolutional layer
            with `gating_input="pooled"` or `"local"` takes the gating kernel
            in its own shape (`(in_channels, F, K)` or
            `kernel_size + (in_channels, F, K)`) and, unbuilt, is built for
            any spatial size.

    Raises:
        TypeError: `layer` is not a keras-moe layer with original weights.
        ValueError: the number or shapes of `arrays` do not fit the layer
            (which is then left as it was: unbuilt if it was, its weights
            unchanged if it was built).
    """
    from_original, input_shape_of = _converters(layer)
    names = _original_names(layer)
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) != len(names):
        raise ValueError(
            f"`arrays` must hold {len(names)} arrays ({', '.join(names)}) for "
            f"layer {layer.name!r}. Received: {len(arrays)} arrays of shapes "
            f"{[a.shape for a in arrays]}"
        )
    ranks = _original_ranks(layer)
    for name, array in zip(names, arrays):
        if name in ranks and array.ndim != ranks[name]:
            raise ValueError(
                f"Original weight `{name}` of layer {layer.name!r} must have rank "
                f"{ranks[name]}. Received: arrays shapes {[a.shape for a in arrays]}"
            )
    weights = from_original(layer, dict(zip(names, arrays)))
    checked = layer
    if not layer.built:
        # Shapes are checked on a twin built from them: a rejected load must
        # leave `layer` as it was, unbuilt.
        input_shape = input_shape_of(layer, dict(zip(names, arrays)))
        checked = type(layer).from_config(layer.get_config())
        checked.build(input_shape)
    for name in names:
        variable = getattr(checked, name)
        value = weights[name]
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(
                f"Original weight `{name}` of layer {layer.name!r} converts to "
                f"shape {tuple(value.shape)}, but the layer expects "
                f"{tuple(variable.shape)}. Received: arrays shapes "
                f"{[a.shape for a in arrays]}"
            )
    if not layer.built:
        layer.build(input_shape)
    for name in names:
        getattr(layer, name).assign(weights[name].astype(getattr(layer, name).dtype))
    return layer


def _decode(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def load_seed_h5(model, path):
    """Load a Keras 2 `save_weights` HDF5 file of a model of original layers.

    The model must have the same architecture built with keras-moe layers and
    standard Keras layers, and be built. Layers that own weights are matched in
    order, as Keras 2's `load_weights` did: keras-moe layers through
    `load_seed_weights`, others with `set_weights`.

    Args:
        model: A built `keras.Model`.
        path: Path of the `.h5` file.

    Raises:
        ValueError: the file is not a Keras 2 weights file, or the number of
            layers with weights or their weight shapes do not match.
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(
            "`path` must be a Keras 2 weights file written by `save_weights` "
            f"(HDF5; this one cannot be opened: {e}). Received: path={path!r}"
        ) from e
    with f:
        if "layer_names" not in f.attrs:
            raise ValueError(
                "`path` must be a Keras 2 weights file written by `save_weights` "
                f"(its root has a `layer_names` attribute). Received: path={path!r}"
            )
        saved = []
        for layer_name in (_decode(n) for n in f.attrs["layer_names"]):
            group = f[layer_name]
            names = [_decode(n) for n in group.attrs.get("weight_names", [])]
            if names:
                saved.append((layer_name, [np.asarray(group[n]) for n in names]))
    targets = [layer for layer in model.layers if layer.weights]
    if len(targets) != len(saved):
        raise ValueError(
            f"The file has {len(saved)} layers with weights "
            f"({[name for name, _ in saved]}) but the model has {len(targets)} "
            f"({[layer.name for layer in targets]}). Received: path={path!r}"
        )
    for layer, (saved_name, arrays) in zip(targets, saved):
        if isinstance(layer, (DenseMoE, BaseConvMoE)):
            load_seed_weights(layer, arrays)
            continue
        expected = [tuple(w.shape) for w in layer.get_weights()]
        received = [a.shape for a in arrays]
        if expected != received:
            raise ValueError(
                f"Layer {layer.name!r} expects weights of shapes {expected} but the "
                f"file's layer {saved_name!r} holds {received}. Received: path={path!r}"
            )
        layer.set_weights(arrays)
    return model
