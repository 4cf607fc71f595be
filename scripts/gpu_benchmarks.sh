#!/usr/bin/env bash
# The KerasHub and MoEFeedForward comparisons of issue 15 on one GPU: JAX's grouped matmul
# (jax.lax.ragged_dot, what dropless routing takes on a GPU) and PyTorch's (torch._grouped_mm),
# side by side in one process per backend, written to OUT (default benchmarks/results/gpu).
#
#   bash scripts/gpu_benchmarks.sh [OUT]
#
# Not yet run: no GPU has been lent to this project so far. It replaces the CPU builds of JAX and
# PyTorch in .venv by CUDA ones (several GB) and checks that each backend sees the GPU first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install --quiet "jax[cuda12]" "torch>=2.8"
out="${1:-benchmarks/results/gpu}"
KERAS_BACKEND=jax python -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
KERAS_BACKEND=torch python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
cases=moe_feed_forward,dense_topk,kerashub_mixtral,kerashub_qwen_moe,kerashub_qwen3_moe
cases=$cases,kerashub_qwen3_5_moe,kerashub_gpt_oss,kerashub_gemma4
python -m benchmarks --backends jax,torch --cases "$cases" --repeats 11 --out "$out"
echo "done: $out/benchmarks.md"
