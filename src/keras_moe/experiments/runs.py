"""Resumable training runs: one folder per (model, repeat), a checkpoint per epoch.

A run is the unit of a long experiment. Its folder `runs/<model>/run-<r>/`
holds, while it trains, `checkpoint.weights.h5` (the model's weights and the
optimizer's state after the last finished epoch) and `state.json` (that
epoch, the history so far); when it finishes, `run.json` (the whole record:
history per epoch, step times, parameters). A process works on a run only
after claiming it (`claim`, an exclusive file holding its process id), so
several processes can resume one output folder side by side; the claim of a
process that died is taken over.

Resuming gives the run an uninterrupted process would have given: the data
order and every random draw of epoch `e` depend on `(seed, e)` only
(`epoch_order`, `EpochSeeds`), and the optimizer's state, hence the learning-rate
schedule's step, comes back with the weights.
"""

import json
import os
import pathlib
import socket

import keras
import numpy as np

from keras_moe.experiments import common

CHECKPOINT = "checkpoint.weights.h5"
STATE = "state.json"
RECORD = "run.json"
CLAIM = "claim"
PROTOCOL = "protocol.json"


def run_dir(out, name, repeat):
    return pathlib.Path(out) / "runs" / name / f"run-{repeat}"


def _write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder):
    """Claims a run folder for this process; False if a live process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                return False  # being written by another process right now
            if holder.get("host") != socket.gethostname() or _process_alive(
                holder.get("pid", -1)
            ):
                return False
            path.unlink(missing_ok=True)  # its process died: take the run over
            continue
        with os.fdopen(fd, "w") as file:
            file.write(mine)
        return True
    return False


def release(folder):
    (folder / CLAIM).unlink(missing_ok=True)


def is_finished(folder):
    return (folder / RECORD).exists()


def read_record(folder):
    return json.loads((folder / RECORD).read_text())


def finished_records(out):
    """`{model: {repeat: record}}` of every finished run under `out/runs/`."""
    records = {}
    for path in sorted(pathlib.Path(out).glob(f"runs/*/run-*/{RECORD}")):
        record = json.loads(path.read_text())
        records.setdefault(record["model"], {})[record["repeat"]] = record
    return records


def load_state(folder, model):
    """The saved state of an unfinished run, with its weights put into `model`.

    `model` must be built and compiled as the run's model was. Returns None
    (and leaves `model` alone) when the run has no finished epoch yet.
    """
    state_path, checkpoint = folder / STATE, folder / CHECKPOINT
    if not (state_path.exists() and checkpoint.exists()):
        return None
    model.optimizer.build(model.trainable_variables)
    model.load_weights(checkpoint)
    return json.loads(state_path.read_text())


def save_state(folder, model, state):
    """Checkpoints a finished epoch: weights and optimizer first, then the state."""
    tmp = folder / ("tmp-" + CHECKPOINT)
    model.save_weights(tmp)
    os.replace(tmp, folder / CHECKPOINT)
    _write_atomic(folder / STATE, json.dumps(state))


def finish(folder, record, keep_weights=True):
    """Writes the run's record; the checkpoint stays as the final weights."""
    _write_atomic(folder / RECORD, json.dumps(record, indent=1) + "\n")
    (folder / STATE).unlink(missing_ok=True)
    checkpoint = folder / CHECKPOINT
    if keep_weights and checkpoint.exists():
        os.replace(checkpoint, folder / "final.weights.h5")
    else:
        checkpoint.unlink(missing_ok=True)


class EpochSeeds(keras.callbacks.Callback):
    """Makes every random draw of an epoch a function of `(seed, epoch)`.

    At the start of each epoch (inside `fit`, after whatever `fit` draws when
    it first builds a model) it seeds the global generators (Python, NumPy
    and the backend's: PyTorch's unseeded dropout draws from its global
    generator) and moves the counter of every Keras `SeedGenerator` in the
    model (dropout, augmentation) to a value of its own for this epoch. The
    generators' own seeds come from the model's construction after
    `keras.utils.set_random_seed(seed)`.
    """

    def __init__(self, seed):
        super().__init__()
        self.seed = int(seed)

    def on_epoch_begin(self, epoch, logs=None):
        keras.utils.set_random_seed(self.seed * 1_000 + int(epoch))
        for variable in self.model.non_trainable_variables:
            if variable.name == "seed_generator_state":
                state = keras.ops.convert_to_numpy(variable)
                variable.assign(
                    np.asarray([state[0], (epoch + 1) * 1_000_003], dtype=state.dtype)
                )


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras's progress bar, numbering epochs out of the run's total.

    A resumable run calls `fit` once per epoch (`epochs=e + 1`), for which
    Keras's own logger would print "Epoch 3/3" (or nothing for the first).
    """

    def __init__(self, epochs):
        super().__init__()
        self.total_epochs = int(epochs)

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


def epoch_order(n, seed, epoch):
    """The shuffled order of `n` training examples in epoch `epoch`."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def check_protocol(out, protocol, resume):
    """Checks, without writing anything, that runs of `protocol` may go to `out`.

    Raises:
        ExperimentError: `out` already holds runs and `resume` is False, or it
            holds runs of another protocol.
    """
    out = pathlib.Path(out)
    path = out / PROTOCOL
    if not any(out.glob("runs/*/run-*")):
        return
    if not resume:
        raise common.ExperimentError(
            "`--out` already holds runs of an experiment: pass `--resume` to "
            "continue them, or choose another `--out`. Received: "
            f"--out {str(out)!r}"
        )
    saved = json.loads(path.read_text()) if path.exists() else {}
    for key in sorted(set(saved) | set(protocol)):
        if saved.get(key) != protocol.get(key):
            raise common.ExperimentError(
                "`--resume` continues runs of the same protocol only. Received: "
                f"{key}={protocol.get(key)!r}, the runs in {str(out)!r} have "
                f"{key}={saved.get(key)!r}"
            )


def write_protocol(out, protocol):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / PROTOCOL, json.dumps(protocol, indent=1) + "\n")
