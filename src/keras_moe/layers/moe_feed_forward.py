import keras
from keras import ops

from keras_moe import routing
from keras_moe import utils
from keras_moe.layers import expert_functions
from keras_moe.layers.base_feed_forward import BaseFeedForwardExperts
from keras_moe.layers.shared_expert import SharedExpert
from keras_moe.routing import gates
from keras_moe.routing import router as router_lib

ROUTERS = ("token_choice", "expert_choice")


@keras.saving.register_keras_serializable(package="keras_moe")
class MoEFeedForward(BaseFeedForwardExperts):
    """Sparse mixture-of-experts transformer feed-forward block.

    `y = sum_{j < k} w_j(x) * expert_{e_j(x)}(x)`, where `e_1..e_k` are the
    `top_k` experts of largest router logit `z = x . R (+ r)` and each expert
    is `down(act(x . gate) * (x . up))` when `gated`, else `down(act(x . up))`
    (with biases when `use_bias`). Only the chosen experts run: tokens are
    sorted by expert and each expert multiplies its own tokens
    (`keras_moe.routing`), so compute and memory grow with `top_k`, not with
    `n_experts`. The router is a `keras_moe.routing.TopKRouter` sublayer,
    `router`, created in `build()`; it runs in float32 (logits, softmax,
    top-k weights, losses) under any dtype policy, unless
    `router_dtype="compute"`.

    The options after `seed` reproduce the MoE blocks of published models
    (defaults: none of them):

    - Mixtral: `activation="silu", gated=True, use_bias=False,
      activation_dtype="float32", softmax_before_top_k=True` (and
      `router_jitter_noise`).
    - Qwen1.5/2-MoE and Qwen3.5-MoE: `gate_up_layout="concatenated"`, a shared
      expert (`shared_intermediate_dim`) behind a sigmoid gate
      (`shared_expert_gate=True`); Qwen3-MoE without the shared expert.
      `normalize_top_k` is their `norm_top_k_prob`.
    - GPT-OSS: `gate_up_layout="interleaved"`, `use_bias=True`,
      `router_bias=True`, `swiglu_limit=7.0` (the clamped SwiGLU
      `(clip(up, -7, 7) + 1) * g * sigmoid(1.702 * g)`, `g = min(gate, 7)`).
    - Gemma 4: `activation="gelu_tanh"`, `activation_dtype="float32"`,
      `expert_output_scale=True`, `router_input_norm=True` with the raw
      hidden states as `router_inputs`.

    `keras_moe.kerashub.sparsify` runs KerasHub's blocks with these experts.

    Args:
        intermediate_dim: Positive integer, hidden size `m` of each expert.
        n_experts: Positive integer, number of experts `E`.
        top_k: Integer from 1 to `n_experts`, experts per token.
        activation: Activation of the hidden layer (`"gelu"`), a Keras
            activation or `"gelu_tanh"` (GELU's tanh approximation).
        gated: Whether each expert is a gated linear unit (GLU).
        use_bias: Whether the experts have biases.
        router_bias: Whether the router has a bias.
        normalize_top_k: If `True`, the chosen experts' weights are the
            softmax over their logits (summing to one); if `False`, the full
            softmax's values at the chosen experts.
        capacity_factor: `None` (dropless, the default: no token is ever
            dropped) or a positive float: each expert takes at most
            `ceil(capacity_factor * tokens * top_k / n_experts)` assignments
            (`<= tokens`), the others are dropped (zero contribution).
        noisy_gating: Noisy top-k gating (Shazeer et al. 2017) in training:
            Gaussian noise of learned scale `softplus(x . W_noise)`.
        load_balance_weight: Weight of the load-balancing loss
            `E * sum_i f_i * P_i` (1.0 at perfect balance), added in training.
        router_z_loss_weight: Weight of the router z-loss
            `mean(logsumexp(z)^2)`, added in training.
        kernel_initializer: Initializer of the expert kernels (and the
            shared expert's); each kernel draws its own values, also from a
            seeded initializer (`keras_moe.utils.initializer_for`).
        bias_initializer: Initializer of the expert biases, each drawing its
            own values.
        router_initializer: Initializer of the router kernel.
        kernel_regularizer: Regularizer of the expert kernels.
        bias_regularizer: Regularizer of the expert biases.
        kernel_constraint: Constraint of the expert kernels.
        bias_constraint: Constraint of the expert biases.
        seed: Optional integer seed of the gating noise and the jitter.
        router_dtype: `"float32"` (the default, stable under mixed
            precision) or `"compute"` (as models that route in their compute
            dtype, e.g. KerasHub's): the dtype of the router's logits, softmax
            and top-k weights (`routing.TopKRouter`).
        softmax_before_top_k: `False`, the softmax over the top-k logits
            (GPT-OSS); `True`, the top-k of the full softmax, renormalised
            with `normalize_top_k` (Mixtral, Qwen, Gemma 4): the same
            weights, rounded differently in low precision.
        router_jitter_noise: Non-negative float `eps`: in training the inputs
            are multiplied by uniform noise from `[1 - eps, 1 + eps]` before
            the router and the experts see them (Mixtral's
            `router_jitter_noise`).
        router_input_norm: Whether the router sees its inputs RMS-normalised,
            divided by `sqrt(d)` and scaled by a learned per-feature vector
            `router_input_scale` (initialised to ones), as Gemma 4's router.
        router_norm_epsilon: Epsilon of that RMS normalisation.
        gate_up_layout: `"separate"` (`expert_gate_kernel`,
            `expert_up_kernel`), or one fused `expert_gate_up_kernel`
            `(E, d, 2m)`, gate columns first (`"concatenated"`, Qwen MoE) or
            alternating with up's (`"interleaved"`, GPT-OSS).
        gate_bias: With `gated`, `use_bias` and the separate layout: a gate
            bias `expert_gate_bias` too (a fused layout's bias covers it).
        activation_dtype: `None` (the compute dtype) or `"float32"`, the
            dtype the activation runs in (as KerasHub's Mixtral, Qwen3.5-MoE
            and Gemma 4 experts, and PyTorch's SiLU and GELU).
        swiglu_limit: `None`, or `L` for GPT-OSS's clamped SwiGLU (with
            `gated`, instead of `act(gate) * up`, `activation` unused):
            `(clip(up, -L, L) + 1) * g * sigmoid(swiglu_alpha * g)`,
            `g = min(gate, L)` (`L` = 7.0 in GPT-OSS).
        swiglu_alpha: The clamped SwiGLU's `alpha` (1.702 in GPT-OSS).
        expert_output_scale: Whether each expert's output is multiplied by a
            learned scale `expert_scale` `(E,)` (initialised to ones), as
            Gemma 4's `per_expert_scale`.
        shared_intermediate_dim: `None`, or the hidden size of a shared
            expert every token runs through besides its routed ones (Qwen
            MoE): a `SharedExpert` sublayer `shared_expert` with the routed
            experts' `activation`, `gated`, `use_bias` and activation options.
        shared_expert_gate: With a shared expert: whether its output is
            multiplied by `sigmoid(x . g)` (Qwen MoE's shared expert gate).
        router: `"token_choice"` (the default: each token picks its
            `top_k` experts, `routing.TopKRouter`) or `"expert_choice"`
            (Zhou et al. 2022, `routing.ExpertChoiceRouter`): each expert
            takes the `ceil(capacity_factor * top_k * n / E)` tokens of
            highest softmax score among all `n` unmasked tokens of the call
            (`capacity_factor=None` is 1.0, `top_k` the average experts per
            token; padding changes no real token's output) and a token none
            took gets zero. Balanced by
            construction: `load_balance_weight`, `normalize_top_k` and
            `softmax_before_top_k` do not apply. Not causal (a token's
            routing depends on later tokens): not for autoregressive
            decoding as it is.
        balance_bias_rate: Non-negative float; with token choice, loss-free
            balancing by a per-expert router bias moved by this much per
            training step (DeepSeek-V3, `routing.TopKRouter`). Usually with
            `load_balance_weight=0`.
        **kwargs: Base layer arguments (`name`, `dtype`, ...).

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

    Weights (expert axis first): `expert_up_kernel` `(E, d, m)`,
    `expert_gate_kernel` `(E, d, m)` (when gated), `expert_down_kernel`
    `(E, m, d)`, `expert_up_bias` `(E, m)`, `expert_down_bias` `(E, d)`; with
    a fused `gate_up_layout`, `expert_gate_up_kernel` `(E, d, 2m)` and
    `expert_gate_up_bias` `(E, 2m)` instead of the gate's and up's;
    `expert_gate_bias` `(E, m)` with `gate_bias`, `expert_scale` `(E,)` with
    `expert_output_scale`, `router_input_scale` `(d,)` with
    `router_input_norm`; the `router`'s `kernel` `(d, E)`, `bias` `(E,)`
    (with `router_bias`), `noise_kernel` `(d, E)` (with noisy gating) and
    non-trainable `routing_stats_last` and `routing_stats_sum` (see
    `routing_stats`); the `shared_expert`'s.

    Example:

    >>> import numpy as np
    >>> from keras_moe import MoEFeedForward
    >>> layer = MoEFeedForward(32, n_experts=4, top_k=2)
    >>> tuple(layer(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
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
        intermediate_dim,
        n_experts,
        top_k=2,
        activation="gelu",
        gated=False,
        use_bias=True,
        router_bias=False,
        normalize_top_k=True,
        capacity_factor=None,
        noisy_gating=False,
        load_balance_weight=0.01,
        router_z_loss_weight=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        router_initializer="glorot_uniform",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        seed=None,
        router_dtype="float32",
        softmax_before_top_k=False,
        router_jitter_noise=0.0,
        router_input_norm=False,
        router_norm_epsilon=1e-6,
        gate_up_layout="separate",
        gate_bias=False,
        activation_dtype=None,
        swiglu_limit=None,
        swiglu_alpha=1.702,
        expert_output_scale=False,
        shared_intermediate_dim=None,
        shared_expert_gate=False,
        router="token_choice",
        balance_bias_rate=0.0,
        **kwargs,
    ):
        super().__init__(
            intermediate_dim=intermediate_dim,
            n_experts=n_experts,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            gate_up_layout=gate_up_layout,
            gate_bias=gate_bias,
            activation_dtype=activation_dtype,
            swiglu_limit=swiglu_limit,
            swiglu_alpha=swiglu_alpha,
            expert_output_scale=expert_output_scale,
            **kwargs,
        )
        self.router_bias = utils.check_bool("router_bias", router_bias)
        self.router_initializer = utils.get_initializer(
            "router_initializer", router_initializer
        )
        self.top_k = utils.check_positive_int("top_k", top_k)
        if self.top_k > self.n_experts:
            raise ValueError(
                "`top_k` must be an integer from 1 to `n_experts`. "
                f"Received: top_k={top_k}, n_experts={n_experts}"
            )
        self.normalize_top_k = utils.check_bool("normalize_top_k", normalize_top_k)
        self.capacity_factor = None
        if capacity_factor is not None:
            self.capacity_factor = utils.check_positive_float(
                "capacity_factor", capacity_factor
            )
        self.noisy_gating = utils.check_bool("noisy_gating", noisy_gating)
        self.load_balance_weight = utils.check_non_negative_float(
            "load_balance_weight", load_balance_weight
        )
        self.router_z_loss_weight = utils.check_non_negative_float(
            "router_z_loss_weight", router_z_loss_weight
        )
        self.seed = None
        if seed is not None:
            self.seed = utils.check_positive_int("seed", seed, minimum=0)
        self.router_dtype = utils.check_choice(
            "router_dtype", router_dtype, gates.ROUTER_DTYPES
        )
        self.softmax_before_top_k = utils.check_bool(
            "softmax_before_top_k", softmax_before_top_k
        )
        self.router_jitter_noise = utils.check_non_negative_float(
            "router_jitter_noise", router_jitter_noise
        )
        if self.router_jitter_noise >= 1.0:
            raise ValueError(
                "`router_jitter_noise` must be a number from 0 to 1 (the noise "
                "factors lie in [1 - eps, 1 + eps]). "
                f"Received: router_jitter_noise={router_jitter_noise!r}"
            )
        self.router_input_norm = utils.check_bool(
            "router_input_norm", router_input_norm
        )
        self.router_norm_epsilon = utils.check_positive_float(
            "router_norm_epsilon", router_norm_epsilon
        )
        self.shared_intermediate_dim = utils.check_optional_positive_int(
            "shared_intermediate_dim", shared_intermediate_dim
        )
        self.shared_expert_gate = utils.check_bool(
            "shared_expert_gate", shared_expert_gate
        )
        if self.shared_expert_gate and self.shared_intermediate_dim is None:
            raise ValueError(
                "`shared_expert_gate` gates the shared expert: it needs "
                "`shared_intermediate_dim`. Received: shared_expert_gate=True, "
                "shared_intermediate_dim=None"
            )
        # `router` names the method; the attribute `router` is the sublayer.
        self.router_type = utils.check_choice("router", router, ROUTERS)
        self.balance_bias_rate = utils.check_non_negative_float(
            "balance_bias_rate", balance_bias_rate
        )
        if self.router_type == "expert_choice":
            for name, value, default in (
                ("balance_bias_rate", self.balance_bias_rate, 0.0),
                ("noisy_gating", self.noisy_gating, False),
                ("router_dtype", self.router_dtype, "float32"),
            ):
                if value != default:
                    raise ValueError(
                        f"`{name}` applies to `router='token_choice'` only. "
                        f"Received: {name}={value!r}, router='expert_choice'"
                    )
        self.seed_generator = None
        if self.router_jitter_noise:
            self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.router = None
        self.shared_expert = None
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                "`MoEFeedForward` expects an input of rank >= 2 with a defined "
                f"last axis. Received: input_shape={input_shape}"
            )
        d = input_shape[-1]
        if self.router_type == "expert_choice":
            self.router = routing.ExpertChoiceRouter(
                n_experts=self.n_experts,
                top_k=self.top_k,
                capacity_factor=self.capacity_factor,
                router_z_loss_weight=self.router_z_loss_weight,
                use_bias=self.router_bias,
                kernel_initializer=self.router_initializer,
                dtype=self.dtype_policy,
                name="router",
            )
        else:
            self.router = routing.TopKRouter(
                n_experts=self.n_experts,
                top_k=self.top_k,
                normalize_top_k=self.normalize_top_k,
                capacity_factor=self.capacity_factor,
                noisy_gating=self.noisy_gating,
                load_balance_weight=self.load_balance_weight,
                router_z_loss_weight=self.router_z_loss_weight,
                use_bias=self.router_bias,
                kernel_initializer=self.router_initializer,
                seed=self.seed,
                softmax_before_top_k=self.softmax_before_top_k,
                router_dtype=self.router_dtype,
                balance_bias_rate=self.balance_bias_rate,
                dtype=self.dtype_policy,
                name="router",
            )
        self.router.trainable = self.trainable  # a frozen layer's state stays
        self.router.build((None, d))
        self.build_experts(d)
        self.router_input_scale = None
        if self.router_input_norm:
            self.router_input_scale = self.add_weight(
                name="router_input_scale", shape=(d,), initializer="ones"
            )
        if self.shared_intermediate_dim is not None:
            self.shared_expert = SharedExpert(
                self.shared_intermediate_dim,
                activation=self.activation,
                gated=self.gated,
                use_bias=self.use_bias,
                output_gate=self.shared_expert_gate,
                activation_dtype=self.activation_dtype,
                swiglu_limit=self.swiglu_limit,
                swiglu_alpha=self.swiglu_alpha,
                # Drawn apart from the experts' weights.
                kernel_initializer=utils.initializer_for(
                    self.kernel_initializer, "shared_expert"
                ),
                bias_initializer=utils.initializer_for(
                    self.bias_initializer, "shared_expert"
                ),
                kernel_regularizer=self.kernel_regularizer,
                bias_regularizer=self.bias_regularizer,
                kernel_constraint=self.kernel_constraint,
                bias_constraint=self.bias_constraint,
                dtype=self.dtype_policy,
                name="shared_expert",
            )
            self.shared_expert.build((None, d))
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: d})

    def call(self, inputs, mask=None, training=None, router_inputs=None):
        # Keras autocasts float inputs only; integer ones are computed as floats.
        inputs = ops.cast(inputs, self.compute_dtype)
        d = self.expert_down_kernel.shape[-1]
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
        if self.router_input_scale is not None:
            router_tokens = expert_functions.normalized_router_inputs(
                router_tokens, self.router_input_scale, self.router_norm_epsilon
            )
        weights, chosen = self.router(router_tokens, mask=mask, training=training)
        experts = chosen
        if self.router_type == "expert_choice":
            # `chosen` holds each expert's tokens; row `(e, j)` is expert `e`'s.
            rows = ops.expand_dims(ops.arange(self.n_experts, dtype="int32"), 1)
            experts = ops.broadcast_to(rows, ops.shape(chosen))
        weights = self.scale_weights(weights, experts)
        outputs = self.router.dispatch(
            tokens, weights, chosen, self.run_experts, mask, training
        )
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if mask is not None:
                shared = ops.where(ops.expand_dims(mask, -1), shared, 0)
            outputs = outputs + ops.cast(shared, outputs.dtype)
        return ops.reshape(outputs, ops.shape(inputs))

    @property
    def routing_stats(self):
        """The router's statistics of the last call (`TopKRouter.routing_stats`)."""
        if self.router is None:
            raise ValueError(
                "`MoEFeedForward` has no routing statistics before it is built "
                "and called. Received: built=False"
            )
        return self.router.routing_stats

    def routing_stats_mean(self):
        """`TopKRouter.routing_stats_mean` of the router (None before a call)."""
        return None if self.router is None else self.router.routing_stats_mean()

    def reset_routing_stats(self):
        """`TopKRouter.reset_routing_stats` of the router."""
        if self.router is not None:
            self.router.reset_routing_stats()

    def load_own_variables(self, store):
        router = self.router
        legacy = [router.kernel, router.bias, self.expert_up_kernel]
        legacy += [self.expert_gate_kernel, self.expert_down_kernel]
        noise_kernel = getattr(router, "noise_kernel", None)
        legacy += [self.expert_up_bias, self.expert_down_bias, noise_kernel]
        legacy = [v for v in legacy if v is not None]
        legacy += [router.routing_stats_last, router.routing_stats_sum]
        router_lib.load_own_variables(self, store, legacy)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = {
            "router_bias": self.router_bias,
            "router_initializer": keras.initializers.serialize(self.router_initializer),
            "top_k": self.top_k,
            "normalize_top_k": self.normalize_top_k,
            "capacity_factor": self.capacity_factor,
            "noisy_gating": self.noisy_gating,
            "load_balance_weight": self.load_balance_weight,
            "router_z_loss_weight": self.router_z_loss_weight,
            "seed": self.seed,
            "router_dtype": self.router_dtype,
            "softmax_before_top_k": self.softmax_before_top_k,
            "router_jitter_noise": self.router_jitter_noise,
            "router_input_norm": self.router_input_norm,
            "router_norm_epsilon": self.router_norm_epsilon,
            "shared_intermediate_dim": self.shared_intermediate_dim,
            "shared_expert_gate": self.shared_expert_gate,
            "router": self.router_type,
            "balance_bias_rate": self.balance_bias_rate,
        }
        return {**super().get_config(), **config}
