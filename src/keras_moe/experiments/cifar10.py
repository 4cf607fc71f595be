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

import dataclasses
import json
import pathlib
import shutil
import time

import keras
import numpy as np

from keras_moe import Conv2DMoE
from keras_moe import DenseMoE
from keras_moe.experiments import checks
from keras_moe.experiments import cifar10_results as results_lib
from keras_moe.experiments import common
from keras_moe.experiments import data as data_lib
from keras_moe.experiments import runs

DESCRIPTION = __doc__
MODELS = results_lib.MODELS
# The smallest image side the networks take: each of their two blocks is a
# "same" and a "valid" 3x3 convolution and a 2x2 pooling, so a side s leaves
# ((s - 2) // 2 - 2) // 2 pixels, none below 10.
MIN_IMAGE_SIZE = 10
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
        help="models to train",
    )
    parser.add_argument("--epochs", type=common.positive_int, default=16)
    parser.add_argument(
        "--repeats",
        type=common.positive_int,
        default=1,
        help="runs per model (the original used 4)",
    )
    parser.add_argument("--batch-size", type=common.positive_int, default=32)
    parser.add_argument("--learning-rate", type=common.positive_float, default=1e-4)
    parser.add_argument(
        "--decay",
        type=common.nonnegative_float,
        default=1e-6,
        help="Keras 2 style inverse-time decay per step: lr / (1 + decay * step)",
    )
    parser.add_argument(
        "--train-size",
        type=common.positive_int,
        default=None,
        help="random training subset size (default: all training images)",
    )
    parser.add_argument(
        "--test-size",
        type=common.positive_int,
        default=None,
        help="random test subset size (default: all test images)",
    )
    parser.add_argument(
        "--no-augmentation",
        dest="augmentation",
        action="store_false",
        help="train without random shifts and flips",
    )
    parser.add_argument(
        "--seed", type=common.nonnegative_int, default=0, help="seed of run r is seed+r"
    )
    parser.add_argument(
        "--verbose", type=int, default=1, choices=(0, 1, 2), help="Keras fit verbosity"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out: finished runs are kept, unfinished ones "
        "continue from their last finished epoch, runs another live process "
        "holds are left to it (so several processes can share one --out)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="train nothing: combine the finished runs of these output folders "
        "(one protocol, disjoint runs) into --out",
    )


def _conv(kind, filters, padding, width=1.0, gating_input="flatten"):
    if kind in ("cnn", "cnn-dense"):
        return keras.layers.Conv2D(
            max(1, round(filters * width)), 3, padding=padding, activation="relu"
        )
    return Conv2DMoE(
        filters,
        2,
        (3, 3),
        padding=padding,
        expert_activation="relu",
        gating_activation="softmax",
        gating_input=gating_input,
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
    gating_input = "pooled" if name == "moe-pooled" else "flatten"
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


def prepare(args):
    """Applies `--quick`'s settings, then checks what argparse cannot: all
    before any data is loaded or model built."""
    if args.quick:
        args.epochs = min(args.epochs, 1)
        args.repeats = 1
        args.train_size = min(args.train_size or 64, 64)
        args.test_size = min(args.test_size or 32, 32)
    if args.merge:
        if args.resume:
            checks.fail("--merge", "given without --resume (it trains nothing)", args)
        for folder in args.merge:
            if not str(folder) or not (pathlib.Path(folder) / "data.json").exists():
                checks.fail(
                    "--merge",
                    "output folders of `keras-moe cifar10` (with data.json and "
                    f"runs/), which {str(folder)!r} is not",
                    args,
                )
        return
    checks.existing_data(args)
    # `runs.EpochSeeds` seeds epoch e of run r with (--seed + r) * 1000 + e.
    checks.seeds(
        args,
        lambda seed: (seed + args.repeats - 1) * 1000 + args.epochs - 1,
        others=("--repeats", "--epochs"),
        rule="epoch e of run r is seeded with (--seed + r) * 1000 + e",
    )


def protocol_of(args):
    """What makes runs comparable: two folders with the same protocol merge."""
    return {
        "experiment": "cifar10",
        "backend": keras.backend.backend(),
        "data": None if args.data is None else str(args.data),
        **{key: getattr(args, key) for key in PROTOCOL_SETTINGS},
    }


PROTOCOL_SETTINGS = ("epochs", "batch_size", "learning_rate", "decay")
PROTOCOL_SETTINGS += ("train_size", "test_size", "augmentation", "seed")


def run(args):
    if args.merge:
        return merge(args)
    models = list(dict.fromkeys(args.models))
    out = pathlib.Path(args.out)
    protocol = protocol_of(args)
    if args.quick and not args.resume:
        shutil.rmtree(out / "runs", ignore_errors=True)  # smoke runs start afresh
    runs.check_protocol(out, protocol, args.resume)
    images = data_lib.load_cifar10(
        args.data, args.train_size, args.test_size, seed=args.seed
    )
    print(images.describe())
    smallest = min(images.x_train.shape[1:3])
    if smallest < MIN_IMAGE_SIZE:
        raise common.ExperimentError(
            f"`--data` must hold images of at least {MIN_IMAGE_SIZE} x "
            f"{MIN_IMAGE_SIZE} pixels (the networks pool twice after valid "
            f"convolutions). Received: images of shape {images.x_train.shape[1:]}"
        )
    runs.write_protocol(out, protocol)
    data = Data(
        x_train=images.x_train.astype("float32") / 255.0,
        y_train=images.y_train,
        x_test=images.x_test.astype("float32") / 255.0,
        y_test=images.y_test,
        n_classes=len(images.class_names),
    )
    head = results_head(args, images, data)
    common.write_json(out, head, "data.json")
    paths = []
    # Repeat-major, so that a long run that stops early has every model.
    for repeat in range(args.repeats):
        for name in models:
            folder = runs.run_dir(out, name, repeat)
            if runs.is_finished(folder):
                continue
            if not runs.claim(folder):
                print(f"== {name} run {repeat + 1}: another process trains it")
                continue
            try:
                if runs.is_finished(folder):  # finished while we looked
                    continue
                train_run(args, name, repeat, data, folder)
            finally:
                runs.release(folder)
            paths = results_lib.write_outputs(results_lib.assemble(out, head), out)
    paths = results_lib.write_outputs(results_lib.assemble(out, head), out)
    common.report_written(paths)
    results = json.loads((out / "results.json").read_text())
    results_lib.print_table(results, out)
    return results


@dataclasses.dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


def results_head(args, images, data):
    return common.new_results(
        "cifar10",
        args,
        data={
            "source": images.source,
            "train_images": len(data.x_train),
            "test_images": len(data.x_test),
            "image_shape": list(data.x_train.shape[1:]),
            "classes": list(images.class_names),
        },
        protocol=(
            f"{len(data.x_train)} training images, {len(data.x_test)} test images "
            f"(the validation data after every epoch), {args.epochs} epochs, batch "
            f"{args.batch_size}, RMSprop lr {args.learning_rate:g} / (1 + "
            f"{args.decay:g} step), "
            + (
                "shifts 10% + horizontal flips"
                if args.augmentation
                else "no augmentation"
            )
        ),
    )


def train_run(args, name, repeat, data, folder):
    """Trains one run, resuming it from its last finished epoch; writes run.json."""
    seed = args.seed + repeat
    width = None
    if name.startswith("cnn-wide"):
        width = wide_cnn_factor(data.x_train.shape[1:], data.n_classes, name)
    keras.utils.set_random_seed(seed)
    model = build_model(
        name, data.x_train.shape[1:], data.n_classes, args.augmentation, width=width
    )
    compile_model(model, args)
    state = runs.load_state(folder, model) or {
        "epochs_done": 0,
        "history": {},
        "step_seconds": [],
        "fit_seconds": 0.0,
    }
    done = state["epochs_done"]
    print(
        f"== {name} ({LABELS[name]}), run {repeat + 1}/{args.repeats}, "
        f"{common.count_params(model):,} parameters"
        + (f", resumed after epoch {done}" if done else "")
    )
    for epoch in range(done, args.epochs):
        order = runs.epoch_order(len(data.x_train), seed, epoch)
        timer = common.StepTimer()
        start = time.perf_counter()
        history = model.fit(
            data.x_train[order],
            data.y_train[order],
            batch_size=args.batch_size,
            initial_epoch=epoch,
            epochs=epoch + 1,
            validation_data=(data.x_test, data.y_test),
            validation_batch_size=max(args.batch_size, 256),
            shuffle=False,
            callbacks=[runs.EpochSeeds(seed), timer, runs.EpochProgress(args.epochs)],
            verbose=args.verbose,
        )
        state["fit_seconds"] += time.perf_counter() - start
        for key, values in history.history.items():
            state["history"].setdefault(key, []).extend(map(float, values))
        state["step_seconds"].append(timer.median_step_seconds())
        state["epochs_done"] = epoch + 1
        runs.save_state(folder, model, state)
    gating = sum(
        int(np.prod(w.shape)) for w in model.trainable_weights if "gating" in w.path
    )
    runs.finish(
        folder,
        {
            "model": name,
            "repeat": repeat,
            "seed": seed,
            "label": LABELS[name],
            "params": common.count_params(model),
            "gating_params": gating,
            "width_factor": width,
            "history": state["history"],
            "step_seconds_median": float(np.median(state["step_seconds"])),
            "fit_seconds": state["fit_seconds"],
            "backend": keras.backend.backend(),
            "date": common.now(),
        },
    )


def merge(args):
    """Combines the finished runs of several folders of one protocol into `--out`."""
    heads, records = [], {}
    for folder in args.merge:
        folder = pathlib.Path(folder)
        head = json.loads((folder / "data.json").read_text())
        if heads:
            for key in ("experiment", "backend", "data"):
                if head.get(key) != heads[0].get(key):
                    raise common.ExperimentError(
                        "`--merge` combines runs of one protocol only. Received: "
                        f"{key}={head.get(key)!r} in {str(folder)!r}, "
                        f"{heads[0].get(key)!r} before"
                    )
            for key in PROTOCOL_SETTINGS:
                if head["settings"].get(key) != heads[0]["settings"].get(key):
                    raise common.ExperimentError(
                        "`--merge` combines runs of one protocol only. Received: "
                        f"{key}={head['settings'].get(key)!r} in {str(folder)!r}, "
                        f"{heads[0]['settings'].get(key)!r} before"
                    )
        heads.append(head)
        for name, by_repeat in runs.finished_records(folder).items():
            for repeat, record in by_repeat.items():
                if (name, repeat) in records:
                    raise common.ExperimentError(
                        "`--merge` needs disjoint runs. Received: run "
                        f"{repeat} of {name!r} in {str(folder)!r} and "
                        f"{records[name, repeat][0]!r}"
                    )
                records[name, repeat] = (str(folder), record)
    out = pathlib.Path(args.out)
    for (name, repeat), (_, record) in records.items():
        folder = runs.run_dir(out, name, repeat)
        if runs.is_finished(folder) and runs.read_record(folder) != record:
            raise common.ExperimentError(
                f"`--out` already holds another run {repeat} of {name!r}. "
                f"Received: --out {str(out)!r}"
            )
    head = {
        **heads[0],
        "command": args.command_line,
        "parts": [
            {"folder": str(f), "command": h["command"], "date": h["date"]}
            for f, h in zip(args.merge, heads)
        ],
    }
    for (name, repeat), (_, record) in records.items():
        folder = runs.run_dir(out, name, repeat)
        folder.mkdir(parents=True, exist_ok=True)
        runs.finish(folder, record, keep_weights=False)
    common.write_json(out, head, "data.json")
    paths = results_lib.write_outputs(results_lib.assemble(out, head), out)
    common.report_written(paths)
    results = json.loads((out / "results.json").read_text())
    results_lib.print_table(results, out)
    return results
