"""Speed of the convolutional gating modes and of the CondConv identity.

With linear experts (`expert_activation=None`) and `gating_input="pooled"`, a
`ConvNDMoE` runs its soft mixture as one convolution per sample with the
gate-mixed kernel (`mixed_kernel_outputs`) instead of every expert followed by
the mixture (the general path). This script times, per case, side by side in
one process and interleaved (`benchmarks.harness.compare`, medians):

- `mixed`: pooled gates, linear experts, mixed-kernel path
  (`mixed_kernel=True`; `None`, the default, takes it from
  `MIXED_KERNEL_MIN_EXPERTS` experts per filter, where these measurements
  found it faster);
- `general`: the same layer on the general path (`mixed_kernel=False`;
  baseline);
- `flatten`, `local`: the other gating modes (general path, linear experts).

    python -m benchmarks.conv_gating                       # current KERAS_BACKEND
    KERAS_BACKEND=torch python -m benchmarks.conv_gating --cases 0,3 --repeats 5

Forward+backward steps as the harness compiles them: `jax.jit` on JAX,
`tf.function(jit_compile=True)` on TensorFlow, eager on PyTorch.
"""

import argparse

import numpy as np

from benchmarks import harness
from keras_moe import Conv1DMoE
from keras_moe import Conv2DMoE

# (name, layer class, n_filters, n_experts_per_filter, kernel_size, input shape).
CASES = [
    ("cifar first 32x32x3 F32 K2", Conv2DMoE, 32, 2, 3, (32, 32, 32, 3)),
    ("cifar 32x32x32 F32 K2", Conv2DMoE, 32, 2, 3, (32, 32, 32, 32)),
    ("design 64x32x32x32 F32 K2", Conv2DMoE, 32, 2, 3, (64, 32, 32, 32)),
    ("16x16x64 F64 K4", Conv2DMoE, 64, 4, 3, (32, 16, 16, 64)),
    ("16x16x64 F64 K2", Conv2DMoE, 64, 2, 3, (32, 16, 16, 64)),
    ("16x16x16 F64 K4", Conv2DMoE, 64, 4, 3, (32, 16, 16, 16)),
    ("1d 256x64 F64 K4 k5", Conv1DMoE, 64, 4, 5, (32, 256, 64)),
    ("16x16x64 F32 K8", Conv2DMoE, 32, 8, 3, (32, 16, 16, 64)),
    ("cifar 32x32x32 F32 K8", Conv2DMoE, 32, 8, 3, (32, 32, 32, 32)),
]


def variant(name, cls, n_filters, n_experts, kernel_size, x, mode, mixed_kernel):
    def build():
        # `mixed_kernel=True` is refused where the path cannot run (not
        # pooled gates, or not linear experts); `False` keeps the general one.
        layer = cls(
            n_filters,
            n_experts,
            kernel_size,
            padding="same",
            gating_input=mode,
            gating_activation="softmax",
            mixed_kernel=mixed_kernel,
        )
        layer.build(x.shape)
        return layer, x

    return harness.Variant(name=name, build=build, note=mode)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated case numbers from 0 (default: all): "
        + ", ".join(f"{i} {case[0]}" for i, case in enumerate(CASES)),
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(
        f"backend={harness.BACKEND}, forward+backward, median of {args.repeats}; "
        "ratios against `general` (pooled gates, every expert, then the mixture)"
    )
    print(
        f"{'case':28s} {'general ms':>10s} {'mixed':>7s} {'flatten':>8s} {'local':>7s}"
    )
    chosen = [int(i) for i in args.cases.split(",")] if args.cases else None
    for name, cls, f, k, ks, shape in (
        case for i, case in enumerate(CASES) if chosen is None or i in chosen
    ):
        x = rng.normal(size=shape).astype("float32")
        variants = [
            variant("mixed", cls, f, k, ks, x, "pooled", True),
            variant("general", cls, f, k, ks, x, "pooled", False),
            variant("flatten", cls, f, k, ks, x, "flatten", False),
            variant("local", cls, f, k, ks, x, "local", False),
        ]
        result = harness.compare(
            variants, "general", modes=("forward_backward",), repeats=args.repeats
        )
        entries = {
            n: v.get("forward_backward", v) for n, v in result["variants"].items()
        }
        for n, entry in entries.items():
            if "ratio" not in entry:
                print(f"  {n}: {entry.get('error', 'no result')}")
        ratio = {n: entry.get("ratio", float("nan")) for n, entry in entries.items()}
        print(
            f"{name:28s} {entries['general'].get('median_s', float('nan')) * 1e3:10.1f} "
            f"{ratio['mixed']:7.2f} {ratio['flatten']:8.2f} {ratio['local']:7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
