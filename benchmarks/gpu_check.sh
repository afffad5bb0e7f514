#!/usr/bin/env bash
# The device check, in one call on a lent GPU machine (see README "GPU check"):
#   parity in fp32 and bf16 against transformers on the same GPU, attention backends compared,
#   forward latency against transformers, compile time against depth, the SFT train step's MFU and
#   the largest model that trains on one card (bench_train_gpu.py; about 4 minutes of the GPU).
# Usage (from the repository root): bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  echo "== fp32 logits parity tests (tiny models, one video)"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 90 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_model_parity.py -k "one_video or image_and_video" 2>&1 | tail -3
  echo "== parity and attention backends"
  timeout 150 python3 benchmarks/gpu_parity.py --scale 2
  echo "== forward latency, bf16, stjax vs transformers (sdpa)"
  for arch in qwen2_vl qwen2_5_vl; do
    timeout 80 python3 benchmarks/bench_forward.py --arch $arch --dtype bfloat16 --scale 4 --repeats 10
  done
  timeout 80 python3 benchmarks/bench_forward.py --arch qwen2_5_vl --dtype bfloat16 --scale 4 --repeats 10 --attention dot_product
  echo "== sampler vs transformers generate (tiny model, greedy, 64 new tokens)"
  timeout 80 python3 benchmarks/bench_sampler.py --repeats 3
  echo "== compile time vs depth (7B shapes)"
  timeout 80 python3 benchmarks/bench_compile.py --layers 4 28
  echo "== SFT train step, one GPU: MFU of a 1.5B Qwen2.5-VL-shaped model, 1 x 4096 tokens, bf16 + fp32 masters"
  timeout 110 python3 benchmarks/bench_train_gpu.py --part mfu --mfu-timeout 100 --json "$out/train_mfu.json"
  echo "== largest model that trains on one GPU, LoRA and full fine-tuning (1 x 2048 tokens, remat full)"
  timeout 130 python3 benchmarks/bench_train_gpu.py --part largest --budget 120 --trial-timeout 75 \
    --json "$out/train_largest.json"
} 2>&1 | grep -v -i "warn" | tee "$out/gpu_check.log"
