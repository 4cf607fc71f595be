"""Routing statistics kept in a layer's own non-trainable variables.

The routers without a host's help (`ExpertChoiceRouter`) and `SoftMoE`
record, at every call, `(expert loads..., dropped fraction, entropy)` in
`routing_stats_last` and add it, in training, to `routing_stats_sum` (whose
last entry counts the calls), exactly as `TopKRouter` does. Variables, not
`keras.metrics.Metric` objects: they are updated inside the training step,
so they survive `jit_compile` and JAX's stateless step.
"""

from keras import ops


def add_routing_stats_weights(layer, n_experts):
    """Creates `layer.routing_stats_last` `(E + 2,)` and
    `layer.routing_stats_sum` `(E + 3,)`, float32, non-trainable, zero."""
    layer.routing_stats_last = layer.add_weight(
        name="routing_stats_last",
        shape=(n_experts + 2,),
        initializer="zeros",
        trainable=False,
        dtype="float32",
        autocast=False,
    )
    layer.routing_stats_sum = layer.add_weight(
        name="routing_stats_sum",
        shape=(n_experts + 3,),
        initializer="zeros",
        trainable=False,
        dtype="float32",
        autocast=False,
    )


def record_routing_stats(layer, stats, training):
    """Stores one call's `(E + 2,)` statistics; in training, adds them up,
    unless the layer is frozen (`trainable=False`: its state does not move,
    as `BatchNormalization`'s)."""
    stats = ops.stop_gradient(ops.cast(stats, "float32"))
    layer.routing_stats_last.assign(stats)
    if training and layer.trainable:
        ones = ops.ones((1,), "float32")
        layer.routing_stats_sum.assign_add(ops.concatenate([stats, ones]))


def routing_stats_dict(values, n_experts):
    """`{"expert_load", "dropped_fraction", "router_entropy"}` of `(E + 2,)`
    NumPy values."""
    return {
        "expert_load": values[:n_experts],
        "dropped_fraction": float(values[n_experts]),
        "router_entropy": float(values[n_experts + 1]),
    }


def last_routing_stats(layer, n_experts):
    """The last call's statistics as a dict; a clear error before a call."""
    if not layer.built:
        raise ValueError(
            "A layer has no routing statistics before it is built and "
            f"called. Received: {layer.name!r} with built=False"
        )
    values = ops.convert_to_numpy(layer.routing_stats_last.value)
    return routing_stats_dict(values, n_experts)


def mean_routing_stats(layer, n_experts):
    """Mean statistics over the training calls since the last reset (None if
    there were none), with `steps`."""
    if not layer.built:
        return None
    values = ops.convert_to_numpy(layer.routing_stats_sum.value)
    steps = float(values[-1])
    if steps == 0:
        return None
    stats = routing_stats_dict(values[:-1] / steps, n_experts)
    stats["steps"] = int(round(steps))
    return stats


def reset_routing_stats(layer):
    """Zeroes `layer.routing_stats_sum`."""
    if layer.built:
        layer.routing_stats_sum.assign(ops.zeros(layer.routing_stats_sum.shape))
