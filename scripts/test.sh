#!/usr/bin/env bash
# The test command: installs what it needs, then runs the suite on JAX, PyTorch and TensorFlow.
# Extra arguments go to pytest; BACKENDS="jax" limits the backends.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
. .venv/bin/activate
status=0
for backend in ${BACKENDS:-jax torch tensorflow}; do
  echo "=== keras-moe tests, KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -n 2 -q "$@" || status=1
done
exit $status
