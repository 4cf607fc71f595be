"""Speed of the ways to mix `DenseMoE`'s experts (the choice in `routing.soft_mixture`).

`DenseMoE` soft computes every expert, `h` of shape `(n, e, u)`, then
`y[n, u] = sum_e g[n, e] * h[n, e, u]`. This script times, on the current
backend, side by side in one process and interleaved
(`benchmarks.harness.compare`, medians), forward and forward+backward:

- `layer`: `keras_moe.DenseMoE` as it is (on JAX the backend's einsum, on
  TensorFlow and PyTorch the `keras.ops` multiply-and-sum);
- `einsum`: the same layer mixing with `einsum("neu,ne->nu")`;
- `multiply_sum`: the same layer mixing with `sum(h * g[:, :, None], axis=1)`;
- `original`: the original formulation (`benchmarks.formulations`;
  baseline).

    python -m benchmarks.soft_mixing                  # current KERAS_BACKEND
    KERAS_BACKEND=tensorflow python -m benchmarks.soft_mixing --repeats 25

Steps as the harness compiles them: `jax.jit` on JAX,
`tf.function(jit_compile=True)` on TensorFlow, eager on PyTorch.
"""

import numpy as np
from keras import ops

from benchmarks import formulations
from benchmarks import harness
from keras_moe import DenseMoE
from keras_moe import routing

MOE = {"expert_activation": "relu", "gating_activation": "softmax"}

# n tokens, e experts, u units.
MIXINGS = {
    "einsum": lambda h, g: ops.einsum("neu,ne->nu", h, g),
    "multiply_sum": lambda h, g: ops.sum(h * ops.expand_dims(g, -1), axis=1),
}


class MixingDenseMoE(DenseMoE):
    """`DenseMoE` soft on 2-D inputs with the mixing named by `mixing`."""

    def __init__(self, *args, mixing, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixing = mixing

    def call(self, inputs, mask=None, training=None):
        logits = routing.gate_logits(inputs, self.gating_kernel, self.gating_bias)
        gates = routing.gate_values(logits, self.gating_activation)
        h = self.expert_outputs(inputs)
        return MIXINGS[self.mixing](h, ops.cast(gates, h.dtype))


def variants(batch, dim, units, experts):
    x = np.random.default_rng(0).standard_normal((batch, dim)).astype("float32")
    found = [
        harness.Variant("layer", lambda: (DenseMoE(units, experts, **MOE), x)),
        harness.Variant(
            "original",
            lambda: (formulations.OriginalDenseMoE(units, experts, **MOE), x),
        ),
    ]
    for mixing in MIXINGS:
        found.append(
            harness.Variant(
                mixing,
                lambda m=mixing: (MixingDenseMoE(units, experts, mixing=m, **MOE), x),
            )
        )
    return found


def main(argv=None):
    args, (batch, dim, units, experts) = harness.script_arguments(
        __doc__,
        argv,
        repeats=25,
        size="1024,512,512,8",
        size_help="batch,dim,units,experts (default: the suite's dense_soft case)",
    )
    result = harness.compare(
        variants(batch, dim, units, experts),
        "original",
        repeats=args.repeats,
        min_sample_s=args.min_sample_s,
    )
    print(
        f"backend={harness.BACKEND}, DenseMoE soft {batch}x{dim}->{units}, {experts} "
        f"experts; medians of {args.repeats}, ratios against `original`"
    )
    harness.print_ratios(result)
    return result


if __name__ == "__main__":
    main()
