"""Layer cost of each routing method against token choice, at equal active compute.

On `(batch, tokens, d)` inputs, timed on the current backend side by side in
one process and interleaved (`benchmarks.harness.compare`, medians), forward
and forward+backward, ratios against `token_choice`:

- `token_choice`: `MoEFeedForward` (top-k, dropless, load-balancing loss);
- `token_choice_bias`: the same with `balance_bias_rate` (the biased choice
  and, in training, the bias update) and no loss;
- `expert_choice`: `MoEFeedForward(routing="expert_choice",
  capacity_factor=1.0)`, each expert taking `top_k * n / E` of the batch's
  `n` tokens;
- `soft_moe`: `SoftMoE` with `top_k * tokens / E` slots per expert (as many
  expert rows per sequence as top-k token choice runs).

    python -m benchmarks.routers                       # current KERAS_BACKEND
    KERAS_BACKEND=tensorflow python -m benchmarks.routers --repeats 11

Steps as the harness compiles them: `jax.jit` on JAX,
`tf.function(jit_compile=True)` on TensorFlow, eager on PyTorch (unless
`KERAS_MOE_BENCH_TORCH=compile`).
"""

import numpy as np

from benchmarks import harness
from keras_moe import MoEFeedForward
from keras_moe import SoftMoE

BASELINE = "token_choice"


def layers(tokens, intermediate_dim, n_experts, top_k):
    """`{name: () -> layer}` of every router, at top-k's active compute."""
    common = {"top_k": top_k, "activation": "gelu"}
    slots = max(1, round(top_k * tokens / n_experts))
    return {
        "token_choice": lambda: MoEFeedForward(
            intermediate_dim, n_experts, load_balance_weight=0.01, **common
        ),
        "token_choice_bias": lambda: MoEFeedForward(
            intermediate_dim,
            n_experts,
            load_balance_weight=0.0,
            balance_bias_rate=1e-3,
            **common,
        ),
        "expert_choice": lambda: MoEFeedForward(
            intermediate_dim,
            n_experts,
            routing="expert_choice",
            capacity_factor=1.0,
            **common,
        ),
        "soft_moe": lambda: SoftMoE(
            intermediate_dim, n_experts, slots_per_expert=slots, activation="gelu"
        ),
    }


def variants(batch, tokens, dim, intermediate_dim, n_experts, top_k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, tokens, dim)).astype("float32")
    found = []
    for name, make in layers(tokens, intermediate_dim, n_experts, top_k).items():
        found.append(harness.Variant(name, lambda make=make: (make(), x)))
    return found


def main(argv=None):
    args, size = harness.script_arguments(
        __doc__,
        argv,
        repeats=11,
        size="16,64,64,128,8,2",
        size_help="batch,tokens,dim,intermediate_dim,experts,top_k (default: the "
        "routing experiment's ViT-MoE layer on a batch of 16 images)",
    )
    result = harness.compare(
        variants(*size),
        BASELINE,
        repeats=args.repeats,
        min_sample_s=args.min_sample_s,
    )
    result["size"] = dict(
        zip(
            ("batch", "tokens", "dim", "intermediate_dim", "experts", "top_k"),
            size,
        )
    )
    print(
        f"backend={harness.BACKEND}, size {args.size} "
        "(batch,tokens,dim,intermediate_dim,experts,top_k); medians of "
        f"{args.repeats}, ratios against `{BASELINE}`"
    )
    harness.print_ratios(result)
    return result


if __name__ == "__main__":
    main()
