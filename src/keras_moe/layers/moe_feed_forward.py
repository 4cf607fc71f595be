"""`MoEFeedForward`: a sparse MoE feed-forward block, composed of a router,
an expert bank and an optional shared expert."""

import keras
from keras import ops

from keras_moe import saved_formats
from keras_moe import utils
from keras_moe.layers import expert_functions
from keras_moe.layers import moe_feed_forward_options as options_lib
from keras_moe.layers.feed_forward_experts import FeedForwardExperts
from keras_moe.layers.shared_expert import SharedExpert
from keras_moe.routing.base_router import BaseRouter
from keras_moe.routing.expert_choice_router import ExpertChoiceRouter
from keras_moe.routing.top_k_router import TopKRouter

# The values of `routing`.
ROUTINGS = ("token_choice", "expert_choice")


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEFeedForward(saved_formats.LegacyLoading, keras.layers.Layer):
    """Sparse mixture-of-experts transformer feed-forward block.

    `y = sum_{j < k} w_j(x) * expert_{e_j(x)}(x)`, where a router picks each
    token's experts `e_1..e_k` and weights `w_j` and an expert bank runs
    them; only the chosen experts run (tokens are sorted by expert and each
    expert multiplies its own tokens, `keras_moe.routing`), so compute and
    memory grow with `top_k`, not with `n_experts`.

    The block is composed of three sublayers, as `keras.layers.RNN` is of its
    cell: `router` (a `keras_moe.routing.TopKRouter` or
    `ExpertChoiceRouter`), `experts` (a `keras_moe.layers.FeedForwardExperts`)
    and an optional `shared_expert` that every token runs through besides its
    routed experts (a `keras_moe.layers.SharedExpert`). Give them as layer
    instances, or give the shorthand arguments (`intermediate_dim`,
    `n_experts`, `top_k`, ...) and the block builds them. The published
    models' blocks (Mixtral, Qwen MoE, GPT-OSS, Gemma 4) are made by the
    factories of `keras_moe.blocks`. A sublayer given as a layer keeps its
    own dtype policy (give it the block's `dtype`); the block's output is in
    its own compute dtype.

    Args:
        intermediate_dim: Positive integer, hidden size `m` of each expert
            (shorthand for `experts`).
        n_experts: Positive integer, number of experts `E` (shorthand; with
            `experts` or `router` given, it must agree with them, and it is
            theirs when omitted).
        top_k: Integer from 1 to `n_experts`, experts per token (shorthand
            for `router`; the average for expert choice).
        activation: Activation of the experts' hidden layer (a Keras
            activation, `"gelu_tanh"` or a callable; shorthand).
        gated: Whether each expert is a gated linear unit (shorthand).
        use_bias: Whether the experts have biases (shorthand).
        capacity_factor: `None` (dropless, the default for token choice: no
            token is ever dropped) or a positive float: with token choice
            each expert takes at most `ceil(capacity_factor * tokens *
            top_k / n_experts)` assignments (at most `tokens`), the others
            are dropped; expert choice needs one (each expert takes
            `ceil(capacity_factor * top_k * tokens / n_experts)` tokens).
            Shorthand.
        load_balance_weight: Weight of the load-balancing loss
            `E * sum_i f_i * P_i` (1.0 at perfect balance), added in training
            (token choice; shorthand).
        router_z_loss_weight: Weight of the router z-loss
            `mean(logsumexp(z)^2)`, added in training (shorthand).
        balance_bias_rate: Non-negative float; with token choice, loss-free
            balancing by a per-expert router bias moved by this much per
            training step (DeepSeek-V3, `routing.TopKRouter`; shorthand).
        routing: `"token_choice"` (the default: each token picks its `top_k`
            experts, `routing.TopKRouter`) or `"expert_choice"` (Zhou et al.
            2022, `routing.ExpertChoiceRouter`: each expert takes its
            tokens; not causal). Shorthand.
        layout: The token-choice dispatch layout (`routing.LAYOUTS`):
            `"auto"` (the default), `"capacity"`, `"tiers"`, `"blocks"` or
            `"grouped"` (shorthand).
        kernel_initializer: Initializer of the expert kernels (shorthand).
        bias_initializer: Initializer of the expert biases (shorthand).
        router_initializer: Initializer of the router kernel (shorthand).
        seed: Optional integer seed of the gating noise and the jitter.
        router_jitter_noise: Non-negative float `eps` below 1: in training
            the inputs are multiplied by uniform noise from
            `[1 - eps, 1 + eps]` before the router and the experts see them
            (Mixtral's `router_jitter_noise`).
        experts: A `FeedForwardExperts` (or a compatible expert bank), or
            `None` to build one from the shorthand arguments.
        router: A `keras_moe.routing.BaseRouter`, or `None` to build one from
            the shorthand arguments.
        shared_expert: `None`, or a layer mapping `(tokens, d)` to
            `(tokens, d)` that every token runs through (a `SharedExpert`).
        **kwargs: Base layer arguments (`name`, `dtype`, ...). The options
            that keras-moe 0.2.0 took here for the published models' blocks
            (`router_bias`, `gate_up_layout`, `shared_intermediate_dim`, ...)
            still work and warn: they belong to the sublayers now (see
            `keras_moe.blocks`).

    Call arguments:
        inputs: Tensor of shape `(..., d)`.
        mask: Optional boolean mask of shape `(...)`: masked tokens are not
            routed (their output is zero, the shared expert's included) and
            count in no loss or statistic.
        training: Python bool: losses, noise and jitter only when `True`.
        router_inputs: Optional tensor of the shape of `inputs` (another
            shape is a `ValueError`) that the router sees instead of them
            (Gemma 4 routes the hidden states, the experts their norm).

    Input shape:
        N-D tensor `(batch_size, ..., d)`, N >= 2.

    Output shape:
        Same as the input.

    Example:

    >>> import numpy as np
    >>> from keras_moe import MoEFeedForward
    >>> layer = MoEFeedForward(32, n_experts=4, top_k=2)
    >>> tuple(layer(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    >>> type(layer.router).__name__, type(layer.experts).__name__
    ('TopKRouter', 'FeedForwardExperts')
    >>> sorted(layer.routing_stats)
    ['dropped_fraction', 'expert_load', 'router_entropy']

    References:
        - Shazeer et al., "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017.
        - Fedus, Zoph & Shazeer, "Switch Transformers", JMLR 2022.
        - Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse
          Expert Models", 2022.
        - Gale et al., "MegaBlocks: Efficient Sparse Training with
          Mixture-of-Experts", MLSys 2023.
        - Jiang et al., "Mixtral of Experts", 2024.
    """

    def __init__(
        self,
        intermediate_dim=None,
        n_experts=None,
        top_k=2,
        activation="gelu",
        gated=False,
        use_bias=True,
        capacity_factor=None,
        load_balance_weight=0.01,
        router_z_loss_weight=0.0,
        balance_bias_rate=0.0,
        routing="token_choice",
        layout="auto",
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="glorot_uniform",
        seed=None,
        router_jitter_noise=0.0,
        experts=None,
        router=None,
        shared_expert=None,
        **kwargs,
    ):
        moved, kwargs = options_lib.pop_moved_options(kwargs, warn=True)
        if isinstance(router, str):
            utils.warn_deprecated(
                f"`MoEFeedForward(router={router!r})`",
                f"`routing={router!r}` (`router` is the router layer)",
                removed_in="0.4.0",
            )
            routing, router = router, None
            if routing == "expert_choice" and capacity_factor is None:
                capacity_factor = 1.0
        super().__init__(**kwargs)
        self.seed = utils.check_optional_seed(seed)
        self.router_jitter_noise = utils.check_non_negative_float(
            "router_jitter_noise", router_jitter_noise
        )
        if self.router_jitter_noise >= 1.0:
            raise ValueError(
                "`router_jitter_noise` must be a number from 0 to 1 (the noise "
                "factors lie in [1 - eps, 1 + eps]). "
                f"Received: router_jitter_noise={router_jitter_noise!r}"
            )
        shorthand = dict(
            intermediate_dim=intermediate_dim,
            n_experts=n_experts,
            top_k=top_k,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            capacity_factor=capacity_factor,
            load_balance_weight=load_balance_weight,
            router_z_loss_weight=router_z_loss_weight,
            balance_bias_rate=balance_bias_rate,
            routing=routing,
            layout=layout,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            router_initializer=router_initializer,
        )
        self.experts = self._experts_layer(experts, router, shorthand, moved["experts"])
        self.router = self._router_layer(router, shorthand, moved["router"])
        self.shared_expert = self._shared_expert_layer(
            shared_expert, shorthand, moved["shared_expert"]
        )
        self.n_experts = self.experts.n_experts
        self.top_k = self.router.top_k
        self.seed_generator = None
        if self.router_jitter_noise:
            self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def _experts_layer(self, experts, router, shorthand, options):
        if experts is not None:
            options_lib.check_given("experts", experts, shorthand, options)
            return experts
        n_experts = shorthand["n_experts"]
        if n_experts is None and isinstance(router, BaseRouter):
            n_experts = router.n_experts
        return FeedForwardExperts(
            options_lib.required("intermediate_dim", shorthand["intermediate_dim"]),
            options_lib.required("n_experts", n_experts),
            activation=shorthand["activation"],
            gated=shorthand["gated"],
            use_bias=shorthand["use_bias"],
            kernel_initializer=shorthand["kernel_initializer"],
            bias_initializer=shorthand["bias_initializer"],
            dtype=self.dtype_policy,
            name="experts",
            **options,
        )

    def _router_layer(self, router, shorthand, options):
        n_experts = self.experts.n_experts
        if router is not None:
            if not isinstance(router, BaseRouter):
                raise TypeError(
                    "`router` must be a `keras_moe.routing.BaseRouter` "
                    "(`TopKRouter`, `ExpertChoiceRouter`) or None. "
                    f"Received: router={router!r}"
                )
            options_lib.check_given("router", router, shorthand, options)
            utils.check_same("n_experts", n_experts, router.n_experts)
            return router
        utils.check_same("n_experts", n_experts, shorthand["n_experts"])
        routing = utils.check_choice("routing", shorthand["routing"], ROUTINGS)
        common = dict(
            n_experts=n_experts,
            top_k=shorthand["top_k"],
            router_z_loss_weight=shorthand["router_z_loss_weight"],
            kernel_initializer=shorthand["router_initializer"],
            dtype=self.dtype_policy,
            name="router",
        )
        if routing == "expert_choice":
            return options_lib.expert_choice_router(
                ExpertChoiceRouter, common, shorthand, options
            )
        return TopKRouter(
            capacity_factor=shorthand["capacity_factor"],
            load_balance_weight=shorthand["load_balance_weight"],
            balance_bias_rate=shorthand["balance_bias_rate"],
            layout=shorthand["layout"],
            seed=self.seed,
            **common,
            **options,
        )

    def _shared_expert_layer(self, shared_expert, shorthand, options):
        if shared_expert is not None:
            if options:
                raise ValueError(
                    "`shared_expert` is given: set its options on it. "
                    f"Received: {sorted(options)}"
                )
            return shared_expert
        if not options:
            return None
        options_lib.check_shared_expert_options(options)
        experts = self.experts
        return SharedExpert(
            activation=experts.activation,
            gated=experts.gated,
            use_bias=experts.use_bias,
            activation_dtype=experts.activation_dtype,
            swiglu_limit=experts.swiglu_limit,
            swiglu_alpha=experts.swiglu_alpha,
            # Its weights draw values of their own from the same initializer
            # (`SharedExpert` keys them `up/kernel`, ...).
            kernel_initializer=experts.kernel_initializer,
            bias_initializer=experts.bias_initializer,
            kernel_regularizer=experts.kernel_regularizer,
            bias_regularizer=experts.bias_regularizer,
            kernel_constraint=experts.kernel_constraint,
            bias_constraint=experts.bias_constraint,
            dtype=self.dtype_policy,
            name="shared_expert",
            **options,
        )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                "`MoEFeedForward` expects an input of rank >= 2 with a defined "
                f"last axis. Received: input_shape={input_shape}"
            )
        d = input_shape[-1]
        for sublayer in (self.router, self.experts, self.shared_expert):
            if sublayer is None:
                continue
            if not self.trainable:
                # Frozen before its sublayers were: their state stays too.
                sublayer.trainable = False
            if not sublayer.built:
                sublayer.build((None, d))
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: d})

    def call(self, inputs, mask=None, training=None, router_inputs=None):
        # Keras autocasts float inputs only; integer ones are computed as floats.
        inputs = ops.cast(inputs, self.compute_dtype)
        d = inputs.shape[-1]
        tokens = ops.reshape(inputs, (-1, d))
        router_tokens = tokens
        if router_inputs is not None:
            router_tokens = expert_functions.router_tokens(
                router_inputs, inputs, self.compute_dtype
            )
        if mask is not None:
            mask = ops.reshape(ops.broadcast_to(mask, ops.shape(inputs)[:-1]), (-1,))
        if training and self.router_jitter_noise:
            eps = self.router_jitter_noise
            noise = keras.random.uniform(
                ops.shape(tokens),
                minval=1.0 - eps,
                maxval=1.0 + eps,
                dtype=tokens.dtype,
                seed=self.seed_generator,
            )
            tokens = tokens * noise
            if router_inputs is None:
                router_tokens = tokens
        weights, indices = self.router(router_tokens, mask=mask, training=training)
        outputs = self.router.dispatch(
            tokens, weights, indices, self.experts, mask=mask, training=training
        )
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if mask is not None:
                shared = ops.where(ops.expand_dims(mask, -1), shared, 0)
            outputs = outputs + ops.cast(shared, outputs.dtype)
        # In the block's compute dtype, whatever dtype policy given sublayers
        # compute in (as `compute_output_spec` says).
        outputs = ops.cast(outputs, self.compute_dtype)
        return ops.reshape(outputs, ops.shape(inputs))

    @property
    def routing_stats(self):
        """The router's statistics of the last call (`BaseRouter.routing_stats`)."""
        return self.router.routing_stats

    def routing_stats_mean(self):
        """`BaseRouter.routing_stats_mean` of the router."""
        return self.router.routing_stats_mean()

    def reset_routing_stats(self):
        """`BaseRouter.reset_routing_stats` of the router."""
        self.router.reset_routing_stats()

    def load_legacy_variables(self, store, version):
        options_lib.load_variables(self, store)

    def __getattr__(self, name):
        # keras-moe 0.2.0's weight attributes (`expert_up_kernel`, ...), now
        # the sublayers'; not listed by `dir`, so saving does not visit them.
        if name in options_lib.MOVED_ATTRIBUTES:
            return options_lib.moved_attribute(self, name)
        parent = getattr(super(), "__getattr__", None)
        if parent is None:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
            )
        return parent(name)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {
            "seed": self.seed,
            "router_jitter_noise": self.router_jitter_noise,
            "experts": _serialize_sublayer(self.experts),
            "router": _serialize_sublayer(self.router),
            "shared_expert": _serialize_sublayer(self.shared_expert),
            "format_version": saved_formats.FORMAT_VERSION,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        version = saved_formats.config_format(config)
        if version < saved_formats.FORMAT_VERSION:
            config = options_lib.translate_config(config)
            layer = options_lib.quietly(lambda: cls(**config))
        else:
            for name in ("experts", "router", "shared_expert"):
                if config.get(name) is not None:
                    config[name] = keras.saving.deserialize_keras_object(config[name])
            layer = cls(**config)
        saved_formats.expect_format(layer, version)
        return layer


def _serialize_sublayer(layer):
    """A sublayer's config without its build config: the host builds it in
    its own `build`, so that its variables' paths lie under the host's."""
    if layer is None:
        return None
    config = keras.saving.serialize_keras_object(layer)
    config.pop("build_config", None)
    return config
