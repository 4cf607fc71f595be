#!/usr/bin/env bash
# Creates .venv (if missing) and installs keras-moe with JAX, PyTorch (CPU) and TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -r requirements-dev.txt
python -m pip install --quiet --no-deps "keras-hub==0.32.0"
