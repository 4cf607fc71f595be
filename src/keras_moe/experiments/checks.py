"""Checks of the `keras-moe` commands' arguments, run before any work.

Every argument of a command is checked before it loads any data or builds
any model: argparse checks each value's type and range as it parses
(`common.positive_int`, ...); each experiment's `prepare(args)` then checks
what argparse cannot, with the functions here: combinations (`--top-k`
against the experts), sizes against fixed limits (seeds, the data) and
paths that must exist; `keras-moe` last makes the `--out` folder
(`output_folder`). A failed check raises `ExperimentError` worded as
argparse words its own errors ("argument --top-k: must be at most
--n-experts. Received: --top-k 3, --n-experts 2"), which the command prints
as one line with exit status 2.
"""

import pathlib
import shlex
import tempfile

from keras_moe.experiments.common import ExperimentError

# The largest seed `keras.utils.set_random_seed` takes (NumPy's limit).
MAX_SEED = 2**32 - 1


def _dest(option):
    return option.lstrip("-").replace("-", "_")


def _text(value):
    """A value as one types it after its option."""
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    if isinstance(value, (str, pathlib.PurePath)):
        return shlex.quote(str(value))
    return str(value)


def fail(option, expected, args, *others):
    """Raises `ExperimentError`: "argument OPTION: must be EXPECTED. Received:
    OPTION value, OTHER value, ..." with the values in `args`."""
    received = ", ".join(
        f"{name} {_text(getattr(args, _dest(name)))}" for name in (option, *others)
    )
    raise ExperimentError(
        f"argument {option}: must be {expected}. Received: {received}"
    )


def at_most(args, option, limit_option):
    """`option`'s value must not exceed `limit_option`'s (`--top-k`, `--experts`)."""
    if getattr(args, _dest(option)) > getattr(args, _dest(limit_option)):
        fail(option, f"at most {limit_option}", args, limit_option)


def at_least(args, option, minimum, why):
    if getattr(args, _dest(option)) < minimum:
        fail(option, f"at least {minimum} ({why})", args)


def multiple_of(args, option, factor, why):
    if getattr(args, _dest(option)) % factor:
        fail(option, f"a multiple of {factor} ({why})", args)


def seeds(args, largest, others=("--repeats",), rule="run r is seeded with --seed + r"):
    """Every seed a run draws, the largest `largest(--seed)` (increasing in
    `--seed`), must be one that `keras.utils.set_random_seed` takes."""
    if largest(args.seed) <= MAX_SEED:
        return
    if largest(0) > MAX_SEED:
        hint = "no --seed is, with these settings"
    else:
        low, high = 0, args.seed  # largest(low) fits, largest(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if largest(middle) <= MAX_SEED else (low, middle)
        hint = f"here --seed {low} at most"
    fail(
        "--seed",
        f"such that every seed is at most 2**32 - 1 ({rule}; {hint})",
        args,
        *others,
    )


def existing_data(args, option="--data"):
    """`option` (if given) must name an existing folder or file."""
    path = getattr(args, _dest(option))
    if path is not None and (not str(path) or not pathlib.Path(path).exists()):
        fail(option, "an existing folder or tar archive", args)


def output_folder(path, option="--out"):
    """Makes the output folder (and its missing parents) and checks that a
    file can be written there.

    Returns:
        The folders it created, innermost first (`remove_if_empty` takes
        them away again after a run that wrote nothing).

    Raises:
        ExperimentError: `path` is empty, a file, or a folder that cannot be
            created or written (say, under an unwritable parent).
    """
    received = f"Received: {option} {_text(path)}"
    if not str(path):
        raise ExperimentError(f"argument {option}: must be a folder path. {received}")
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ExperimentError(
            f"argument {option}: must be a folder, not a file. {received}"
        )
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        remove_if_empty([p for p in missing if p.exists()])
        reason = error.strerror or type(error).__name__
        where = f": {error.filename!r}" if error.filename else ""
        raise ExperimentError(
            f"argument {option}: must be a folder that can be created and written "
            f"({reason}{where}). {received}"
        ) from None
    return missing


def remove_if_empty(folders):
    """Removes each of `folders` (innermost first) that is empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
