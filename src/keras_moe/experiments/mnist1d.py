"""MNIST-1D: the paper's CNN baseline against the same network of Conv1DMoE layers.

MNIST-1D (Greydanus 2020, "Scaling down deep learning") is generated
procedurally by the `mnist1d` package (`make_dataset` with its default
arguments: 4,000 training and 1,000 test sequences of length 40, 10 classes;
nothing is downloaded). The paper's CNN: three stride-2 convolutions of 25
channels (kernel 5, 3, 3, zero padding 1, ReLU) and a linear layer on the
flattened 5 x 25 features, trained with Adam (lr 1e-2) on batches of 100 for
6,000 steps (150 epochs). The MoE network replaces every Conv1D by Conv1DMoE
(2 ReLU experts per filter, softmax gates); `moe-pooled` uses the layers'
pooled gating where available.
"""

import time

import keras
import numpy as np

from keras_moe import Conv1DMoE
from keras_moe.experiments import checks
from keras_moe.experiments import common
from keras_moe.experiments import data as data_lib

DESCRIPTION = __doc__
MODELS = ("cnn", "moe", "moe-pooled")
LABELS = {
    "cnn": "CNN (paper's baseline)",
    "moe": "Conv1DMoE network",
    "moe-pooled": "Conv1DMoE network, pooled gating",
}
# Test accuracies of the paper's Table (Greydanus 2020), for comparison.
PAPER = {
    "logistic regression": 0.32,
    "MLP": 0.68,
    "CNN": 0.94,
    "GRU": 0.91,
    "human": 0.96,
}


def add_arguments(parser):
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(MODELS), help="models"
    )
    parser.add_argument(
        "--epochs",
        type=common.positive_int,
        default=150,
        help="150 epochs = the paper's 6,000 steps",
    )
    parser.add_argument("--batch-size", type=common.positive_int, default=100)
    parser.add_argument("--learning-rate", type=common.positive_float, default=1e-2)
    parser.add_argument(
        "--repeats", type=common.positive_int, default=1, help="runs per model"
    )
    parser.add_argument(
        "--seed", type=common.nonnegative_int, default=0, help="seed of run r is seed+r"
    )
    parser.add_argument(
        "--verbose", type=int, default=2, choices=(0, 1, 2), help="Keras fit verbosity"
    )


def build_model(name, length=40, n_classes=10, channels=25):
    layers = [keras.Input((length,)), keras.layers.Reshape((length, 1))]
    for kernel_size in (5, 3, 3):
        layers.append(keras.layers.ZeroPadding1D(1))
        if name == "cnn":
            layers.append(
                keras.layers.Conv1D(channels, kernel_size, strides=2, activation="relu")
            )
        else:
            gating_input = "pooled" if name == "moe-pooled" else "flatten"
            layers.append(
                Conv1DMoE(
                    channels,
                    2,
                    kernel_size,
                    strides=2,
                    expert_activation="relu",
                    gating_activation="softmax",
                    gating_input=gating_input,
                )
            )
    layers += [keras.layers.Flatten(), keras.layers.Dense(n_classes)]
    return keras.Sequential(layers, name=f"mnist1d_{name.replace('-', '_')}")


def prepare(args):
    """Applies `--quick`'s settings, then checks what argparse cannot: all
    before any data is made or model built."""
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.repeats = 1
    checks.seeds(args, lambda seed: seed + args.repeats - 1)


def run(args):
    models = list(dict.fromkeys(args.models))
    x_train, y_train, x_test, y_test = data_lib.load_mnist1d()
    out = common.output_dir(args.out)
    print(
        f"MNIST-1D: {len(x_train)} training and {len(x_test)} test sequences "
        f"of length {x_train.shape[1]}"
    )
    results = common.new_results(
        "mnist1d",
        args,
        data={
            "generator": "mnist1d.data.make_dataset(get_dataset_args())",
            "train_sequences": len(x_train),
            "test_sequences": len(x_test),
            "length": int(x_train.shape[1]),
        },
        paper_test_accuracy=PAPER,
    )
    for name in models:
        final, histories, wall = [], [], []
        for repeat in range(args.repeats):
            keras.utils.set_random_seed(args.seed + repeat)
            model = build_model(name, x_train.shape[1])
            model.compile(
                optimizer=keras.optimizers.Adam(args.learning_rate),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            print(
                f"== {name} ({LABELS[name]}), run {repeat + 1}/{args.repeats}, "
                f"{common.count_params(model):,} parameters"
            )
            start = time.perf_counter()
            history = model.fit(
                x_train,
                y_train,
                batch_size=args.batch_size,
                epochs=args.epochs,
                validation_data=(x_test, y_test),
                verbose=args.verbose,
            )
            wall.append(time.perf_counter() - start)
            histories.append(
                {k: list(map(float, v)) for k, v in history.history.items()}
            )
            final.append(histories[-1]["val_accuracy"][-1])
        val = np.array([h["val_accuracy"] for h in histories])
        mean, se = common.mean_se(val)
        results["models"][name] = {
            "label": LABELS[name],
            "params": common.count_params(model),
            "test_accuracy": float(np.mean(final)),
            "test_accuracy_se": float(common.mean_se(final)[1]),
            "test_accuracy_runs": final,
            "val_accuracy_mean": mean,
            "val_accuracy_se": se,
            "fit_seconds": wall,
            "history": histories,
        }
    names = list(results["models"])
    pairs = [(name, "cnn") for name in names if name != "cnn"]
    pairs += [("moe-pooled", "moe")]
    results["comparisons"] = [
        common.welch(
            results["models"][a]["test_accuracy_runs"],
            results["models"][b]["test_accuracy_runs"],
            a,
            b,
        )
        for a, b in pairs
        if a in results["models"] and b in results["models"]
    ]
    paths = [
        common.write_json(out, results),
        plot(results, out / "mnist1d_test_accuracy.png"),
        common.write_text(out, "summary.md", summary(results)),
    ]
    common.report_written(paths)
    return results


def plot(results, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model in results["models"].values():
        mean = np.asarray(model["val_accuracy_mean"])
        se = np.asarray(model["val_accuracy_se"])
        epochs = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(epochs, mean, label=model["label"])
        ax.fill_between(
            epochs, mean - se, mean + se, color=line.get_color(), alpha=0.25
        )
    for label, accuracy in (("paper CNN", PAPER["CNN"]), ("human", PAPER["human"])):
        ax.axhline(accuracy, ls="--", lw=1, color="gray")
        ax.annotate(label, (1, accuracy), va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("epoch (40 steps of 100)")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"MNIST-1D, mean ± s.e. of {results['settings']['repeats']} run(s) "
        f"({results['backend']})"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(results):
    repeats = results["settings"]["repeats"]
    rows = []
    for name, m in results["models"].items():
        accuracy = f"{100 * m['test_accuracy']:.1f}%"
        if repeats > 1:
            accuracy += f" ± {100 * m['test_accuracy_se']:.1f}"
        rows.append([f"`{name}` {m['label']} (this run)", f"{m['params']:,}", accuracy])
    for label, accuracy in PAPER.items():
        rows.append([f"{label} (paper)", "", f"{100 * accuracy:.0f}%"])
    table = common.markdown_table(["model", "parameters", "test accuracy"], rows)
    comparisons = ""
    if results.get("comparisons"):
        comparisons = (
            "Differences of the last epoch's test accuracy (percentage points, "
            "Welch's 95% confidence interval and t-test over the runs):\n\n"
            + common.comparisons_table(results["comparisons"])
            + "\n\n"
        )
    return (
        "# MNIST-1D: CNN against Conv1DMoE\n\n"
        f"`{results['command']}`\n\n"
        f"Backend {results['backend']}, {results['date']}. "
        f"{results['settings']['epochs']} epochs of batch "
        f"{results['settings']['batch_size']}, Adam lr "
        f"{results['settings']['learning_rate']:g}, {repeats} run(s) per model; "
        "test accuracy after the last epoch (mean ± s.e. over runs).\n\n"
        f"{table}\n\n{comparisons}![test accuracy](mnist1d_test_accuracy.png)\n"
    )
