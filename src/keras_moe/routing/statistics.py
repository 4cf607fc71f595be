"""`RoutingStatistics`: routing statistics kept in a layer's own variables.

Every router (`TopKRouter`, `ExpertChoiceRouter`) and `SoftMoE` holds one
as its sublayer `statistics` and records, at every call, each expert's share
of the assignments (`expert_load`), the share of assignments dropped
(`dropped_fraction`) and the mean router entropy in nats
(`router_entropy`); in training calls it also adds them to running sums
(and counts the calls, `steps`). Non-trainable float32 variables under any
dtype policy, not `keras.metrics.Metric` objects: they are updated inside
the training step, so they survive `jit_compile` and JAX's stateless step.
"""

import keras
from keras import ops

from keras_moe import saved_formats

# The statistics, in the order their variables are created (the order of
# saved files): name -> shape given the number of experts.
FIELDS = {
    "expert_load": lambda e: (e,),
    "dropped_fraction": lambda e: (),
    "router_entropy": lambda e: (),
}


@keras.saving.register_keras_serializable(package="keras_moe")
class RoutingStatistics(saved_formats.LegacyLoading, keras.layers.Layer):
    """Routing statistics of the last call and their running sums.

    Variables, all non-trainable float32: for each statistic `s` of
    `FIELDS` (`expert_load` `(E,)`, `dropped_fraction` `()`,
    `router_entropy` `()`), `s` (the last call's value) and `s_sum` (the sum
    over the training calls since `reset`), and `steps` (the number of those
    calls).

    A frozen layer's state does not move: while `trainable` is `False` (as
    when its router or the model holding it is frozen) the sums and `steps`
    do not change, even in training calls, as `BatchNormalization` keeps its
    moving statistics; the last values still report each call.

    Args:
        n_experts: Positive integer, number of experts `E`.
        **kwargs: Base layer arguments (`name`, ...); the variables are
            float32 whatever `dtype` says.

    Example:

    >>> from keras_moe.routing import RoutingStatistics
    >>> statistics = RoutingStatistics(2)
    >>> statistics.build()
    >>> statistics.record(expert_load=[0.75, 0.25], router_entropy=0.5,
    ...                   training=True)
    >>> statistics.mean()["steps"], statistics.last()["router_entropy"]
    (1, 0.5)
    """

    def __init__(self, n_experts, **kwargs):
        super().__init__(**kwargs)
        if isinstance(n_experts, bool) or not isinstance(n_experts, int):
            raise TypeError(
                "`n_experts` must be a positive integer. "
                f"Received: n_experts={n_experts!r}"
            )
        if n_experts < 1:
            raise ValueError(
                "`n_experts` must be a positive integer. "
                f"Received: n_experts={n_experts!r}"
            )
        self.n_experts = n_experts

    def build(self, input_shape=None):
        for name, shape in FIELDS.items():
            setattr(self, name, self._state(name, shape(self.n_experts)))
        for name, shape in FIELDS.items():
            setattr(
                self, f"{name}_sum", self._state(f"{name}_sum", shape(self.n_experts))
            )
        self.steps = self._state("steps", ())
        self.built = True

    def _state(self, name, shape):
        return self.add_weight(
            name=name,
            shape=shape,
            initializer="zeros",
            dtype="float32",
            trainable=False,
            autocast=False,
        )

    def record(
        self,
        expert_load=None,
        dropped_fraction=None,
        router_entropy=None,
        training=None,
    ):
        """Stores the given statistics of one call (a `None` one keeps its
        value) and, in training calls of a trainable layer, adds them to the
        sums. `steps` counts the calls whose `expert_load` is given (one per
        routing)."""
        training = training and self.trainable
        values = {
            "expert_load": expert_load,
            "dropped_fraction": dropped_fraction,
            "router_entropy": router_entropy,
        }
        for name, value in values.items():
            if value is None:
                continue
            value = ops.stop_gradient(ops.cast(value, "float32"))
            getattr(self, name).assign(value)
            if training:
                getattr(self, f"{name}_sum").assign_add(value)
        if training and expert_load is not None:
            self.steps.assign_add(ops.ones((), "float32"))

    def last(self):
        """The last call's statistics, as NumPy values and floats."""
        self._check_built()
        return self._as_dict({name: getattr(self, name).value for name in FIELDS})

    def mean(self):
        """The means over the training calls since `reset`, with `steps`
        (`None` if there were none)."""
        if not self.built:
            return None
        steps = float(ops.convert_to_numpy(self.steps.value))
        if steps == 0:
            return None
        stats = self._as_dict(
            {name: getattr(self, f"{name}_sum").value / steps for name in FIELDS}
        )
        stats["steps"] = int(round(steps))
        return stats

    def reset(self):
        """Zeroes the sums and `steps`."""
        if not self.built:
            return
        for name in FIELDS:
            variable = getattr(self, f"{name}_sum")
            variable.assign(ops.zeros(variable.shape, "float32"))
        self.steps.assign(ops.zeros((), "float32"))

    def assign_packed(self, last, sums):
        """Sets the variables from keras-moe 0.2.0's packed vectors:
        `last` `(E + 2,)` (loads, dropped fraction, entropy) and `sums`
        `(E + 3,)` (their sums, then the number of calls)."""
        e = self.n_experts
        for values, suffix in ((last, ""), (sums, "_sum")):
            getattr(self, f"expert_load{suffix}").assign(values[:e])
            getattr(self, f"dropped_fraction{suffix}").assign(values[e])
            getattr(self, f"router_entropy{suffix}").assign(values[e + 1])
        self.steps.assign(sums[e + 2])

    def _check_built(self):
        if not self.built:
            raise ValueError(
                "A layer has no routing statistics before it is built and "
                f"called. Received: {self.name!r} with built=False"
            )

    @staticmethod
    def _as_dict(values):
        stats = {}
        for name, value in values.items():
            value = ops.convert_to_numpy(value)
            stats[name] = value if value.ndim else float(value)
        return stats

    def get_config(self):
        return {**super().get_config(), "n_experts": self.n_experts}
