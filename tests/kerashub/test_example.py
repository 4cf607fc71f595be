"""`examples/kerashub_sparse.py`, which the README and docs/kerashub.md point
to: it runs on the backend under test and finds identical generations (its
exit status says so). One family: the example's model building and generation
are every family's, which tests/kerashub/test_sparsify.py covers."""

import os
import pathlib
import subprocess
import sys

import keras

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "kerashub_sparse.py"


def test_example_generates_the_same_tokens(family="mixtral"):
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--family", family, "--experts", "4"]
        + ["--steps", "1", "--batch", "2", "--length", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "greedy generations identical: True" in result.stdout
    assert f"backend {keras.backend.backend()}, {family}, 4 experts" in result.stdout
