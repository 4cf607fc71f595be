#!/usr/bin/env bash
# The main job: installs what it needs, then trains the original CIFAR-10 CNN against the same
# network built from keras-moe layers (`keras-moe cifar10`, see README "Experiments") and prints
# a table of parameters, accuracy and step time, and where the plot is.
#
# Without arguments: 10,000 training and 5,000 test images, 5 epochs, the CNN and the MoE, on
# TensorFlow (the fastest backend for these networks on a CPU), into out/cifar10-main; about
# 10-15 minutes on 2 CPU cores. Rerunning it continues or reprints that run (--resume).
# Arguments replace these settings, e.g.
#   bash scripts/main.sh --quick                       # a smoke run of a minute
#   bash scripts/main.sh --repeats 4 --out out/full    # the original's full protocol (hours)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export KERAS_BACKEND="${KERAS_BACKEND:-tensorflow}"
data=()
if [ -e ../shared/data/cifar10-jpeg.tar.gz ]; then
  data=(--data ../shared/data/cifar10-jpeg.tar.gz)
fi
if [ $# -eq 0 ]; then
  set -- --train-size 10000 --test-size 5000 --epochs 5 --models cnn moe \
    --verbose 2 --out out/cifar10-main --resume
fi
keras-moe cifar10 "${data[@]}" "$@"
echo
echo "The original's full protocol (50,000 images, 16 epochs, 4 runs per model, with controls):"
if [ -e results/cifar10-full/summary.md ]; then
  echo "  results/cifar10-full/summary.md (command: bash scripts/cifar10_full.sh)"
else
  echo "  not finished yet; bash scripts/cifar10_full.sh runs it in resumable slices into results/cifar10-full/"
fi
