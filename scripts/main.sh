#!/usr/bin/env bash
# The main job: installs what it needs, then trains a small model built from keras-moe layers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
python examples/quickstart.py
