"""Routing groups under a `keras.distribution` (GShard's groups)."""

import keras


def distribution_groups(n_tokens, expert_axis=None):
    """`(groups, constrain)`: how `sparse_mixture` splits its tokens.

    Without a `keras.distribution` (or with a batch axis of one device, or a
    token count it does not divide): `(1, None)`, one routing over every
    token. Under a distribution with a batch axis of `g` devices: `g` groups,
    the tokens of each batch shard routed among themselves, and `constrain`
    lays a `(groups, experts, ...)` tensor out over the batch axis and, where
    `expert_axis` (the mesh axis the experts are split over, from
    `keras_moe.distribution.expert_axis()`; None: none), so each device runs
    its experts on its own group's rows.
    """
    distribution = keras.distribution.distribution()
    batch_axis = getattr(distribution, "batch_dim_name", None)
    if distribution is None or batch_axis is None or not isinstance(n_tokens, int):
        return 1, None
    mesh = distribution.device_mesh
    groups = mesh.shape[list(mesh.axis_names).index(batch_axis)]
    if groups <= 1 or n_tokens % groups:
        return 1, None

    def constrain(x):
        axes = (batch_axis, expert_axis) + (None,) * (len(x.shape) - 2)
        layout = keras.distribution.TensorLayout(axes, mesh)
        return keras.distribution.distribute_tensor(x, layout)

    return groups, constrain
