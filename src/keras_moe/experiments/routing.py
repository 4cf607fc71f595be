"""Routing methods compared on a small V-MoE style ViT on CIFAR-10.

The network of `examples/vit_moe_cifar10.py`: 4x4 patches of a 32x32 image
(64 tokens), width 64, 4 pre-norm transformer blocks of 4 heads, whose odd
blocks' feed-forward (hidden 128) is a mixture of 8 experts; mean pooling
and a softmax head. Sized for 2 CPU cores: by default 4,000 training and
1,000 test images, 5 epochs, 3 repeats of each model. Only that mixture changes between the models, at equal
active compute (every token-expert pair of the experts costs the same):

- `token-choice`: `MoEFeedForward`, each token to its top-2 experts
  (dropless), with the load-balancing loss (weight 0.01);
- `token-choice-bias`: the same router balanced by a per-expert bias
  instead of a loss (DeepSeek-V3; `balance_bias_rate`, no auxiliary loss);
- `expert-choice`: `MoEFeedForward(routing="expert_choice")`, each expert
  takes its `2 * tokens / 8` tokens of highest score over the batch
  (Zhou et al. 2022);
- `soft-moe`: `SoftMoE` with `2 * 64 / 8 = 16` slots per expert, i.e. 128
  slot rows per image as token choice runs 64 x 2 (Puigcerver et al. 2023).

AdamW (learning rate 1e-3, weight decay 1e-4), batch 128, `jit_compile`,
the test subset as validation data after every epoch; `ExpertUsage`
records every MoE layer's per-expert load, dropped share and router
entropy per epoch. Reported: test accuracy and the busiest expert's load
(its share x 8: 1 is perfect balance, 8 total collapse) over training,
mean and standard error over the repeats.
"""

import time

import keras
import numpy as np

from keras_moe import MoEFeedForward
from keras_moe import SoftMoE
from keras_moe.callbacks import ExpertUsage
from keras_moe.experiments import checks
from keras_moe.experiments import common
from keras_moe.experiments import data as data_lib

DESCRIPTION = __doc__
HEADS = 4
PATCH_SIZE = 4
MODELS = ("token-choice", "token-choice-bias", "expert-choice", "soft-moe")
LABELS = {
    "token-choice": "token choice, top-2, load-balancing loss",
    "token-choice-bias": "token choice, top-2, bias balancing (no loss)",
    "expert-choice": "expert choice, capacity 2 tokens/expert on average",
    "soft-moe": "Soft MoE, 16 slots per expert",
}


def add_arguments(parser):
    parser.add_argument(
        "--data",
        default=None,
        help="folder or .tar.gz in image-folder layout (train/<class>/*.jpg, "
        "test/<class>/*.jpg), e.g. ../shared/data/cifar10-jpeg.tar.gz, read in "
        "place; default: keras.datasets.cifar10 (downloads once)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models"
    )
    parser.add_argument("--epochs", type=common.positive_int, default=5)
    common.add_repeats_argument(parser, 3, "runs per model")
    parser.add_argument(
        "--train-size",
        type=common.positive_int,
        default=4000,
        help="random training subset size",
    )
    parser.add_argument(
        "--test-size",
        type=common.positive_int,
        default=1000,
        help="random test subset size",
    )
    common.add_optimizer_arguments(parser, batch_size=128, learning_rate=1e-3)
    parser.add_argument(
        "--dim",
        type=common.positive_int,
        default=64,
        help=f"ViT width (the example's), a multiple of the {HEADS} heads",
    )
    parser.add_argument(
        "--depth",
        type=common.positive_int,
        default=4,
        help="transformer blocks (the odd ones are MoE), at least 2",
    )
    parser.add_argument("--n-experts", type=common.positive_int, default=8)
    parser.add_argument(
        "--top-k",
        type=common.positive_int,
        default=2,
        help="experts per token, at most --n-experts",
    )
    parser.add_argument(
        "--load-balance-weight",
        type=common.nonnegative_float,
        default=0.01,
        help="weight of the auxiliary loss of `token-choice`",
    )
    parser.add_argument(
        "--balance-bias-rate",
        type=common.positive_float,
        default=0.01,
        help="bias step per training step of `token-choice-bias`",
    )
    common.add_seed_argument(parser)
    parser.add_argument(
        "--verbose", type=int, default=2, choices=(0, 1, 2), help="Keras fit verbosity"
    )


def prepare(args):
    """Applies `--quick`'s settings, then checks what argparse cannot: all
    before any data is loaded or model built."""
    common.apply_quick(
        args, epochs=1, train_size=64, test_size=32, batch_size=32, dim=16, depth=2
    )
    checks.at_most(args, "--top-k", "--n-experts")
    checks.multiple_of(args, "--dim", HEADS, f"the width of {HEADS} attention heads")
    checks.at_least(args, "--depth", 2, "the odd blocks hold the mixtures")
    checks.existing_data(args)
    checks.seeds(args, lambda seed: seed + args.repeats - 1)


def slots_per_expert(n_tokens, top_k, n_experts):
    """Soft MoE's slots per expert at the compute of top-k token choice:
    `top_k * n_tokens / n_experts`, rounded (at least 1)."""
    return max(1, round(top_k * n_tokens / n_experts))


def moe_layer(name, args, mlp_dim, n_tokens, index):
    """The mixture of one odd block of model `name`."""
    layer_name = f"moe_{index}"
    if name == "soft-moe":
        return SoftMoE(
            mlp_dim,
            args.n_experts,
            slots_per_expert=slots_per_expert(n_tokens, args.top_k, args.n_experts),
            activation="gelu",
            name=layer_name,
        )
    if name == "token-choice":
        options = {"load_balance_weight": args.load_balance_weight}
    elif name == "token-choice-bias":
        options = {
            "load_balance_weight": 0.0,
            "balance_bias_rate": args.balance_bias_rate,
        }
    else:
        options = {
            "routing": "expert_choice",
            "capacity_factor": 1.0,
            "load_balance_weight": 0.0,
        }
    return MoEFeedForward(
        mlp_dim,
        args.n_experts,
        top_k=args.top_k,
        activation="gelu",
        name=layer_name,
        **options,
    )


def build_model(name, args, input_shape, n_classes, patch_size=PATCH_SIZE, heads=HEADS):
    """The ViT of `examples/vit_moe_cifar10.py` (`args.dim` wide,
    `args.depth` blocks) with model `name`'s mixture in its odd blocks
    (hidden size `2 * dim`), uncompiled."""
    dim, depth = args.dim, args.depth
    mlp_dim = 2 * dim
    height, width = input_shape[:2]
    n_tokens = (height // patch_size) * (width // patch_size)
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="patches")(x)
    x = keras.layers.Reshape((n_tokens, dim))(x)
    positions = keras.layers.Embedding(n_tokens, dim, name="positions")(
        keras.ops.arange(n_tokens)
    )
    x = x + positions
    for i in range(depth):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.MultiHeadAttention(heads, dim // heads)(h, h)
        x = x + h
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        if i % 2:
            h = moe_layer(name, args, mlp_dim, n_tokens, i)(h)
        else:
            h = keras.layers.Dense(mlp_dim, activation="gelu")(h)
            h = keras.layers.Dense(dim)(h)
        x = x + h
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=name.replace("-", "_"))


def expert_rows_per_image(name, args, n_tokens):
    """Rows the experts of one MoE layer run per image: the active compute."""
    if name == "soft-moe":
        return args.n_experts * slots_per_expert(n_tokens, args.top_k, args.n_experts)
    return args.top_k * n_tokens


def moe_names(model):
    return [
        layer.name
        for layer in model.layers
        if isinstance(layer, MoEFeedForward | SoftMoE)
    ]


def train_run(name, repeat, args, images):
    seed = common.seed_run(args, repeat)
    x_train = images.x_train.astype("float32")
    x_test = images.x_test.astype("float32")
    n_classes = len(images.class_names)
    model = build_model(name, args, x_train.shape[1:], n_classes)
    model.compile(
        keras.optimizers.AdamW(args.learning_rate, weight_decay=1e-4),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    print(
        f"== {name} ({LABELS[name]}), run {repeat + 1}/{args.repeats}, "
        f"{common.count_params(model):,} parameters"
    )
    timer = common.StepTimer()
    start = time.perf_counter()
    history = model.fit(
        x_train,
        images.y_train,
        validation_data=(x_test, images.y_test),
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[ExpertUsage(), timer],
        verbose=args.verbose,
    )
    history = {k: [float(v) for v in values] for k, values in history.history.items()}
    layers = {}
    for layer in moe_names(model):
        layers[layer] = {
            key: history.get(f"{layer}_{key}")
            for key in ("max_load", "dropped_fraction", "router_entropy")
        }
    return {
        "model": name,
        "repeat": repeat,
        "seed": seed,
        "params": common.count_params(model),
        "val_accuracy": history["val_accuracy"],
        "loss": history["loss"],
        "moe_layers": layers,
        "step_seconds_median": timer.median_step_seconds(),
        "fit_seconds": time.perf_counter() - start,
    }


def busiest_load(run):
    """Per epoch, the busiest expert's load x E averaged over the MoE
    layers; None where the layers report no load."""
    loads = [v["max_load"] for v in run["moe_layers"].values() if v["max_load"]]
    if not loads:
        return None
    return list(np.mean(np.asarray(loads, "float64"), axis=0))


def summarize(name, runs, args, n_tokens):
    val = np.array([r["val_accuracy"] for r in runs])
    mean, se = common.mean_se(val)
    final = val[:, -1]
    summary = {
        "label": LABELS[name],
        "runs": len(runs),
        "params": runs[0]["params"],
        "expert_rows_per_image": expert_rows_per_image(name, args, n_tokens),
        "step_seconds_median": float(
            np.median([r["step_seconds_median"] for r in runs])
        ),
        "test_accuracy": float(final.mean()),
        "test_accuracy_se": float(common.mean_se(final)[1]),
        "val_accuracy_mean": mean,
        "val_accuracy_se": se,
        "busiest_load_mean": None,
        "busiest_load_se": None,
        "history": runs,
    }
    loads = [busiest_load(r) for r in runs]
    if all(load is not None for load in loads):
        load_mean, load_se = common.mean_se(np.array(loads))
        summary["busiest_load_mean"] = load_mean
        summary["busiest_load_se"] = load_se
    for key in ("dropped_fraction", "router_entropy"):
        values = [
            layer[key][-1]
            for r in runs
            for layer in r["moe_layers"].values()
            if layer[key]
        ]
        summary[f"last_{key}"] = float(np.mean(values)) if values else None
    return summary


def run(args):
    models = list(dict.fromkeys(args.models))
    out = common.output_dir(args.out)
    images = data_lib.load_cifar10(
        args.data, args.train_size, args.test_size, seed=args.seed
    )
    print(images.describe())
    height, width = images.x_train.shape[1:3]
    n_tokens = (height // PATCH_SIZE) * (width // PATCH_SIZE)
    if not n_tokens:
        raise common.ExperimentError(
            f"`--data` must hold images of at least {PATCH_SIZE} x {PATCH_SIZE} "
            f"pixels (one patch). Received: images of shape {images.x_train.shape[1:]}"
        )
    results = common.new_results(
        "routing",
        args,
        data={
            "source": images.source,
            "train_images": len(images.x_train),
            "test_images": len(images.x_test),
            "image_shape": list(images.x_train.shape[1:]),
            "tokens_per_image": n_tokens,
        },
    )
    paths = []
    for name in models:
        runs = [train_run(name, r, args, images) for r in range(args.repeats)]
        results["models"][name] = summarize(name, runs, args, n_tokens)
        paths = common.write_outputs(out, results, plot, "routing.png", summary_text)
    common.report_written(paths)
    print()
    print(results_table(results))
    return results


def plot(results, path):
    plt = common.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 7.0), sharex=True)
    for model in results["models"].values():
        epochs = np.arange(1, len(model["val_accuracy_mean"]) + 1)
        label = f"{model['label']} ({model['runs']})"
        for ax, key in ((top, "val_accuracy"), (bottom, "busiest_load")):
            mean = model[f"{key}_mean"]
            if mean is None:
                continue
            mean, se = np.asarray(mean), np.asarray(model[f"{key}_se"])
            (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=label)
            ax.fill_between(
                epochs, mean - se, mean + se, color=line.get_color(), alpha=0.25
            )
    top.set_ylabel("test accuracy")
    top.set_title(
        f"ViT-MoE on CIFAR-10, {results['data']['train_images']} training images, "
        "mean ± s.e. of (n) runs",
        fontsize=9,
    )
    top.legend(fontsize=7)
    bottom.axhline(1.0, color="gray", ls=":", lw=1)
    bottom.set_ylabel("busiest expert's load x E\n(1 = balanced)")
    bottom.set_xlabel("epoch")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    common.replace_atomically(path, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    return path


def _cell(mean, se, runs, digits):
    if mean is None:
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {se:.{digits}f}" if runs > 1 else "")


def results_table(results):
    rows = []
    for name, m in results["models"].items():
        load = m["busiest_load_mean"]
        load_se = m["busiest_load_se"]
        dropped = m["last_dropped_fraction"]
        entropy = m["last_router_entropy"]
        rows.append(
            [
                f"`{name}` {m['label']}",
                f"{m['params']:,}",
                str(m["expert_rows_per_image"]),
                f"{1000 * m['step_seconds_median']:.0f}",
                str(m["runs"]),
                _cell(m["test_accuracy"], m["test_accuracy_se"], m["runs"], 4),
                _cell(
                    None if load is None else load[-1],
                    None if load is None else load_se[-1],
                    m["runs"],
                    2,
                ),
                "n/a" if load is None else f"{max(load):.2f}",
                "n/a" if dropped is None else f"{dropped:.3f}",
                "n/a" if entropy is None else f"{entropy:.2f}",
            ]
        )
    return common.markdown_table(
        [
            "model",
            "parameters",
            "expert rows per image and MoE layer",
            "train step (ms, median)",
            "runs",
            "test accuracy, last epoch (mean ± s.e.)",
            "busiest expert's load × E, last epoch",
            "… highest epoch",
            "dropped share, last epoch",
            "router entropy (nats), last epoch",
        ],
        rows,
    )


def summary_text(results):
    settings = results["settings"]
    return (
        "# Routing methods on a ViT-MoE, CIFAR-10\n\n"
        f"`{results['command']}`\n\n"
        f"Backend {results['backend']}, {results['date']}. Data: "
        f"{results['data']['source']}, {results['data']['train_images']} training "
        f"and {results['data']['test_images']} test images; "
        f"{settings['epochs']} epochs of batch {settings['batch_size']}, AdamW "
        f"lr {settings['learning_rate']:g}, {settings['n_experts']} experts, "
        f"top-{settings['top_k']} compute, {settings['repeats']} run(s) per model. "
        "Loads are the mean over each epoch's training steps of the busiest "
        "expert's share × E, averaged over the MoE layers. Step times are "
        "wall-clock medians on the machine that ran it (shared CPU cores: "
        "compare within this table only).\n\n"
        f"{results_table(results)}\n\n![accuracy and load](routing.png)\n"
    )
