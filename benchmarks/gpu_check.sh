#!/usr/bin/env bash
# The device check, in one call on a lent GPU machine (see README "GPU check"), most important first:
#   the compile-only preflight (`python -m stjax.train --compile-only`: the tiny SFT and GRPO configs on this
#   GPU, then the 7B GRPO H100 config for its 8-GPU target, each program's bytes against the card's memory);
#   the GRPO step by parts (issue 13: rollout tokens/s, decode bandwidth share, update MFU); parity
#   in fp32 and bf16 against transformers on the same GPU and the attention backends compared
#   (is cuDNN's fused kernel really in the program? left- and right-padded batches); the SFT train
#   step's MFU (four rows per step, remat `dots_attention` and `dots`; one row with its breakdown
#   and a profile of its top operations; four rows with a video each; six rows; logits at the loss
#   positions, the second half of each row, as the trainer makes them), causal attention alone (fwd, fwd + bwd);
#   with FULL=1 also a 7B LoRA step with a video row (does remat dots_attention fit?), the largest
#   model that trains on one card and forward latency against transformers (both last measured
#   2026-11-26 and untouched since). With QLORA=1 the QLoRA parts (issue 16) come first: the largest
#   Qwen2.5-VL shape that trains over an nf4 base on one card (target: 72B on an H200, 1 x 2048 tokens),
#   its step time and MFU, then a 7B QLoRA step against the 7B bf16 LoRA step; the other parts get
#   what is left of the budget (QLORA=1 BUDGET_S=540: about nothing).
# Each part runs under `timeout`, cut to what is left of BUDGET_S (default 540 s), so a slow or broken
# part never costs the ones after it; a part with under 30 s left is skipped and says so.
# Missing Python packages (grain, tensorboardX) travel as wheels in .whl/, which is git-ignored.
# Usage (from the repository root): [FULL=1] [QLORA=1] [BUDGET_S=540] bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ] && ! python3 -c "import grain, tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))

part() {  # part SECONDS TITLE COMMAND...: run COMMAND for at most SECONDS (less if the budget is short)
  local want=$1 title=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  local limit=$(( want < left ? want : left ))
  echo "== $title"
  if [ "$limit" -lt 30 ]; then echo "   skipped: ${left} s of the budget left"; return; fi
  local began; began=$(date +%s)
  timeout "$limit" "$@"
  echo "   (exit $?, $(( $(date +%s) - began )) s of at most ${limit} s)"
}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint, grain, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
  # The preflight first: a program that does not compile or fit says so before any budget goes to timing.
  part 90 "compile-only preflight: tiny SFT and GRPO configs on this GPU" bash -c '
    for config in configs/sft/tiny-cpu.yaml configs/grpo/tiny-cpu.yaml; do
      python3 -m stjax.train --config "$config" --set model.attention=auto --compile-only || exit
    done'
  part 150 "compile-only preflight: Qwen2.5-VL-7B GRPO for 8 H100s (--topology h100x8)" \
    python3 -m stjax.train --config configs/grpo/qwen2.5-vl-7b-h100x8.yaml --compile-only --topology h100x8
  if [ "${QLORA:-0}" = 1 ]; then
    part 220 "largest Qwen2.5-VL shape that trains with QLoRA on one card (nf4 + double quantization, every linear but the LM head; 1 x 2048 tokens, remat full)" \
      python3 benchmarks/bench_train_gpu.py --part largest --modes qlora --sizes 72b,32b,14b --budget 210 \
      --trial-timeout 170 --json "$out/train_largest_qlora.json"
    for base in none nf4; do
      part 110 "7B LoRA r8 step over a $base base (none: bf16), 1 row x 4096 tokens, remat dots_attention" \
        python3 benchmarks/bench_train_gpu.py --part mfu --mfu-size 7b --mfu-lora --quantize $base --attention dot_product \
        --remat dots_attention,full --steps 3 --warmup 1 --mfu-timeout 100 --json "$out/train_7b_lora_$base.json"
    done
  fi
  part 200 "GRPO step by parts (issue 13), Qwen2.5-VL-3B-shaped, 2 prompts x G=8 with 8-frame 336x336 videos, 256 tokens: rollout tokens/s, decode bandwidth share (target 50%), update MFU (target 35%)" \
    python3 benchmarks/bench_grpo_gpu.py --size 3b --prompts 2 --generations 8 --tokens 256 --video 8x336
  part 240 "parity (fp32, bf16) vs transformers and attention backends" \
    python3 benchmarks/gpu_parity.py --scale 2
  mfu="SFT train step MFU, 1.5B Qwen2.5-VL-shaped, bf16 + fp32 masters, cuDNN attention (no mask: full rows)"
  part 150 "$mfu, 4 rows x 4096 tokens, remat dots_attention and dots" \
    python3 benchmarks/bench_train_gpu.py --part mfu --attention dot_product --batch 4 --remat dots_attention,dots \
    --every-remat --mfu-timeout 70 --json "$out/train_mfu_b4.json"
  # Command buffers off, so that the profile names XLA's operations (on, it shows only the buffers).
  part 100 "$mfu, 1 row x 4096 tokens, with its breakdown and profile (command buffers off)" \
    python3 benchmarks/bench_train_gpu.py --part mfu --attention dot_product --remat none,dots_attention --mfu-timeout 90 \
    --breakdown --profile /tmp/train_profile --child-xla-flags=--xla_gpu_enable_command_buffer= \
    --json "$out/train_mfu_b1.json"
  part 70 "$mfu, 4 rows x 4096 tokens with an 8-frame 336x336 video each (vision groups by key counts)" \
    python3 benchmarks/bench_train_gpu.py --part mfu --attention dot_product --batch 4 --video 8x336 \
    --remat dots_attention --mfu-timeout 65 --json "$out/train_mfu_video.json"
  part 80 "$mfu, 6 rows x 4096 tokens (8 rows do not fit)" \
    python3 benchmarks/bench_train_gpu.py --part mfu --attention dot_product --batch 6 --remat dots_attention,dots \
    --mfu-timeout 75 --json "$out/train_mfu_b6.json"
  part 50 "causal attention alone, 1 x 4096 tokens, 12 heads: mask as a bias, right-padded (no mask), plain is_causal" \
    python3 benchmarks/bench_attention_gpu.py
  if [ "${FULL:-0}" = 1 ]; then
    # The 7B H100 configs keep remat full until this says dots_attention fits with a video row.
    part 150 "7B LoRA step, 1 row x 4096 tokens with an 8-frame 336x336 video, remat dots_attention and full" \
      python3 benchmarks/bench_train_gpu.py --part mfu --mfu-size 7b --mfu-lora --video 8x336 --attention dot_product \
      --remat dots_attention,full --every-remat --steps 3 --warmup 1 --mfu-timeout 70 --json "$out/train_7b_lora.json"
    part 160 "largest model that trains on one GPU, LoRA and full fine-tuning (1 x 2048 tokens, remat full)" \
      python3 benchmarks/bench_train_gpu.py --part largest --budget 150 --trial-timeout 80 \
      --json "$out/train_largest.json"
    for backend in xla dot_product; do
      part 90 "forward latency, bf16, Qwen2.5-VL, stjax ($backend) vs transformers (sdpa)" \
        python3 benchmarks/bench_forward.py --arch qwen2_5_vl --dtype bfloat16 --scale 2 --repeats 10 --attention $backend
    done
  fi
} 2>&1 | tee "$out/gpu_check.log"
echo "== summary"
grep -E "^== |headroom|^rollout:|^decode:|^update:|ms/step|  [0-9. ]+ +[0-9.]+%  |breakdown|stjax .* vs torch|backend |remat=|MFU|trains:|does not fit|fails|largest that|forward:|speed-up|TFLOP/s\)|cuDNN attention unavailable|Error" \
  "$out/gpu_check.log" | cut -c1-330
