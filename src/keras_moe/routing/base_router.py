"""`BaseRouter`: what every keras-moe router has (`TopKRouter`,
`ExpertChoiceRouter`)."""

import keras
from keras import ops

from keras_moe import saved_formats
from keras_moe import utils
from keras_moe.routing.gates import ROUTER_DTYPES
from keras_moe.routing.gates import gate_logits
from keras_moe.routing.gates import router_dtype_of
from keras_moe.routing.losses import router_z_loss
from keras_moe.routing.statistics import RoutingStatistics


class BaseRouter(saved_formats.LegacyLoading, keras.layers.Layer):
    """Base class of the routers: logits, losses, statistics, config.

    A router scores `n` tokens of `d` features against `E` experts with
    logits `z = x . W_r (+ b_r)`, computed in float32 (or, with
    `router_dtype="compute"`, in the layer's compute dtype) whatever the
    dtype policy, and decides from them which expert runs which token. With
    `input_norm`, it scores `rms_norm(x) / sqrt(d) * s` instead, `s` a
    learned per-feature `input_scale` (Gemma 4's router). In training it adds
    the router z-loss `mean(logsumexp(z)^2)` (ST-MoE) times
    `router_z_loss_weight`. Its routing statistics live in a
    `RoutingStatistics` sublayer, `statistics`.

    A subclass implements `call(inputs, mask=None, training=None)`, which
    returns the routing as two tensors, and `dispatch(inputs, weights,
    indices, experts, mask=None, training=None)`, which runs an expert bank
    (`keras_moe.layers.FeedForwardExperts`) on each token's experts and mixes
    their outputs back per token. A subclass that adds variables creates
    them in `build` after `super().build(input_shape)`.

    Args:
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, experts per token (exactly,
            or on average for expert choice).
        use_bias: Whether the logits have a bias `b_r`.
        router_dtype: `"float32"` (the default) or `"compute"`: the dtype of
            the logits and of the arithmetic that follows them (the
            statistics and losses are float32 either way).
        input_norm: Whether the router scores its inputs RMS-normalised,
            divided by `sqrt(d)` and scaled by a learned `input_scale` `(d,)`
            initialised to ones (Gemma 4's router).
        norm_epsilon: Epsilon of that RMS normalisation.
        router_z_loss_weight: Non-negative weight of the router z-loss.
        kernel_initializer: Initializer of the router kernel `W_r`.
        bias_initializer: Initializer of the router bias.
        kernel_regularizer: Regularizer of the router kernel.
        bias_regularizer: Regularizer of the router bias.
        kernel_constraint: Constraint of the router kernel.
        bias_constraint: Constraint of the router bias.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

    Example:

    A router that sends each token to its best expert, in a block:

    >>> import numpy as np
    >>> from keras import ops
    >>> from keras_moe.layers import FeedForwardExperts, MoEFeedForward
    >>> from keras_moe.routing import BaseRouter, sparse_mixture
    >>> class ArgmaxRouter(BaseRouter):
    ...     def call(self, inputs, mask=None, training=None):
    ...         best = ops.argmax(self.logits(inputs), axis=-1)[:, None]
    ...         return ops.ones(ops.shape(best)), ops.cast(best, "int32")
    ...     def dispatch(self, inputs, weights, indices, expert_bank,
    ...                  mask=None, training=None):
    ...         outputs, _, _ = sparse_mixture(
    ...             inputs, indices, weights, self.n_experts, expert_bank,
    ...             mask=mask, training=training)
    ...         return outputs
    >>> block = MoEFeedForward(experts=FeedForwardExperts(16, 4),
    ...                        router=ArgmaxRouter(4, top_k=1))
    >>> tuple(block(np.ones((2, 5, 8), "float32")).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        n_experts,
        top_k=2,
        use_bias=False,
        router_dtype="float32",
        input_norm=False,
        norm_epsilon=1e-6,
        router_z_loss_weight=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_experts = utils.check_positive_int("n_experts", n_experts)
        self.top_k = utils.check_top_k(top_k, self.n_experts)
        self.use_bias = utils.check_bool("use_bias", use_bias)
        self.router_dtype = utils.check_choice(
            "router_dtype", router_dtype, ROUTER_DTYPES
        )
        self.input_norm = utils.check_bool("input_norm", input_norm)
        self.norm_epsilon = utils.check_positive_float("norm_epsilon", norm_epsilon)
        self.router_z_loss_weight = utils.check_non_negative_float(
            "router_z_loss_weight", router_z_loss_weight
        )
        self.kernel_initializer = utils.get_initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = utils.get_initializer(
            "bias_initializer", bias_initializer
        )
        self.kernel_regularizer = utils.get_regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = utils.get_regularizer(
            "bias_regularizer", bias_regularizer
        )
        self.kernel_constraint = utils.get_constraint(
            "kernel_constraint", kernel_constraint
        )
        self.bias_constraint = utils.get_constraint("bias_constraint", bias_constraint)
        self.kernel = None
        self.bias = None
        self.input_scale = None
        self.statistics = RoutingStatistics(self.n_experts, name="statistics")
        self.input_spec = keras.layers.InputSpec(ndim=2)
        # Masked tokens take part in no loss, statistic or dispatch.
        self.supports_masking = True

    def build(self, input_shape):
        input_dim = tuple(input_shape)[-1]
        if input_dim is None:
            raise ValueError(
                f"The last axis of the input of `{type(self).__name__}` must be "
                f"defined. Received: input_shape={tuple(input_shape)}"
            )
        # The router stays in float32 under mixed precision: no autocast.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_dim, self.n_experts),
            initializer=utils.initializer_for(self.kernel_initializer, "kernel"),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            autocast=False,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.n_experts,),
                initializer=utils.initializer_for(self.bias_initializer, "bias"),
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                autocast=False,
            )
        if self.input_norm:
            self.input_scale = self.add_weight(
                name="input_scale", shape=(input_dim,), initializer="ones"
            )
        self.statistics.build()
        self.input_spec = keras.layers.InputSpec(ndim=2, axes={-1: input_dim})

    @property
    def logits_dtype(self):
        """The dtype of the logits: float32, or the compute dtype with
        `router_dtype="compute"`."""
        return router_dtype_of(self.router_dtype, self.compute_dtype)

    def scored_inputs(self, inputs):
        """What the kernel scores: the inputs, or with `input_norm`
        `rms_norm(x) / sqrt(d) * input_scale` (the norm in float32, the rest
        in the inputs' dtype)."""
        if self.input_scale is None:
            return inputs
        x = ops.cast(inputs, "float32")
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = ops.cast(x * ops.power(variance + self.norm_epsilon, -0.5), inputs.dtype)
        x = x * ops.cast(inputs.shape[-1] ** -0.5, x.dtype)
        return x * ops.cast(self.input_scale, x.dtype)

    def logits(self, inputs, training=None):
        """Router logits `(tokens, E)` in `logits_dtype`."""
        return gate_logits(
            self.scored_inputs(inputs), self.kernel, self.bias, dtype=self.logits_dtype
        )

    def add_z_loss(self, logits, mask=None, training=None):
        """Adds the router z-loss in training, when it has a weight."""
        if training and self.router_z_loss_weight:
            self.add_loss(self.router_z_loss_weight * router_z_loss(logits, mask))

    @property
    def routing_stats(self):
        """Statistics of the last call, as NumPy: `expert_load` (each
        expert's share of the assignments), `dropped_fraction` (the share of
        assignments, or tokens, that no expert ran) and `router_entropy`
        (mean entropy in nats of the softmax over the experts)."""
        if not self.built:
            raise ValueError(
                "A router has no routing statistics before it is built and "
                f"called. Received: {self.name!r} with built=False"
            )
        return self.statistics.last()

    def routing_stats_mean(self):
        """Mean routing statistics over the training calls since the last
        `reset_routing_stats` (`None` if there were none), plus `steps`."""
        return self.statistics.mean()

    def reset_routing_stats(self):
        """Zeroes the running sums behind `routing_stats_mean`."""
        self.statistics.reset()

    def load_legacy_variables(self, store, version):
        """Reads a router store written by keras-moe 0.2.0: its kernel,
        bias and noise kernel, the routing statistics packed in two vectors
        (`RoutingStatistics.assign_packed`), then the balance bias."""
        head = [self.kernel, self.bias, getattr(self, "noise_kernel", None)]
        head = [v for v in head if v is not None]
        tail = [getattr(self, "balance_bias", None)]
        tail = [v for v in tail if v is not None]
        n = len(head)
        if len(store.keys()) != n + 2 + len(tail):
            saved_formats.assign_in_order(store, head + tail)  # raises
        for i, variable in enumerate(head):
            variable.assign(store[str(i)])
        self.statistics.assign_packed(store[str(n)], store[str(n + 1)])
        for i, variable in enumerate(tail):
            variable.assign(store[str(n + 2 + i)])
        saved_formats.restored(self.statistics)

    def call(self, inputs, mask=None, training=None):
        raise NotImplementedError

    def dispatch(self, inputs, weights, indices, expert_bank, mask=None, training=None):
        """Runs `expert_bank` on each token's experts and mixes them back:
        `(tokens, d_out)`."""
        raise NotImplementedError

    def get_config(self):
        config = {
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "use_bias": self.use_bias,
            "router_dtype": self.router_dtype,
            "input_norm": self.input_norm,
            "norm_epsilon": self.norm_epsilon,
            "router_z_loss_weight": self.router_z_loss_weight,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
        }
        return {**super().get_config(), **config}
