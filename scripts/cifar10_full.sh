#!/usr/bin/env bash
# The original CIFAR-10 protocol on the CPU, in resumable slices: all 50,000 training images,
# 16 epochs, 4 runs each of cnn, moe, moe-pooled and cnn-wide-dense (TensorFlow backend).
#
#   bash scripts/cifar10_full.sh [PROCESSES]     # default 2: one single-threaded process per core
#
# Every process resumes the same folder, results/cifar10-full: it skips finished runs, continues
# unfinished ones from their last finished epoch, and leaves runs another live process holds to it.
# Kill it any time (a killed process loses at most one epoch) and start it again to continue;
# pause it with `kill -STOP` / `kill -CONT`. Logs: results/cifar10-full/logs/ (not committed).
# Two single-threaded processes trained 1.05-1.3x more steps per second than one two-threaded
# process on 2 cores (see README, "Experiments").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=results/cifar10-full
mkdir -p "$out/logs"
for i in $(seq 1 "${1:-2}"); do
  KERAS_BACKEND=tensorflow TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 nice -n 19 \
    keras-moe cifar10 --data ../shared/data/cifar10-jpeg.tar.gz --epochs 16 --repeats 4 \
    --models cnn moe moe-pooled cnn-wide-dense --verbose 2 --out "$out" --resume \
    >> "$out/logs/slice-$i.log" 2>&1 &
  sleep 20  # the first claims its run before the second looks
done
wait
