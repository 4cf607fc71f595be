"""keras-moe 0.2.0's routing API, deprecated in 0.3.0 and removed in 0.4.0:
each old form warns, names its replacement and gives what the replacement
gives. (The routing tests themselves use the new API only.)"""

import contextlib
import warnings

import numpy as np
import pytest
from keras import ops

from keras_moe import backend
from keras_moe import routing
from tests.conftest import to_numpy
from tests.routing.test_dispatch import N_EXPERTS
from tests.routing.test_dispatch import random_case
from tests.routing.test_dispatch import tanh_bank

REMOVED = r"is deprecated and will be removed in keras-moe 0\.4\.0"


def ours(caught):
    """keras-moe's warnings among `caught` (the backends warn too)."""
    return [w for w in caught if "keras-moe" in str(w.message)]


@contextlib.contextmanager
def no_deprecation():
    """Fails when keras-moe warns of a deprecation inside."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not ours(caught), [str(w.message) for w in ours(caught)]


def mixture(layout, expert_bank=None, capacity_factor=None, seed=1):
    x, kernel, bias, logits = random_case(seed, skew=1.0)
    weights, experts, _ = routing.top_k_gates(logits, 2)
    out, sizes, dropped = routing.sparse_mixture(
        x,
        experts,
        weights,
        N_EXPERTS,
        expert_bank or tanh_bank(kernel, bias),
        capacity_factor=capacity_factor,
        layout=layout,
    )
    return to_numpy(out), to_numpy(sizes), float(to_numpy(dropped))


def test_the_dropless_capacity_layout_is_now_tiers():
    with pytest.warns(DeprecationWarning, match=REMOVED) as caught:
        old = mixture("capacity")
    (warning,) = ours(caught)
    message = str(warning.message)
    assert "`layout='capacity' without a capacity_factor`" in message
    assert "Use `layout='tiers'` instead." in message
    assert warning.filename == __file__  # the caller's line, not keras-moe's
    new = mixture("tiers")
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)
    # With a capacity factor, "capacity" is the capacity buffers: no warning.
    with no_deprecation():
        mixture("capacity", capacity_factor=1.0)


def test_rows_is_now_grouped():
    if not backend.grouped_matmul_available():
        with pytest.warns(DeprecationWarning, match="Use `layout='grouped'`"):
            with pytest.raises(ValueError, match="Received: layout='grouped'"):
                mixture("rows")
        return
    with pytest.warns(DeprecationWarning, match="Use `layout='grouped'` instead"):
        old = mixture("rows")
    new = mixture("grouped")
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)


def test_a_router_dispatch_with_the_old_layout_name():
    x, kernel, bias, _ = random_case(2)
    router = routing.TopKRouter(N_EXPERTS, top_k=2)
    weights, experts = router(x)
    bank = tanh_bank(kernel, bias)
    with pytest.warns(DeprecationWarning, match="Use `layout='tiers'`"):
        old = router.dispatch(x, weights, experts, bank, layout="capacity")
    new = router.dispatch(x, weights, experts, bank, layout="tiers")
    np.testing.assert_array_equal(to_numpy(old), to_numpy(new))


def test_an_expert_function_of_layout_and_rows():
    """0.2.0's `expert_fn(layout, rows)`: still run, with a warning naming
    the bank's `(rows, layout=...)` call."""
    x, kernel, bias, _ = random_case(3)
    bank = tanh_bank(kernel, bias)

    def expert_fn(layout, rows):
        # 0.2.0's interface: the layout multiplies by every expert's weights.
        return ops.tanh(layout.add_bias(layout.matmul(rows, kernel), bias))

    with pytest.warns(DeprecationWarning, match=REMOVED) as caught:
        old = mixture("blocks", expert_fn, seed=3)
    (warning,) = ours(caught)
    assert "`expert_fn(layout, rows)`" in str(warning.message)
    assert "`expert_bank(rows, layout=...)`" in str(warning.message)
    assert warning.filename == __file__
    new = mixture("blocks", seed=3)
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)
    # Expert choice runs it too.
    router = routing.ExpertChoiceRouter(N_EXPERTS, top_k=2)
    weights, tokens = router(x)
    with pytest.warns(DeprecationWarning, match="expert_fn"):
        old = router.dispatch(x, weights, tokens, expert_fn)
    new = router.dispatch(x, weights, tokens, bank)
    np.testing.assert_array_equal(to_numpy(old), to_numpy(new))


def test_expert_choice_without_a_capacity_factor_is_one():
    with pytest.warns(DeprecationWarning, match=REMOVED) as caught:
        old = routing.ExpertChoiceRouter(4, top_k=2, capacity_factor=None, name="r")
    (warning,) = ours(caught)
    assert "`ExpertChoiceRouter(capacity_factor=None)`" in str(warning.message)
    assert "Use `ExpertChoiceRouter(capacity_factor=1.0)`" in str(warning.message)
    assert warning.filename == __file__
    new = routing.ExpertChoiceRouter(4, top_k=2, capacity_factor=1.0, name="r")
    assert old.get_config() == new.get_config()
    assert old.capacity(10) == new.capacity(10) == 5


def test_the_new_forms_do_not_warn():
    x, kernel, bias, _ = random_case(4)
    with no_deprecation():
        for layout in ("tiers", "blocks", "auto"):
            mixture(layout)
        router = routing.ExpertChoiceRouter(N_EXPERTS, top_k=2)
        weights, tokens = router(x)
        router.dispatch(x, weights, tokens, tanh_bank(kernel, bias))
