#!/usr/bin/env bash
# The original CIFAR-10 protocol on one GPU: the 16 runs of scripts/cifar10_full.sh (4 runs each
# of cnn, moe, moe-pooled, cnn-wide-dense; all 50,000 images, 16 epochs) as PROCESSES concurrent
# processes sharing the GPU, all resuming one folder (each claims its own runs).
#
#   bash scripts/cifar10_full_gpu.sh [PROCESSES] [OUT]     # defaults: 8, out/cifar10-full-gpu
#
# Not yet run: no GPU has been lent to this project so far, so its duration is unmeasured.
# It uses TensorFlow, the backend of the CPU runs, so that its runs share their protocol and
# merge with them (`keras-moe cifar10 --merge results/cifar10-full OUT --out ...` needs disjoint
# runs: give a GPU its own OUT, then merge). TensorFlow's GPU build replaces tensorflow-cpu in
# .venv; each process lets its GPU memory grow instead of taking the whole device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install --quiet "tensorflow[and-cuda]>=2.16"
processes="${1:-8}"
out="${2:-out/cifar10-full-gpu}"
mkdir -p "$out/logs"
python - <<'PY'
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
if not gpus:
    raise SystemExit("cifar10_full_gpu.sh: TensorFlow sees no GPU; use scripts/cifar10_full.sh")
print("GPUs:", gpus)
PY
for i in $(seq 1 "$processes"); do
  KERAS_BACKEND=tensorflow TF_FORCE_GPU_ALLOW_GROWTH=true \
    keras-moe cifar10 --data ../shared/data/cifar10-jpeg.tar.gz --epochs 16 --repeats 4 \
    --models cnn moe moe-pooled cnn-wide-dense --verbose 2 --out "$out" --resume \
    >> "$out/logs/gpu-$i.log" 2>&1 &
  sleep 5
done
wait
echo "done: $out/summary.md"
