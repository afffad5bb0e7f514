#!/usr/bin/env bash
# The device check, in one call on a lent GPU machine (see README "GPU check"):
#   parity in fp32 and bf16 against transformers on the same GPU, attention backends compared,
#   forward latency against transformers, and compile time against depth.
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
} 2>&1 | grep -v -i "warn" | tee "$out/gpu_check.log"
