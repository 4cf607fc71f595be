"""Argument validation shared by every keras-moe layer.

Each helper raises a `ValueError`/`TypeError` that names the argument in
backticks, says what was expected and ends with what was received, so a user
sees at once which argument of which call is wrong.
"""

import hashlib
import math
import numbers

import keras


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
    """`keras.activations.get` with an error that names the argument."""
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
