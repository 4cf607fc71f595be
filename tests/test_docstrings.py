"""The `>>>` examples of every docstring run, on every backend."""

import doctest
import importlib
import pkgutil

import numpy as np
import pytest

import keras_moe


def _modules():
    names = ["keras_moe"]
    for info in pkgutil.walk_packages(keras_moe.__path__, "keras_moe."):
        names.append(info.name)
    return sorted(names)


def _examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name):
            # A re-exported object is found in every module that imports it.
            if test.examples and test.name not in found:
                found[test.name] = test
    return found


EXAMPLES = _examples()


PUBLIC = (
    "DenseMoE",
    "Conv1DMoE",
    "Conv2DMoE",
    "Conv3DMoE",
    "MoEFeedForward",
    "SoftMoE",
    "FeedForwardExperts",
    "SharedExpert",
    "TopKRouter",
    "ExpertChoiceRouter",
    "RoutingStatistics",
)


def test_the_public_layers_have_examples():
    for name in PUBLIC:
        assert any(key.endswith(f".{name}") for key in EXAMPLES), name
    assert "keras_moe.blocks" in EXAMPLES  # the factories' module


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_examples_run(name):
    test = EXAMPLES[name]
    test.globs = {**test.globs, "np": np}
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} failed in {name}"
