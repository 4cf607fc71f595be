"""Jacobian spectra: a Dense ReLU layer against DenseMoE with K ReLU experts.

The original repository's second experiment. For random inputs x (standard
normal, `--dim` features, `--samples` of them) and freshly initialised layers,
the Jacobian dy/dx of each sample is computed (`keras_moe.backend.batch_jacobian`:
JAX jacrev+vmap, torch.func.jacrev, TensorFlow batch_jacobian), its singular
values sorted in decreasing order and averaged over the samples. A ReLU layer's
Jacobian diag(relu'(Wx)) W has rank at most its active units; a mixture of
experts adds up differently masked experts and the gates' own derivative.
"""

import warnings

import keras
import numpy as np

from keras_moe import backend
from keras_moe.experiments import checks
from keras_moe.experiments import common
from keras_moe.layers import DenseMoE

DESCRIPTION = __doc__


def add_arguments(parser):
    parser.add_argument(
        "--dim", type=common.positive_int, default=128, help="input dimension"
    )
    parser.add_argument(
        "--units", type=common.positive_int, default=128, help="output units"
    )
    parser.add_argument(
        "--samples", type=common.positive_int, default=250, help="random input samples"
    )
    parser.add_argument(
        "--experts",
        type=common.positive_int,
        nargs="+",
        default=[1, 2, 5, 10, 20],
        help="numbers of experts K of the DenseMoE layers",
    )
    parser.add_argument(
        "--seed",
        type=common.nonnegative_int,
        default=0,
        help="seed of inputs and weights",
    )


def build_layers(args):
    """`{name: layer}`: the Dense baseline and one DenseMoE per K."""
    layers = {"Dense relu": keras.layers.Dense(args.units, activation="relu")}
    # K=1 is a softmax over one expert (a gate of 1) on purpose: the Dense limit.
    warnings.filterwarnings("ignore", message="You are using a softmax over axis")
    for k in args.experts:
        layers[f"DenseMoE K={k}"] = DenseMoE(
            args.units, k, expert_activation="relu", gating_activation="softmax"
        )
    for layer in layers.values():
        layer.build((None, args.dim))
    return layers


def spectrum_summary(mean_spectrum, tolerance=1e-6):
    """Effective rank exp(H(s/sum s)) (Roy & Vetterli 2007), numerical rank, ratios."""
    s = np.asarray(mean_spectrum, dtype="float64")
    p = s / s.sum()
    p = p[p > 0]
    effective_rank = float(np.exp(-(p * np.log(p)).sum()))
    numerical_rank = int((s > tolerance * s[0]).sum())
    return {
        "effective_rank": effective_rank,
        "numerical_rank": numerical_rank,
        "largest": float(s[0]),
        "smallest": float(s[-1]),
        "largest_over_smallest": float(s[0] / s[-1]) if s[-1] > 0 else float("inf"),
        "largest_over_median": float(s[0] / np.median(s)),
    }


def prepare(args):
    """Applies `--quick`'s settings, then checks what argparse cannot: all
    before any layer is built."""
    if args.quick:
        args.samples = min(args.samples, 16)
        args.experts = args.experts[:2]
    checks.seeds(args, lambda seed: seed, others=(), rule="the one seed of the run")


def run(args):
    keras.utils.set_random_seed(args.seed)
    out = common.output_dir(args.out)
    x = np.random.default_rng(args.seed).standard_normal((args.samples, args.dim))
    x = keras.ops.convert_to_tensor(x.astype("float32"))
    results = common.new_results(
        "jacobian", args, inputs=f"standard normal, shape {(args.samples, args.dim)}"
    )
    for name, layer in build_layers(args).items():
        jacobians = keras.ops.convert_to_numpy(
            backend.batch_jacobian(lambda x, layer=layer: layer(x), x)
        )
        singular_values = np.linalg.svd(
            jacobians.astype("float64"), compute_uv=False
        )  # (samples, min(units, dim)), decreasing
        mean, se = common.mean_se(singular_values)
        results["models"][name] = {
            "params": common.count_params(layer),
            "mean_singular_values": mean,
            "se_singular_values": se,
            **spectrum_summary(mean),
        }
        print(f"{name}: effective rank {results['models'][name]['effective_rank']:.1f}")
    paths = [
        common.write_json(out, results),
        plot(results, out / "jacobian_spectra.png"),
        common.write_text(out, "summary.md", summary(results)),
    ]
    common.report_written(paths)
    return results


def plot(results, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, model in results["models"].items():
        spectrum = np.asarray(model["mean_singular_values"])
        ax.plot(np.arange(1, len(spectrum) + 1), spectrum, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index (sorted)")
    ax.set_ylabel(f"mean singular value over {results['settings']['samples']} inputs")
    ax.set_title(
        f"Jacobian spectra, {results['settings']['dim']} -> "
        f"{results['settings']['units']} ({results['backend']})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(results):
    rows = [
        [
            name,
            f"{m['params']:,}",
            f"{m['effective_rank']:.1f}",
            m["numerical_rank"],
            f"{m['largest']:.3g}",
            f"{m['smallest']:.3g}",
            f"{m['largest_over_median']:.3g}",
        ]
        for name, m in results["models"].items()
    ]
    table = common.markdown_table(
        [
            "layer",
            "params",
            "effective rank",
            "numerical rank (s > 1e-6 s_max)",
            "largest s",
            "smallest s",
            "largest / median",
        ],
        rows,
    )
    return (
        "# Jacobian spectra\n\n"
        f"`{results['command']}` (backend {results['backend']}, {results['date']})\n\n"
        f"Inputs: {results['inputs']}. Singular values of each sample's Jacobian, "
        "sorted, averaged over samples; the effective rank is exp of the entropy "
        "of the normalised mean spectrum.\n\n"
        f"{table}\n\n![spectra](jacobian_spectra.png)\n"
    )
