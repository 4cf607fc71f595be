"""`routing.choose_layout`, the pure function that names the dispatch layout:
a table of settings and sizes -> layout, and the refused combinations."""

import keras
import pytest

from keras_moe import routing

# `default_block_size(46, 5)` is 32 rows: tokens of up to 64 features are
# narrow (each block's copy of its expert's weights is worth its rows).
SIZES = {"n_assignments": 46, "n_experts": 5}
assert routing.default_block_size(46, 5) == 32

# (arguments, layout): every rule, and its edges.
TABLE = [
    # An explicit layout is kept, whatever the sizes and the backend.
    ({"layout": "capacity", "capacity_factor": 1.25}, "capacity"),
    ({"layout": "tiers", "training": True, "features": 6, **SIZES}, "tiers"),
    ({"layout": "blocks", "training": False, "features": 4096, **SIZES}, "blocks"),
    ({"layout": "blocks", "training": True, "distributed": True}, "blocks"),
    (
        {"layout": "tiers", "has_grouped_matmul": True, "prefers_grouped_matmul": True},
        "tiers",
    ),
    (
        {
            "layout": "grouped",
            "has_grouped_matmul": True,
            "prefers_grouped_matmul": False,
        },
        "grouped",
    ),
    # A capacity factor: the capacity buffers, grouped matmul or not.
    ({"layout": "auto", "capacity_factor": 0.5}, "capacity"),
    (
        {
            "layout": "auto",
            "capacity_factor": 2.0,
            "training": True,
            "features": 6,
            "has_grouped_matmul": True,
            **SIZES,
        },
        "capacity",
    ),
    # A grouped matmul that can run, preferred (None: whenever it runs).
    ({"layout": "auto", "has_grouped_matmul": True}, "grouped"),
    (
        {"layout": "auto", "has_grouped_matmul": True, "prefers_grouped_matmul": True},
        "grouped",
    ),
    (
        {"layout": "auto", "has_grouped_matmul": False, "prefers_grouped_matmul": True},
        "tiers",
    ),
    # Available, not preferred (JAX on a CPU): as without one.
    (
        {
            "layout": "auto",
            "training": True,
            "features": 6,
            "has_grouped_matmul": True,
            "prefers_grouped_matmul": False,
            **SIZES,
        },
        "blocks",
    ),
    (
        {
            "layout": "auto",
            "training": False,
            "features": 6,
            "has_grouped_matmul": True,
            "prefers_grouped_matmul": False,
            **SIZES,
        },
        "tiers",
    ),
    # Dropless without one: the blocks in training for narrow tokens ...
    ({"layout": "auto", "training": True, "features": 6, **SIZES}, "blocks"),
    ({"layout": "auto", "training": True, "features": 64, **SIZES}, "blocks"),
    # ... the tiers for wider ones, in inference, or unknown widths ...
    ({"layout": "auto", "training": True, "features": 65, **SIZES}, "tiers"),
    ({"layout": "auto", "training": False, "features": 6, **SIZES}, "tiers"),
    ({"layout": "auto", "training": None, "features": 6, **SIZES}, "tiers"),
    ({"layout": "auto", "training": True, "features": None, **SIZES}, "tiers"),
    # ... and under a distribution (the blocks would copy sharded weights).
    (
        {
            "layout": "auto",
            "training": True,
            "features": 6,
            "distributed": True,
            **SIZES,
        },
        "tiers",
    ),
    # A dynamic token count: blocks of 128 rows, narrow up to 256 features.
    ({"layout": "auto", "training": True, "features": 256, "n_experts": 5}, "blocks"),
    ({"layout": "auto", "training": True, "features": 257, "n_experts": 5}, "tiers"),
    # Many assignments per expert: blocks of 128 rows.
    (
        {
            "layout": "auto",
            "training": True,
            "features": 256,
            "n_assignments": 8192,
            "n_experts": 8,
        },
        "blocks",
    ),
    (
        {
            "layout": "auto",
            "training": True,
            "features": 257,
            "n_assignments": 8192,
            "n_experts": 8,
        },
        "tiers",
    ),
]


@pytest.mark.parametrize("kwargs, expected", TABLE, ids=str)
def test_choose_layout_table(kwargs, expected):
    assert routing.choose_layout(**kwargs) == expected


def test_every_layout_it_names_is_a_value_of_layouts():
    names = {routing.choose_layout(**kwargs) for kwargs, _ in TABLE}
    assert names == set(routing.LAYOUTS) - {"auto"}


# (arguments, message): what it refuses, each naming the argument and what
# it received.
REFUSED = [
    (
        {"layout": "rows"},
        r"`layout` must be one of .*'grouped'.*Received: layout='rows'",
    ),
    ({"layout": None}, r"`layout` must be one of"),
    (
        {"layout": "grouped"},
        r"`layout='grouped'` needs a backend grouped matmul.*"
        r"Received: layout='grouped'",
    ),
    (
        {
            "layout": "grouped",
            "has_grouped_matmul": False,
            "prefers_grouped_matmul": True,
        },
        r"needs a backend grouped matmul",
    ),
    *[
        (
            {"layout": layout, "capacity_factor": 1.0, "has_grouped_matmul": True},
            rf"`layout='{layout}'` is a dropless layout.*"
            rf"Received: layout='{layout}', capacity_factor=1.0",
        )
        for layout in ("tiers", "blocks", "grouped")
    ],
    (
        {"layout": "capacity"},
        r"`layout='capacity'` drops the assignments.*needs a `capacity_factor`.*"
        r"Received: layout='capacity', capacity_factor=None",
    ),
]


@pytest.mark.parametrize("kwargs, message", REFUSED, ids=str)
def test_refused_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        routing.choose_layout(**kwargs)


def test_it_is_pure(monkeypatch):
    """Only its arguments count: not the current distribution, not the
    backend's grouped matmul (which `plan_dispatch` passes in)."""
    kwargs = {"layout": "auto", "training": True, "features": 6, **SIZES}
    monkeypatch.setattr(keras.distribution, "distribution", lambda: object())
    assert routing.choose_layout(**kwargs) == "blocks"
    assert routing.choose_layout(**kwargs, distributed=True) == "tiers"
    # PyTorch and JAX have a grouped matmul, which this call does not pass.
    assert routing.choose_layout("grouped", has_grouped_matmul=True) == "grouped"
    with pytest.raises(ValueError, match="needs a backend grouped matmul"):
        routing.choose_layout("grouped")
