"""What every experiment shares: results.json, summaries, plots, timing, statistics."""

import datetime
import json
import math
import pathlib
import shlex
import sys
import time

import keras
import numpy as np


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
        if key not in ("run", "command_line", "subcommand") and not callable(value)
    }
    return {
        "experiment": experiment,
        "command": getattr(args, "command_line", None) or command_line(),
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "keras_moe_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
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


def write_json(out, results, name="results.json"):
    path = pathlib.Path(out) / name
    path.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    return path


def write_text(out, name, text):
    path = pathlib.Path(out) / name
    path.write_text(text.rstrip() + "\n")
    return path


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
