#!/usr/bin/env bash
# The main job: installs what it needs, then trains the original CIFAR-10 CNN against the same
# network built from keras-moe layers (`keras-moe cifar10`, see README "Experiments").
# Without arguments a --quick smoke run; arguments replace --quick, e.g.
#   bash scripts/main.sh --train-size 5000 --test-size 5000 --epochs 3
#   bash scripts/main.sh --repeats 4          # the original's full protocol (a GPU's work)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
data=()
if [ -e ../shared/data/cifar10-jpeg.tar.gz ]; then
  data=(--data ../shared/data/cifar10-jpeg.tar.gz)
fi
if [ $# -eq 0 ]; then
  set -- --quick
fi
keras-moe cifar10 "${data[@]}" "$@"
