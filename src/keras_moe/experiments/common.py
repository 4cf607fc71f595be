"""What every experiment shares: results.json, summaries, plots, timing, statistics."""

import argparse
import datetime
import json
import math
import os
import pathlib
import shlex
import sys
import time

import keras
import numpy as np


class ExperimentError(ValueError):
    """A run that cannot go ahead for a reason the user can fix (data, folders).

    `keras-moe` prints its message in one line, without a traceback.
    """


def _number(kind, low, strict, text):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}. Received: {text!r}"
        ) from None
    if value != value:
        raise argparse.ArgumentTypeError(f"must be finite. Received: {text!r}")
    if value < low or (strict and value == low):
        bound = f"{'>' if strict else '>='} {low:g}"
        raise argparse.ArgumentTypeError(f"must be {bound}. Received: {text!r}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1."""
    return _number(int, 0, True, text)


def nonnegative_int(text):
    """argparse type: an integer >= 0."""
    return _number(int, 0, False, text)


def positive_float(text):
    """argparse type: a finite number > 0."""
    value = _number(float, 0.0, True, text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite. Received: {text!r}")
    return value


def nonnegative_float(text):
    """argparse type: a finite number >= 0."""
    value = _number(float, 0.0, False, text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite. Received: {text!r}")
    return value


def add_repeats_argument(parser, default, help):
    """`--repeats`: how many runs of each model (or arm)."""
    parser.add_argument("--repeats", type=positive_int, default=default, help=help)


def add_seed_argument(parser):
    """`--seed`: run r is seeded with seed + r (`seed_run`)."""
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of run r is seed+r"
    )


def add_optimizer_arguments(parser, batch_size, learning_rate):
    """`--batch-size` and `--learning-rate`, with the experiment's defaults."""
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--learning-rate", type=positive_float, default=learning_rate)


def apply_quick(args, **limits):
    """With `--quick`: one run, and each named setting at most its limit."""
    if args.quick:
        args.repeats = 1
        for name, limit in limits.items():
            setattr(args, name, min(getattr(args, name), limit))


def seed_run(args, repeat):
    """Seeds Keras for run `repeat` (`--seed` + repeat); returns that seed."""
    seed = args.seed + repeat
    keras.utils.set_random_seed(seed)
    return seed


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def welch(a, b, name_a, name_b):
    """Mean difference a - b with Welch's 95% CI and two-sided t-test p-value."""
    from scipy import stats

    a, b = np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64")
    result = {
        "a": name_a,
        "b": name_b,
        "n_a": int(a.size),
        "n_b": int(b.size),
        "difference": float(a.mean() - b.mean()),
        "ci95": None,
        "p_value": None,
    }
    if a.size >= 2 and b.size >= 2 and (a.var() > 0 or b.var() > 0):
        test = stats.ttest_ind(a, b, equal_var=False)
        low, high = test.confidence_interval(0.95)
        result.update(ci95=[float(low), float(high)], p_value=float(test.pvalue))
    return result


def comparisons_table(comparisons):
    """Markdown table of `welch` results, in percentage points."""
    rows = [
        [
            f"`{c['a']}` − `{c['b']}`",
            f"{100 * c['difference']:+.2f}",
            f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]"
            if c["ci95"] is not None
            else "n/a",
            f"{c['p_value']:.3g}" if c["p_value"] is not None else "n/a",
            f"{c['n_a']} / {c['n_b']}",
        ]
        for c in comparisons
    ]
    return markdown_table(
        [
            "difference, last epoch",
            "points",
            "95% CI (Welch)",
            "Welch's t-test p",
            "runs",
        ],
        rows,
    )


def command_line(argv=None):
    """The command as a user would type it: `keras-moe <subcommand> ...`."""
    argv = sys.argv[1:] if argv is None else argv
    return shlex.join(["keras-moe", *argv])


def output_dir(path):
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_results(experiment, args, **extra):
    """The common head of `results.json`; experiments fill in `models`."""
    from keras_moe.version import __version__

    settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("run", "command_line", "subcommand", "parser")
        and not callable(value)
    }
    return {
        "experiment": experiment,
        "command": getattr(args, "command_line", None) or command_line(),
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "keras_moe_version": __version__,
        "date": now(),
        "settings": settings,
        **extra,
        "models": {},
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def replace_atomically(path, write):
    """Calls `write(tmp_path)`, then moves the file to `path` in one step, so
    that processes sharing an output folder never see half a file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(out, results, name="results.json"):
    text = json.dumps(_jsonable(results), indent=1) + "\n"
    return replace_atomically(pathlib.Path(out) / name, lambda p: p.write_text(text))


def write_text(out, name, text):
    text = text.rstrip() + "\n"
    return replace_atomically(pathlib.Path(out) / name, lambda p: p.write_text(text))


def write_outputs(out, results, plot, plot_name, summary):
    """Writes results.json, `plot(results, out / plot_name)` and summary.md
    (`summary(results)`) to `out`; returns their paths."""
    return [
        write_json(out, results),
        plot(results, pathlib.Path(out) / plot_name),
        write_text(out, "summary.md", summary(results)),
    ]


def report_written(paths):
    for path in paths:
        print(f"wrote {path}")


def mean_se(values, axis=0):
    """Mean and standard error (sample std / sqrt(n); 0 for one value)."""
    values = np.asarray(values, dtype="float64")
    n = values.shape[axis]
    mean = values.mean(axis=axis)
    if n < 2:
        return mean, np.zeros_like(mean)
    return mean, values.std(axis=axis, ddof=1) / math.sqrt(n)


def markdown_table(header, rows):
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training step (the batch `fit` hands the model).

    Steps include the host-side overhead `fit` adds; the first steps of a
    run also include compilation, which `median_step_seconds` skips.
    """

    def __init__(self):
        super().__init__()
        self.step_seconds = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_seconds.append(time.perf_counter() - self._start)

    def median_step_seconds(self, skip=5):
        steps = self.step_seconds[skip:] or self.step_seconds
        return float(np.median(steps)) if steps else float("nan")


def count_params(model):
    return int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
