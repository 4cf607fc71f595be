"""Argument validation shared by every keras-moe layer.

Each helper raises a `ValueError`/`TypeError` that names the argument in
backticks, says what was expected and ends with what was received, so a user
sees at once which argument of which call is wrong.
"""

import hashlib
import math
import numbers
import re
import warnings

import keras

from keras_moe import activations
from keras_moe.version import __version__


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name, value, *, minimum=1):
    """Return `value` as an `int` if it is an integer `>= minimum`."""
    if not _is_int(value):
        raise TypeError(
            f"`{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )
    return int(value)


def check_optional_positive_int(name, value, *, minimum=1):
    return None if value is None else check_positive_int(name, value, minimum=minimum)


def check_top_k(top_k, n_experts):
    """`top_k` as an int from 1 to `n_experts`."""
    top_k = check_positive_int("top_k", top_k)
    if top_k > n_experts:
        raise ValueError(
            "`top_k` must be an integer from 1 to `n_experts`. "
            f"Received: top_k={top_k}, n_experts={n_experts}"
        )
    return top_k


def check_optional_seed(seed):
    """`seed` as an int >= 0, or None."""
    return None if seed is None else check_positive_int("seed", seed, minimum=0)


def check_same(name, expected, value):
    """Refuses a `value` of `name` (when given) that differs from what a
    given sublayer has."""
    if value is not None and value != expected:
        raise ValueError(
            f"`{name}` must agree with the given sublayers, which have "
            f"{name}={expected!r}. Received: {name}={value!r}"
        )


def check_non_negative_float(name, value):
    """Return `value` as a `float` if it is a finite real number `>= 0`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a non-negative number. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a finite non-negative number. Received: {name}={value!r}"
        )
    return float(value)


def check_positive_float(name, value):
    value = check_non_negative_float(name, value)
    if value == 0:
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return value


def check_optional_positive_float(name, value):
    return None if value is None else check_positive_float(name, value)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(
            f"`{name}` must be a bool. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    return value


def check_int_tuple(name, value, rank):
    """Normalise an int or a length-`rank` sequence of positive ints to a tuple."""
    if _is_int(value):
        values = (value,) * rank
    elif isinstance(value, (tuple, list)):
        values = tuple(value)
        if len(values) != rank:
            raise ValueError(
                f"`{name}` must be an integer or a tuple of {rank} integers. "
                f"Received: {name}={value!r} (length {len(values)})"
            )
        for v in values:
            if not _is_int(v):
                raise TypeError(
                    f"`{name}` must contain only integers. Received: {name}={value!r}"
                )
    else:
        raise TypeError(
            f"`{name}` must be an integer or a tuple of {rank} integers. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if any(v < 1 for v in values):
        raise ValueError(
            f"`{name}` must contain only positive integers. Received: {name}={value!r}"
        )
    return tuple(int(v) for v in values)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(
            f"`{name}` must be one of {sorted(choices)}. Received: {name}={value!r}"
        )
    return value.lower()


def get_activation(name, value):
    """`keras.activations.get`, also of keras-moe's names (`"gelu_tanh"`,
    `keras_moe.activations`), with an error that names the argument."""
    if isinstance(value, str) and value in activations.NAMED:
        return activations.NAMED[value]
    try:
        return keras.activations.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be the name of a Keras activation, a callable or None. "
            f"Received: {name}={value!r}"
        ) from e


def get_initializer(name, value):
    try:
        return keras.initializers.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be a Keras initializer (name, config or instance). "
            f"Received: {name}={value!r}"
        ) from e


def initializer_for(initializer, key):
    """`initializer` drawing values of its own for the weight `key`.

    A Keras random initializer keeps one seed (drawn at its construction
    when it is unseeded), so that one instance used for several weights
    gives each the same values (the same random stream, reshaped). A layer
    that creates several weights from one initializer takes each weight's
    initializer from here: a copy whose seed is derived from the
    initializer's seed and `key`, the weight's name in the layer
    (`"sublayer/name"` for a sublayer's), so that every weight draws its own
    values and a seeded initializer gives the same weights at every build.
    An initializer without a seed (`"zeros"`, a constant) or seeded with a
    `keras.random.SeedGenerator` (new values at every call) is returned as
    it is.
    """
    seed = getattr(initializer, "seed", None)
    if not _is_int(seed):
        return initializer
    config = initializer.get_config()
    if "seed" not in config:
        return initializer
    digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
    config["seed"] = int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
    return type(initializer).from_config(config)


def get_regularizer(name, value):
    try:
        return keras.regularizers.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be a Keras regularizer (name, config, instance or None). "
            f"Received: {name}={value!r}"
        ) from e


def get_constraint(name, value):
    try:
        return keras.constraints.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be a Keras constraint (name, config, instance or None). "
            f"Received: {name}={value!r}"
        ) from e


# ------------------------------------------------------------------ deprecation
# A public name or argument that goes away keeps working for one minor version
# and warns, naming its replacement and the version that removes it.

_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def _release_key(name, value):
    match = _RELEASE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"`{name}` must be a version `MAJOR.MINOR.PATCH`. Received: {name}={value!r}"
        )
    return tuple(int(part) for part in match.groups())


def _check_name(name, value):
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a non-empty string. "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if not value:
        raise ValueError(
            f"`{name}` must be a non-empty string. Received: {name}={value!r}"
        )


def _code(text):
    """`text` in backticks, unless it sets its own code in backticks."""
    return text if "`" in text else f"`{text}`"


def warn_deprecated(old, new, removed_in, stacklevel=2):
    """Warns that `old` is deprecated in favour of `new`, gone in `removed_in`.

    Emits a `DeprecationWarning` "`old` is deprecated and will be removed in
    keras-moe X.Y.Z. Use `new` instead.", attributed to the code that called
    the function that warns.

    Args:
        old: The deprecated name or argument, as the user writes it
            (`"MoEFeedForward(router_bias=...)"`, `"routing.SparseRouter"`),
            set in backticks; or a phrase that sets its own names in
            backticks, as it is.
        new: What to write instead, the same way.
        removed_in: The `MAJOR.MINOR.PATCH` version that removes `old`: later
            than the running version (a deprecation whose version has come is
            removed, not kept warning).
        stacklevel: As `warnings.warn`'s, counted from the caller of
            `warn_deprecated`: 2 (default) names the code that called it.

    Example:

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_deprecated("old_units", "units", "99.0.0")
    >>> print(caught[0].message)
    `old_units` is deprecated and will be removed in keras-moe 99.0.0. Use `units` instead.
    """
    _check_name("old", old)
    _check_name("new", new)
    if _release_key("removed_in", removed_in) <= _release_key("version", __version__):
        raise ValueError(
            f"`removed_in` must be a version after keras-moe {__version__}, which "
            f"should no longer have `{old}`. Received: removed_in={removed_in!r}"
        )
    warnings.warn(
        f"{_code(old)} is deprecated and will be removed in keras-moe "
        f"{removed_in}. Use {_code(new)} instead.",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def deprecated_argument(kwargs, old, new, removed_in, default=None, stacklevel=2):
    """Takes the deprecated argument `old` out of `kwargs`, warning if present.

    For a layer's `__init__(..., **kwargs)` whose argument `old` is replaced
    by `new`: call it before passing `kwargs` on, so that both a user's call
    and a config saved by an older version (`from_config`) keep working for
    one minor version, with a `DeprecationWarning` (`warn_deprecated`).

    Args:
        kwargs: The `**kwargs` dict; `old` is removed from it.
        old: The deprecated argument's name.
        new: What to write instead (`"units"`, `"router=TopKRouter(...)"`).
        removed_in: The `MAJOR.MINOR.PATCH` version that removes `old`.
        default: Returned when `kwargs` has no `old` (no warning then).
        stacklevel: Counted from the caller of `deprecated_argument`: 2
            (default) names the code that called that function, the user's
            `Layer(...)` call when it is the layer's `__init__`.

    Returns:
        The value given for `old`, else `default`.
    """
    if old not in kwargs:
        return default
    warn_deprecated(old, new, removed_in, stacklevel=stacklevel + 1)
    return kwargs.pop(old)
