"""The benchmark comparisons: each layer against its roofline, the original
formulation and its peers, at full size or at tiny size (for the tests).

A case is a dict: `name`, `title`, `baseline` (the variant ratios are taken
against), `variants` (a list of `harness.Variant`), `targets` (ratio targets
checked on the backends they name).

A roofline is the fastest dense computation of the layer's active FLOPs. For
the dense layers that is matmuls on 2-D `(tokens, d)` inputs (`roofline`):
on JAX, XLA:CPU runs the same FLOPs on 3-D `(batch, seq, d)` inputs 1.6-2.4x
slower forward+backward (the gated FFN of the `ffn` case: 226 against 95 ms),
so a 3-D baseline measures Keras's 3-D matmul, not the hardware. The
convolution rooflines are convolutions of the layer's own input.
"""

import keras
import numpy as np

import keras_moe
from benchmarks import formulations
from benchmarks import harness
from benchmarks import kerashub_families
from benchmarks.harness import Variant

MOE = {"expert_activation": "relu", "gating_activation": "softmax"}
SWEEP_EXPERTS = (1, 2, 4, 8, 16, 32, 64)

FULL = {
    "dense": {"batch": 1024, "dim": 512, "units": 512, "experts": 8},
    "dense_topk": {"batch": 4096, "dim": 256, "units": 256, "experts": 64, "k": 2},
    "conv1d": {"batch": 64, "spatial": (256,), "channels": 32, "filters": 32},
    "conv2d": {"batch": 64, "spatial": (32, 32), "channels": 32, "filters": 32},
    "conv3d": {"batch": 8, "spatial": (12, 12, 12), "channels": 16, "filters": 16},
    "ffn": {"batch": 16, "seq": 256, "dim": 256, "inter": 512, "experts": 16, "k": 2},
    "hub": {
        "batch": 4,
        "seq": 256,
        "layers": 2,
        "dim": 256,
        "inter": 512,
        "heads": 4,
        "kv_heads": 2,
        "vocabulary": 512,
        "k": 2,
        "experts": (8, 16),
    },
    "cifar": {"batch": 32, "shape": (32, 32, 3), "widths": (32, 64, 512)},
    "sweep": {"batch": 512, "dim": 128, "units": 128, "experts": SWEEP_EXPERTS},
}
TINY = {
    "dense": {"batch": 8, "dim": 8, "units": 4, "experts": 3},
    "dense_topk": {"batch": 16, "dim": 8, "units": 4, "experts": 4, "k": 2},
    "conv1d": {"batch": 2, "spatial": (8,), "channels": 3, "filters": 2},
    "conv2d": {"batch": 2, "spatial": (6, 6), "channels": 3, "filters": 2},
    "conv3d": {"batch": 2, "spatial": (4, 4, 4), "channels": 2, "filters": 2},
    "ffn": {"batch": 2, "seq": 4, "dim": 8, "inter": 8, "experts": 4, "k": 2},
    "hub": {
        "batch": 2,
        "seq": 4,
        "layers": 1,
        "dim": 32,
        "inter": 8,
        "heads": 4,
        "kv_heads": 2,
        "vocabulary": 32,
        "k": 2,
        "experts": (4,),
    },
    "cifar": {"batch": 4, "shape": (12, 12, 3), "widths": (4, 6, 16)},
    "sweep": {"batch": 8, "dim": 8, "units": 4, "experts": (1, 2)},
}


def _rand(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype("float32")


def tokens(x):
    """`x` as 2-D `(tokens, features)`, the shape a roofline multiplies."""
    return x.reshape(-1, x.shape[-1])


def roofline(build, x, note):
    """The `roofline` variant: the layer `build()` returns, on `tokens(x)`."""
    flat = tokens(x)
    rows, d = flat.shape
    return Variant(
        "roofline", lambda: (build(), flat), note=f"{note}, on 2-D ({rows}, {d})"
    )


def target(variant, over, mode, max_ratio=None, min_ratio=None, backends=("jax",)):
    """`variant`'s time / `over`'s time must be <= max_ratio (or >= min_ratio)."""
    return {
        "variant": variant,
        "over": over,
        "mode": mode,
        "max_ratio": max_ratio,
        "min_ratio": min_ratio,
        "backends": list(backends),
    }


def dense_soft(size):
    s = size["dense"]
    b, d, u, e = s["batch"], s["dim"], s["units"], s["experts"]
    x = _rand(b, d)
    return {
        "name": "dense_soft",
        "title": f"DenseMoE soft, batch {b}, {d}->{u}, {e} experts (relu, softmax)",
        "baseline": "roofline",
        "variants": [
            roofline(
                lambda: keras.layers.Dense(u * e),
                x,
                f"Dense({u * e}): one matmul of the same FLOPs",
            ),
            Variant(
                "keras_moe",
                lambda: (keras_moe.DenseMoE(u, e, **MOE), x),
                note="keras_moe.DenseMoE",
            ),
            Variant(
                "original",
                lambda: (formulations.OriginalDenseMoE(u, e, **MOE), x),
                note="original formulation: tensordot (b,u,e), repeat gates, sum",
            ),
        ],
        "targets": [
            target("keras_moe", "roofline", "forward_backward", max_ratio=1.4),
            target(
                "keras_moe",
                "original",
                "forward_backward",
                max_ratio=1.0,
                backends=("torch", "tensorflow"),
            ),
        ],
    }


def dense_top_k(size):
    s = size["dense_topk"]
    b, d, u, e, k = s["batch"], s["dim"], s["units"], s["experts"], s["k"]
    case = {
        "name": "dense_topk",
        "title": f"DenseMoE top-{k} of {e} experts, batch {b}, {d}->{u}",
        "baseline": "roofline",
    }
    x = _rand(b, d)
    return {
        **case,
        "variants": [
            roofline(
                lambda: keras.layers.Dense(k * u),
                x,
                f"Dense({k * u}): the active experts' FLOPs",
            ),
            Variant(
                "keras_moe_topk",
                lambda: (keras_moe.DenseMoE(u, e, top_k=k, **MOE), x),
                note=f"keras_moe.DenseMoE(top_k={k})",
            ),
            Variant(
                "keras_moe_topk_tiers",
                lambda: (
                    formulations.capacity_tiers(
                        keras_moe.DenseMoE(u, e, top_k=k, **MOE), x
                    ),
                    x,
                ),
                note="the same, dropless through the capacity tiers' ops.cond in "
                "training too (the layout before the blocks)",
            ),
            Variant(
                "keras_moe_topk_dmajor",
                lambda: (formulations.DimMajorTopKDenseMoE(u, e, top_k=k, **MOE), x),
                note="the same with the soft mixture's (d, e, u) kernel",
            ),
            Variant(
                "keras_moe_soft",
                lambda: (keras_moe.DenseMoE(u, e, **MOE), x),
                note=f"keras_moe.DenseMoE over all {e} experts",
            ),
        ],
        "targets": [
            target(
                "keras_moe_soft", "keras_moe_topk", "forward_backward", min_ratio=10
            ),
            target("keras_moe_topk", "roofline", "forward_backward", max_ratio=2.5),
        ],
    }


_CONV = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
_CONV_MOE = {1: "Conv1DMoE", 2: "Conv2DMoE", 3: "Conv3DMoE"}


def conv(size, rank):
    s = size[f"conv{rank}d"]
    b, spatial, c, f = s["batch"], s["spatial"], s["channels"], s["filters"]
    k = 2
    x = _rand(b, *spatial, c)
    cls = getattr(keras_moe, _CONV_MOE[rank])
    shape = "x".join(map(str, spatial))
    case = {
        "name": f"conv{rank}d",
        "title": f"{cls.__name__}, batch {b}, {shape}x{c} input, {f} filters x {k} "
        f"experts, kernel 3, same (relu, softmax, original gating)",
        "baseline": "roofline",
        "variants": [
            Variant(
                "roofline",
                lambda: (_CONV[rank](f * k, 3, padding="same"), x),
                note=f"Conv{rank}D({f * k}): one convolution of the same FLOPs",
            ),
            Variant(
                "keras_moe",
                lambda: (cls(f, k, 3, padding="same", **MOE), x),
                note=f"keras_moe.{cls.__name__}",
            ),
            Variant(
                "original",
                lambda: (
                    formulations.OriginalConvMoE(rank, f, k, 3, "same", **MOE),
                    x,
                ),
                note="original formulation: conv, dense gating, repeat, sum",
            ),
        ],
        "targets": [
            target(
                "keras_moe",
                "original",
                "forward_backward",
                max_ratio=1.0,
                backends=("torch", "tensorflow"),
            ),
        ],
    }
    if rank == 2:
        case["targets"].append(
            target("keras_moe", "roofline", "forward_backward", max_ratio=1.3)
        )
    return case


def feed_forward(size):
    s = size["ffn"]
    b, n, d, m, e, k = s["batch"], s["seq"], s["dim"], s["inter"], s["experts"], s["k"]
    case = {
        "name": "moe_feed_forward",
        "title": f"MoEFeedForward, {b * n} tokens, d={d}, m={m}, {e} experts, top-{k} "
        "(silu, gated, no bias)",
        "baseline": "roofline",
    }
    x = _rand(b, n, d)

    def moe(layout="auto"):
        return keras_moe.MoEFeedForward(
            m,
            e,
            top_k=k,
            activation="silu",
            gated=True,
            use_bias=False,
            load_balance_weight=0.0,
            layout=layout,
        )

    variants = [
        roofline(
            lambda: formulations.GatedFeedForward(d, k * m),
            x,
            f"dense gated FFN with k*m={k * m} units",
        ),
        Variant(
            "keras_ffn_3d",
            lambda: (formulations.GatedFeedForward(d, k * m), x),
            note=f"the same FFN on the ({b}, {n}, {d}) input, as a Keras user "
            "writes it (3-D matmuls; not a roofline)",
        ),
        Variant(
            "keras_moe",
            lambda: (moe(), x),
            note="keras_moe.MoEFeedForward",
        ),
        Variant(
            "keras_moe_tiers",
            lambda: (moe(layout="tiers"), x),
            note="the same, dropless through the capacity tiers' ops.cond in "
            "training too (the layout before the blocks)",
        ),
    ]
    try:
        from keras_hub.src.models.mixtral.mixtral_decoder import MixtralSparseMoeBlock
    except ImportError:
        MixtralSparseMoeBlock = None
    if MixtralSparseMoeBlock is not None:
        variants.append(
            Variant(
                "kerashub_mixtral",
                lambda: (
                    MixtralSparseMoeBlock(d, m, e, top_k=k, router_aux_loss_coef=0.0),
                    x,
                ),
                note="KerasHub MixtralSparseMoeBlock (runs every expert, masks)",
            )
        )
    return {
        **case,
        "variants": variants,
        "targets": [
            target("kerashub_mixtral", "keras_moe", "forward_backward", min_ratio=8),
            target("keras_moe", "roofline", "forward_backward", max_ratio=2.0),
        ],
    }


def cifar(size):
    s = size["cifar"]
    b = s["batch"]
    x = np.random.default_rng(0).uniform(size=(b, *s["shape"])).astype("float32")
    y = np.arange(b) % 10

    def compiled(factory):
        def build():
            model = factory(input_shape=s["shape"], widths=s["widths"])
            # jit_compile=True is torch.compile on torch: follow the torch mode.
            jit = (
                keras.backend.backend() != "torch" or harness.torch_mode() == "compile"
            )
            model.compile(
                keras.optimizers.Adam(1e-4),
                "sparse_categorical_crossentropy",
                jit_compile=jit,
            )
            return model, (x, y)

        return build

    return {
        "name": "cifar10",
        "title": f"CIFAR-10 networks, training step (train_on_batch, as fit), batch {b}",
        "baseline": "cnn",
        "variants": [
            Variant(
                "cnn",
                compiled(formulations.cifar10_cnn),
                note="original CIFAR-10 CNN",
                train_step=True,
            ),
            Variant(
                "moe",
                compiled(formulations.cifar10_moe),
                note="same with Conv2DMoE/DenseMoE, 2 experts",
                train_step=True,
            ),
        ],
        "targets": [target("moe", "cnn", "train_step", max_ratio=2.2)],
    }


def expert_sweep(size):
    """Time against n_experts for soft and top-2 routing (the plot)."""
    s = size["sweep"]
    b, d, u = s["batch"], s["dim"], s["units"]
    x = _rand(b, d)
    variants = [
        Variant("dense", lambda: (keras.layers.Dense(u), x), note=f"Dense({u})")
    ]
    for e in s["experts"]:
        variants.append(
            Variant(
                f"soft_{e}",
                lambda e=e: (keras_moe.DenseMoE(u, e, **MOE), x),
                note=f"DenseMoE soft, {e} experts",
            )
        )
        if e >= 2:
            variants.append(
                Variant(
                    f"top2_{e}",
                    lambda e=e: (keras_moe.DenseMoE(u, e, top_k=2, **MOE), x),
                    note=f"DenseMoE top-2, {e} experts",
                )
            )
    return {
        "name": "expert_sweep",
        "title": f"DenseMoE time against n_experts, batch {b}, {d}->{u}",
        "baseline": "dense",
        "variants": variants,
        "modes": ("forward_backward",),
        "targets": [],
    }


CASES = {
    "dense_soft": dense_soft,
    "dense_topk": dense_top_k,
    "conv1d": lambda size: conv(size, 1),
    "conv2d": lambda size: conv(size, 2),
    "conv3d": lambda size: conv(size, 3),
    "moe_feed_forward": feed_forward,
    **kerashub_families.CASES,
    "cifar10": cifar,
    "expert_sweep": expert_sweep,
}


def check_targets(case_result, backend):
    """Adds `checked` (value, pass) to each target that applies to `backend`."""
    checked = []
    for t in case_result.get("targets", []):
        if backend not in t["backends"]:
            continue
        variants = case_result["variants"]
        try:
            value = (
                variants[t["variant"]][t["mode"]]["median_s"]
                / variants[t["over"]][t["mode"]]["median_s"]
            )
        except (KeyError, ZeroDivisionError):
            checked.append({**t, "value": None, "passed": None})
            continue
        passed = True
        if t["max_ratio"] is not None:
            passed = passed and value <= t["max_ratio"]
        if t["min_ratio"] is not None:
            passed = passed and value >= t["min_ratio"]
        checked.append({**t, "value": value, "passed": passed})
    return checked
