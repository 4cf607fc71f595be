"""CIFAR-10: the original CNN against the same stack built from MoE layers.

Faithful to the original repository's experiment (itself Keras's
cifar10_cnn example): Conv 32-32, max-pool, dropout .25, Conv 64-64, max-pool,
dropout .25, Dense 512, dropout .5, softmax; the MoE network replaces every
Conv2D by Conv2DMoE and the Dense 512 by DenseMoE (2 experts, ReLU experts,
softmax gates). RMSprop, learning rate 1e-4 with Keras 2's `decay=1e-6`
(lr / (1 + 1e-6 * step)), batch 32, random shifts of 10% and horizontal flips
during training, the test set as validation data after every epoch.

Controlled models, beyond the original: `cnn-wide`, the CNN with every layer
widened by one factor until it has as many parameters as the MoE network (and
about 6 times the CNN's compute); `cnn-wide-dense`, the CNN with only its
Dense layer widened to the MoE's parameter count (the MoE's extra parameters
are mostly gating weights, which cost little compute, as a wide Dense does);
and `moe-pooled`, the MoE network whose conv gates read the spatial mean of
their input (`gating_input="pooled"`) instead of millions of weights on the
whole flattened input, with a DenseMoE(256, 2) head, so that it has about the
CNN's parameters (1.33M against 1.25M).

Long runs can be split: train disjoint `--models` in separate processes with
one protocol, then `--merge DIR ...` combines their results.json files.
"""

import inspect
import time

import keras
import numpy as np

from keras_moe import Conv2DMoE
from keras_moe import DenseMoE
from keras_moe.experiments import common
from keras_moe.experiments import data as data_lib

DESCRIPTION = __doc__
MODELS = ("cnn", "moe", "moe-pooled", "cnn-wide-dense", "cnn-wide")
LABELS = {
    "cnn": "CNN (original)",
    "moe": "MoE (original)",
    "moe-pooled": "MoE, pooled conv gating, DenseMoE(256) head",
    "cnn-wide-dense": "CNN, Dense widened to the MoE's parameters",
    "cnn-wide": "CNN, all layers widened to the MoE's parameters",
}


def add_arguments(parser):
    parser.add_argument(
        "--data",
        default=None,
        help="folder or .tar.gz in image-folder layout (train/<class>/*.jpg, "
        "test/<class>/*.jpg), e.g. ../shared/data/cifar10-jpeg.tar.gz; default: "
        "keras.datasets.cifar10 (downloads once)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=list(MODELS),
        help="models to train (moe-pooled only where Conv2DMoE has gating_input)",
    )
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per model (the original used 4)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--decay",
        type=float,
        default=1e-6,
        help="Keras 2 style inverse-time decay per step: lr / (1 + decay * step)",
    )
    parser.add_argument(
        "--train-size", type=int, default=None, help="random training subset size"
    )
    parser.add_argument(
        "--test-size", type=int, default=None, help="random test subset size"
    )
    parser.add_argument(
        "--no-augmentation",
        dest="augmentation",
        action="store_false",
        help="train without random shifts and flips",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of run r is seed+r")
    parser.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="train nothing: combine the results.json of these folders (runs of "
        "the same protocol with disjoint --models) into --out",
    )


def pooled_gating_available():
    return "gating_input" in inspect.signature(Conv2DMoE.__init__).parameters or (
        "gating_input" in inspect.signature(Conv2DMoE.__mro__[1].__init__).parameters
    )


def _conv(kind, filters, padding, width=1.0, gating_input=None):
    if kind in ("cnn", "cnn-dense"):
        return keras.layers.Conv2D(
            max(1, round(filters * width)), 3, padding=padding, activation="relu"
        )
    extra = {} if gating_input is None else {"gating_input": gating_input}
    return Conv2DMoE(
        filters,
        2,
        (3, 3),
        padding=padding,
        expert_activation="relu",
        gating_activation="softmax",
        **extra,
    )


def _dense(kind, units, width=1.0):
    if kind in ("cnn", "cnn-dense"):
        return keras.layers.Dense(max(1, round(units * width)), activation="relu")
    return DenseMoE(units, 2, expert_activation="relu", gating_activation="softmax")


def build_model(
    name, input_shape=(32, 32, 3), n_classes=10, augmentation=True, width=None
):
    """One of `MODELS`, uncompiled. `width` overrides the wide CNNs' factor."""
    kind = "cnn" if name.startswith("cnn") else "moe"
    if name.startswith("cnn-wide") and width is None:
        width = wide_cnn_factor(input_shape, n_classes, name)
    width = width or 1.0
    conv_width = 1.0 if name == "cnn-wide-dense" else width
    gating_input = "pooled" if name == "moe-pooled" else None
    layers = [keras.Input(input_shape)]
    if augmentation:
        layers += [
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
            keras.layers.RandomFlip("horizontal"),
        ]
    for filters in (32, 64):
        layers += [
            _conv(kind, filters, "same", conv_width, gating_input),
            _conv(kind, filters, "valid", conv_width, gating_input),
            keras.layers.MaxPooling2D(2),
            keras.layers.Dropout(0.25),
        ]
    layers += [
        keras.layers.Flatten(),
        # Half the units in moe-pooled's DenseMoE head: with 2 experts and cheap
        # pooled conv gates the network then has about the CNN's parameters.
        _dense(kind, 256 if name == "moe-pooled" else 512, width),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(n_classes, activation="softmax"),
    ]
    return keras.Sequential(layers, name=name.replace("-", "_"))


def cnn_params(input_shape, n_classes, conv_width=1.0, dense_width=1.0):
    """Parameters of the CNN with widened layers, counted without building it."""
    height, width, channels = input_shape
    c1, c2 = max(1, round(32 * conv_width)), max(1, round(64 * conv_width))
    units = max(1, round(512 * dense_width))
    for _ in range(2):  # same conv, valid conv, 2x2 pool
        height, width = (height - 2) // 2, (width - 2) // 2
    params = 0
    for c_in, c_out in ((channels, c1), (c1, c1), (c1, c2), (c2, c2)):
        params += 9 * c_in * c_out + c_out
    return params + (height * width * c2 + 1) * units + (units + 1) * n_classes


def wide_cnn_factor(input_shape=(32, 32, 3), n_classes=10, name="cnn-wide"):
    """The width factor of `name` with (about) the MoE network's parameters."""
    target = common.count_params(build_model("moe", input_shape, n_classes, False))

    def params(width):
        conv_width = 1.0 if name == "cnn-wide-dense" else width
        return cnn_params(tuple(input_shape), n_classes, conv_width, width)

    low, high = 1.0, 2.0
    while params(high) < target:
        low, high = high, high * 2
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if params(mid) < target else (low, mid)
    return round(high, 4)


def compile_model(model, args):
    schedule = keras.optimizers.schedules.InverseTimeDecay(
        args.learning_rate, decay_steps=1, decay_rate=args.decay
    )
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def apply_quick(args):
    if args.quick:
        args.epochs = min(args.epochs, 1)
        args.repeats = 1
        args.train_size = min(args.train_size or 64, 64)
        args.test_size = min(args.test_size or 32, 32)


def run(args):
    if args.merge:
        return merge(args)
    apply_quick(args)
    models = list(dict.fromkeys(args.models))
    if "moe-pooled" in models and not pooled_gating_available():
        print("moe-pooled skipped: this Conv2DMoE has no `gating_input`")
        models.remove("moe-pooled")
    out = common.output_dir(args.out)
    images = data_lib.load_cifar10(
        args.data, args.train_size, args.test_size, seed=args.seed
    )
    print(images.describe())
    x_train = images.x_train.astype("float32") / 255.0
    x_test = images.x_test.astype("float32") / 255.0
    y_train, y_test = images.y_train, images.y_test
    n_classes = len(images.class_names)
    results = common.new_results(
        "cifar10",
        args,
        data={
            "source": images.source,
            "train_images": len(x_train),
            "test_images": len(x_test),
            "image_shape": list(x_train.shape[1:]),
            "classes": list(images.class_names),
        },
        protocol=(
            f"{len(x_train)} training images, {len(x_test)} test images (the "
            f"validation data after every epoch), {args.epochs} epochs, "
            f"{args.repeats} run(s) per model, batch {args.batch_size}, RMSprop "
            f"lr {args.learning_rate:g} / (1 + {args.decay:g} step), "
            + (
                "shifts 10% + horizontal flips"
                if args.augmentation
                else "no augmentation"
            )
        ),
    )
    for name in models:
        width = None
        if name.startswith("cnn-wide"):
            width = wide_cnn_factor(x_train.shape[1:], n_classes, name)
        histories, step_seconds, wall = [], [], []
        for repeat in range(args.repeats):
            seed = args.seed + repeat
            keras.utils.set_random_seed(seed)
            model = build_model(
                name, x_train.shape[1:], n_classes, args.augmentation, width=width
            )
            compile_model(model, args)
            print(
                f"== {name} ({LABELS[name]}), run {repeat + 1}/{args.repeats}, "
                f"{common.count_params(model):,} parameters"
            )
            timer = common.StepTimer()
            start = time.perf_counter()
            history = model.fit(
                x_train,
                y_train,
                batch_size=args.batch_size,
                epochs=args.epochs,
                validation_data=(x_test, y_test),
                validation_batch_size=max(args.batch_size, 256),
                shuffle=True,
                callbacks=[timer],
                verbose=args.verbose,
            )
            wall.append(time.perf_counter() - start)
            histories.append(
                {k: list(map(float, v)) for k, v in history.history.items()}
            )
            step_seconds.append(timer.median_step_seconds())
        results["models"][name] = summarize_model(
            name, model, histories, step_seconds, wall, width
        )
        # Written after every model, so a long run that is stopped keeps its results.
        paths = write_outputs(results, out)
    common.report_written(paths)
    return results


PART_KEYS = ("experiment", "backend", "data", "protocol")
PART_SETTINGS = ("epochs", "repeats", "batch_size", "learning_rate", "decay")
PART_SETTINGS += ("train_size", "test_size", "augmentation", "seed", "data")


def merge(args):
    """Combines runs of one protocol with disjoint models into `args.out`."""
    import json
    import pathlib

    parts = []
    for folder in args.merge:
        path = pathlib.Path(folder) / "results.json"
        if not path.exists():
            raise ValueError(
                f"`--merge` needs results.json files. Received: {folder!r}"
            )
        parts.append(json.loads(path.read_text()))
    first = parts[0]
    merged = {**first, "models": {}, "parts": []}
    for folder, part in zip(args.merge, parts):
        for key in PART_KEYS:
            if part.get(key) != first.get(key):
                raise ValueError(
                    "`--merge` combines runs of one protocol only. Received: "
                    f"{key}={part.get(key)!r} in {folder!r}, {first.get(key)!r} before"
                )
        for key in PART_SETTINGS:
            if part["settings"].get(key) != first["settings"].get(key):
                raise ValueError(
                    "`--merge` combines runs of one protocol only. Received: "
                    f"{key}={part['settings'].get(key)!r} in {folder!r}, "
                    f"{first['settings'].get(key)!r} before"
                )
        for name, model in part["models"].items():
            if name in merged["models"]:
                raise ValueError(
                    f"`--merge` needs disjoint models. Received: {name!r} twice"
                )
            merged["models"][name] = model
        merged["parts"].append(
            {"folder": str(folder), "command": part["command"], "date": part["date"]}
        )
    order = {name: i for i, name in enumerate(MODELS)}
    merged["models"] = dict(
        sorted(merged["models"].items(), key=lambda item: order.get(item[0], 99))
    )
    merged["settings"]["models"] = list(merged["models"])
    merged["command"] = args.command_line
    paths = write_outputs(merged, common.output_dir(args.out))
    common.report_written(paths)
    return merged


def write_outputs(results, out):
    return [
        common.write_json(out, results),
        plot(results, out / "cifar10_val_accuracy.png"),
        common.write_text(out, "summary.md", summary(results)),
    ]


def summarize_model(name, model, histories, step_seconds, wall, width):
    val = np.array([h["val_accuracy"] for h in histories])  # (repeats, epochs)
    mean, se = common.mean_se(val)
    final = val[:, -1]
    gating = sum(
        int(np.prod(w.shape)) for w in model.trainable_weights if "gating" in w.path
    )
    return {
        "label": LABELS[name],
        "params": common.count_params(model),
        "gating_params": gating,
        "width_factor": width,
        "test_accuracy": float(final.mean()),
        "test_accuracy_se": float(common.mean_se(final)[1]),
        "test_accuracy_runs": final,
        "best_epoch_test_accuracy": float(mean.max()),
        "val_accuracy_mean": mean,
        "val_accuracy_se": se,
        "step_seconds_median": float(np.median(step_seconds)),
        "fit_seconds": wall,
        "history": histories,
    }


def plot(results, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model in results["models"].values():
        mean = np.asarray(model["val_accuracy_mean"])
        se = np.asarray(model["val_accuracy_se"])
        epochs = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=model["label"])
        ax.fill_between(
            epochs, mean - se, mean + se, color=line.get_color(), alpha=0.25
        )
    repeats = results["settings"]["repeats"]
    ax.set_xlabel("epoch")
    ax.set_ylabel("test (validation) accuracy")
    ax.set_title(
        f"CIFAR-10, {results['data']['train_images']} training images, "
        f"mean ± s.e. of {repeats} run(s)"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(results):
    rows = []
    for name, m in results["models"].items():
        accuracy = f"{m['test_accuracy']:.4f}"
        if results["settings"]["repeats"] > 1:
            accuracy += f" ± {m['test_accuracy_se']:.4f}"
        rows.append(
            [
                f"`{name}` {m['label']}",
                f"{m['params']:,}",
                f"{m['gating_params']:,}",
                f"{1000 * m['step_seconds_median']:.0f}",
                accuracy,
                f"{m['best_epoch_test_accuracy']:.4f}",
            ]
        )
    table = common.markdown_table(
        [
            "model",
            "parameters",
            "of them gating",
            "train step (ms, median)",
            "test accuracy, last epoch",
            "best epoch (mean)",
        ],
        rows,
    )
    commands = [part["command"] for part in results.get("parts", [])]
    commands.append(results["command"])
    return (
        "# CIFAR-10: CNN against MoE\n\n"
        + "".join(f"`{command}`\n\n" for command in commands)
        + f"Backend {results['backend']}, {results['date']}. Data: "
        f"{results['data']['source']}. Protocol: {results['protocol']}. "
        "Step times are wall-clock medians of `fit`'s training steps on the "
        "machine that ran it (shared CPU cores: compare within this table only).\n\n"
        f"{table}\n\n![validation accuracy](cifar10_val_accuracy.png)\n"
    )
