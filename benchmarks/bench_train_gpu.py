"""SFT training figures on one accelerator: the MFU of the train step for a ~1.5B Qwen2.5-VL-shaped
model at 4096 tokens, and the largest model that trains on one card, with and without LoRA.

    python benchmarks/bench_train_gpu.py                      # both parts (an H100: 3 to 5 minutes)
    python benchmarks/bench_train_gpu.py --part mfu [--seq 4096] [--batch 1] [--remat dots,full]
                                         [--attention dot_product] [--video 8x336] [--peak-flops 989e12]
    python benchmarks/bench_train_gpu.py --part largest [--sizes 72b,32b,14b,7b,3b,1.5b] [--largest-seq 2048]
                                         [--modes lora,full,qlora]
    python benchmarks/bench_train_gpu.py --part mfu --mfu-size 7b --mfu-lora --quantize nf4   # QLoRA's step
    python benchmarks/bench_train_gpu.py --smoke              # tiny shapes, the same code paths, CPU, < 1 minute

MFU: `stjax.train.step.train_step` jitted with the state donated (as `stjax.train.sft` runs it), one
device, bf16 parameters and compute, fp32 master copies of every trained parameter and AdamW state.
The model ("1.5b") is the Qwen2.5-1.5B decoder (hidden 1536, 28 layers, 12 heads, 2 KV heads,
MLP 8960, vocab 151936, tied embeddings) with the vision tower of Qwen2.5-VL-3B; all of it is
trained. The batch is `--batch` rows of `--seq` tokens, text only (the decoder's figure), or with
`--video FRAMESxSIZE` a video prompt (FRAMES frames of SIZE x SIZE pixels) followed by text up to
`--seq`. The loss covers the second half of each row. FLOPs per step are `stjax.train.metrics.step_flops`
(the training loop's own MFU: `metrics.model_flops_per_token`, 6 N + attention, plus the vision
tower per real patch; the decoder's causal attention counted in full, as PaLM's MFU does; the
figure with it at half is printed beside), MFU = FLOPs / (median step time x peak), the peak from
`metrics.device_peak_flops` or `--peak-flops`. `--remat` takes a list: the first policy that fits
is reported (the others are tried only after an out-of-memory failure; `--every-remat` times
them all); the default tries `none` first. `dot_product` runs cuDNN's fused attention on the GPU (XLA's
elsewhere). The loss makes logits `--loss-chunk` positions of every row at a time (`stjax.train.loss.chunked_sft_loss`),
and only at the positions that predict a target, as the trainer does (`--all-logits`: everywhere;
the MFU counts the LM head where it runs). `--breakdown` also times the loss alone and loss + gradients, so the
optimizer's share shows; `--profile DIR` prints the step's top operations. The issue's target is
MFU >= 40%.

Largest model: for each of `--modes`, LoRA (rank 8 on q, k, v, o; bf16 frozen base), full
fine-tuning and QLoRA (the same adapters over an nf4 base with double quantization, every linear but
the LM head, as the release's cold start), the sizes are tried from the largest down, each in a
fresh process bounded by `--trial-timeout`, until one trains: one row of `--largest-seq` tokens
(text only), remat full, the compile step then one timed step. A size whose weights alone (LoRA: 2
bytes per parameter; QLoRA: the stored base, about 0.52 bytes per quantized parameter) or weights
plus optimizer state (full: 16 bytes per parameter: fp32 master, two Adam moments, fp32 gradient)
exceed the device's memory is reported as not fitting without being run. `--quantize nf4` (or
int8) stores the MFU model's base so too (with `--mfu-lora`: QLoRA's step, to set against LoRA's).
Peak device memory is `memory_stats()['peak_bytes_in_use']` (the host's peak RSS on CPU, which has no device stats).
Sizes: "1.5b" (above), "3b" and "7b" (the Qwen2.5-VL presets), "14b" (the Qwen2.5-14B decoder),
"32b" (Qwen2.5-VL-32B's decoder) and "72b" (Qwen2.5-VL-72B's), the last three with the 7B
preset's vision tower. Weights are random (normal(initializer_range) kernels, unit norms, zero
biases; a quantized base gets random codes under scales of 3 x initializer_range), made on the
device one layer at a time so that initialisation never needs more memory than the weights.

Every figure runs in a fresh child process that sets its own GPU memory policy (preallocate
`--mem-fraction` of the card, default 0.95; 0 leaves the environment as it is); this process only
orchestrates (it runs JAX on the CPU, to count parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository (when stjax is not installed)
ORIGINAL_ENV = dict(os.environ)  # what the child processes get (this process switches JAX to the CPU)

QWEN_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    tie_word_embeddings=True,
)
# name: (preset whose config is the base, text dimensions replacing the preset's, what it is)
SIZES: dict[str, tuple[str, dict | None, str]] = {
    "72b": (
        "qwen2.5-vl-7b",
        dict(
            vocab_size=152064,
            hidden_size=8192,
            intermediate_size=29568,
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            tie_word_embeddings=False,
        ),
        "Qwen2.5-VL-72B decoder + 7B vision tower",
    ),
    "32b": (
        "qwen2.5-vl-7b",
        dict(
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=27648,
            num_layers=64,
            num_heads=40,
            num_kv_heads=8,
            tie_word_embeddings=False,
        ),
        "Qwen2.5-VL-32B decoder + 7B vision tower",
    ),
    "14b": (
        "qwen2.5-vl-7b",
        dict(
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=13824,
            num_layers=48,
            num_heads=40,
            num_kv_heads=8,
            tie_word_embeddings=False,
        ),
        "Qwen2.5-14B decoder + 7B vision tower",
    ),
    "7b": ("qwen2.5-vl-7b", None, "Qwen2.5-VL-7B preset"),
    "3b": ("qwen2.5-vl-3b", None, "Qwen2.5-VL-3B preset"),
    "1.5b": ("qwen2.5-vl-3b", QWEN_1_5B, "Qwen2.5-1.5B decoder + 3B vision tower"),
    # --smoke
    "tiny-huge": (
        "tiny-qwen2.5-vl",
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=8,
            num_heads=8,
            num_kv_heads=2,
            mrope_section=(16, 24, 24),
        ),
        "tiny preset, widened",
    ),
    "tiny-wide": (
        "tiny-qwen2.5-vl",
        dict(
            hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, mrope_section=(8, 12, 12)
        ),
        "tiny preset, widened",
    ),
    "tiny": ("tiny-qwen2.5-vl", None, "tiny preset"),
}
# --smoke defaults (flags given beside --smoke still win): the tiny preset, a tiny memory to size
# against (so that "tiny-huge" exercises the does-not-fit rule), and a quick XLA backend for the children
SMOKE = dict(
    mfu_size="tiny",
    seq=256,
    batch=1,
    steps=2,
    warmup=1,
    remat="none,full",
    mfu_timeout=150.0,
    sizes="tiny-huge,tiny-wide,tiny",
    largest_seq=128,
    device_memory_gb=0.1,
    trial_timeout=150.0,
    budget=400.0,
    child_xla_flags="--xla_backend_optimization_level=0",
)
GB = 1e9


def model_config(size: str, attention: str = "xla", remat: str = "none", quantize: str = "none"):
    """The size's QwenVLConfig with bf16 parameters and compute; `quantize` stores the base so, as the
    release's cold start does (every linear but the LM head; nf4 with double quantization)."""
    from stjax.models.config import QwenVLConfig

    preset, text, _ = SIZES[size]
    cfg = QwenVLConfig.from_file(preset)
    if text:
        cfg = cfg.replace(
            text=dataclasses.replace(cfg.text, **text),
            vision=dataclasses.replace(cfg.vision, out_hidden_size=text["hidden_size"]),
        )
    return cfg.replace(
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
        attention=attention,
        remat=remat,
        quantize_base=quantize,
        quantize_targets="all",
        double_quant=quantize == "nf4",
    )


def parse_video(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    frames, size = (int(x) for x in text.lower().split("x"))
    return frames, size


# ============================================================================ child processes


def init_weights(cfg, seed: int = 0):
    """A model with random weights made by one jitted program, stacked layers one at a time."""
    import jax
    import jax.numpy as jnp
    from flax import nnx, traverse_util

    from stjax.models.qwen_vl import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg))
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    std = cfg.initializer_range

    def normal(key, shape, dtype):
        if jnp.issubdtype(dtype, jnp.integer):  # a quantized base's codes: uniformly random
            return jax.random.bits(key, shape, jnp.uint8).astype(dtype)
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    def make(key):
        values, small = {}, []
        for i, (path, leaf) in enumerate(shapes.items()):
            k = jax.random.fold_in(key, i)
            integer = jnp.issubdtype(leaf.dtype, jnp.integer)
            if path[-1] in ("absmax", "absmax_scale", "absmax_offset") and not integer:  # a quantized base's scales
                values[path] = jnp.full(leaf.shape, 3 * std, leaf.dtype)
            elif path[-1] == "scale":
                values[path] = jnp.ones(leaf.shape, leaf.dtype)
            elif path[-1] in ("bias", "lora_b"):
                values[path] = jnp.zeros(leaf.shape, leaf.dtype)
            elif np.prod(leaf.shape) < 2**24 and not integer:
                small.append(path)
            elif len(leaf.shape) >= 3 or (integer and len(leaf.shape) == 2):  # big stacked layers: one at a time
                values[path] = jax.lax.map(
                    lambda kk, s=leaf.shape[1:], d=leaf.dtype: normal(kk, s, d), jax.random.split(k, leaf.shape[0])
                )
            else:
                values[path] = normal(k, leaf.shape, leaf.dtype)
        # the small ones from one draw (one random-number program instead of one per leaf)
        sizes = [int(np.prod(shapes[p].shape)) for p in small]
        draw = normal(key, (sum(sizes),), jnp.float32)
        for path, start, size in zip(small, np.cumsum([0] + sizes[:-1]), sizes):
            values[path] = draw[start : start + size].reshape(shapes[path].shape).astype(shapes[path].dtype)
        return values

    values = jax.jit(make)(jax.random.key(seed))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


def make_batch(cfg, batch: int, seq: int, video: tuple[int, int] | None, seed: int = 0, all_logits: bool = False):
    """`batch` rows of `seq` tokens: random text, or a video prompt then random text; the loss
    covers the second half of each row, whose logits alone are made (as the trainer's batches do)
    unless `all_logits`. Returns the step's Batch (one micro-batch) on the host."""
    import jax

    from stjax.models.inputs import prepare_inputs
    from stjax.train.batch import target_positions
    from stjax.train.step import Batch

    rng = np.random.default_rng(seed)
    special = min(
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.image_token_id,
        cfg.video_token_id,
        cfg.vision_start_token_id,
        cfg.vision_end_token_id,
    )
    ids = rng.integers(0, min(special, cfg.text.vocab_size), (batch, seq))
    extra = {}
    if video:
        frames, size = video
        v = cfg.vision
        grid = (frames // v.temporal_patch_size, size // v.patch_size, size // v.patch_size)
        tokens = int(np.prod(grid)) // v.spatial_merge_size**2
        if tokens + 8 > seq // 2:
            raise ValueError(
                f"a {frames}-frame {size}x{size} video ({tokens} tokens) leaves too little of {seq} tokens"
            )
        ids[:, 4] = cfg.vision_start_token_id
        ids[:, 5 : 5 + tokens] = cfg.video_token_id
        ids[:, 5 + tokens] = cfg.vision_end_token_id
        extra = dict(
            pixel_values_videos=rng.normal(size=(batch * int(np.prod(grid)), v.patch_dim)).astype(np.float32),
            video_grid_thw=np.tile(np.asarray(grid, np.int64), (batch, 1)),
            second_per_grid_ts=np.full((batch,), float(v.temporal_patch_size), np.float32),
        )  # 1 fps
    inputs = prepare_inputs(cfg, ids, np.ones((batch, seq), np.int32), length=seq, **extra)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    stack = lambda tree: jax.tree.map(lambda x: np.asarray(x)[None], tree)
    return Batch(
        inputs=stack(inputs),
        loss_mask=loss_mask[None],
        loss_positions=None if all_logits else stack(target_positions(loss_mask)),
    )


def memory_figures() -> dict:
    """Peak and limit of device memory, or the host's peak RSS where the device keeps no stats."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {
            "peak_bytes": int(stats["peak_bytes_in_use"]),
            "limit_bytes": int(stats.get("bytes_limit", 0)),
            "memory_kind": "device",
        }
    return {
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "limit_bytes": 0,
        "memory_kind": "host RSS",
    }


def child_run(spec: dict) -> dict:
    """Build the model and state, then time `spec['steps']` steps after `spec['warmup']` untimed ones."""
    import jax

    from stjax.train.lora import with_lora
    from stjax.train.metrics import device_peak_flops, step_flops
    from stjax.train.step import OptimConfig, init_state, loss_fn, split_trainable, train_step

    device = jax.devices()[0]
    out = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__, "phase": "init"}
    try:
        cfg = model_config(spec["size"], spec["attention"], spec["remat"], spec.get("quantize", "none"))
        t0 = time.perf_counter()
        model = init_weights(cfg, seed=0)
        if spec["lora_rank"]:
            model = with_lora(model, spec["lora_rank"], alpha=float(spec["lora_rank"]))
        graphdef, trainable, frozen = split_trainable(model)
        del model
        optim = OptimConfig(total_steps=1000)
        state = jax.jit(lambda p: init_state(p, optim))(trainable)  # fp32 masters and AdamW moments
        del trainable
        jax.block_until_ready(state)
        out.update(
            init_s=time.perf_counter() - t0,
            phase="compile and first step",
            trainable=sum(int(x.size) for x in jax.tree.leaves(state.params)),
        )
        step = jax.jit(
            functools.partial(train_step, graphdef, optim, average="token", loss_chunk=spec["loss_chunk"]),
            donate_argnums=0,
        )
        batch = jax.device_put(
            make_batch(
                cfg, spec["batch"], spec["seq"], parse_video(spec["video"]), all_logits=spec.get("all_logits", False)
            )
        )
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            began = time.perf_counter()
            state, metrics = step(state, frozen, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            (times if i >= spec["warmup"] else out.setdefault("warmup_s", [])).append(time.perf_counter() - began)
            out["phase"] = "steps"
        t = cfg.text  # the decoder's attention share of the FLOPs: 12 L S (H D) per token, counted in full
        out.update(
            step_s=times,
            loss=metrics["loss"],
            skipped=int(metrics["skipped"]),
            tokens=metrics["tokens"],
            flops=step_flops(cfg, batch, metrics),
            attention_flops=12 * t.num_layers * spec["seq"] * t.num_heads * t.head_dim * metrics["tokens"],
            peak_flops=device_peak_flops(device, spec["peak_flops"]),
            ok=True,
            **memory_figures(),
        )
        if spec.get("profile"):  # two more steps under the profiler, summarised here
            from profile_summary import summary

            with jax.profiler.trace(spec["profile"]):
                for _ in range(2):
                    state, metrics = step(state, frozen, batch)
                    jax.block_until_ready(metrics)
            out["profile"] = summary(spec["profile"], top=15, steps=2)
        if spec.get("breakdown"):  # the same micro-batch through the loss alone, then loss and gradients
            from bench_forward import interleaved_medians

            micro = jax.tree.map(lambda x: x[0], batch)
            call = (
                graphdef,
                state.params,
                frozen,
                micro.inputs,
                micro.loss_mask,
                "token",
                None,
                spec["loss_chunk"],
                micro.loss_positions,
            )
            runs = [
                lambda fn=jax.jit(fn, static_argnums=(0, 5, 7)): jax.block_until_ready(fn(*call))
                for fn in (loss_fn, jax.value_and_grad(loss_fn, argnums=1))
            ]
            out["loss_s"], out["grad_s"] = interleaved_medians(runs, 3)
    except Exception as e:  # noqa: BLE001 - reported to the parent (out of memory is an expected answer)
        text = f"{type(e).__name__}: {e}"
        out.update(ok=False, error=text[:600], oom="RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())
        try:
            out.update(memory_figures())
        except Exception:  # noqa: BLE001
            pass
    return out


# ============================================================================ parent process


def fraction_variable() -> str:
    """XLA_CLIENT_MEM_FRACTION where this jaxlib reads it (newer), else XLA_PYTHON_CLIENT_MEM_FRACTION."""
    spec = importlib.util.find_spec("jaxlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        source = Path(folder) / "xla_client.py"
        if source.exists() and "XLA_CLIENT_MEM_FRACTION" in source.read_text():
            return "XLA_CLIENT_MEM_FRACTION"
    return "XLA_PYTHON_CLIENT_MEM_FRACTION"


def child_env(fraction: float, xla_flags: str = "") -> dict:
    env = dict(ORIGINAL_ENV, PYTHONUNBUFFERED="1")
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    if fraction > 0:  # both names set at once is an error in new jaxlibs
        env.pop("XLA_CLIENT_MEM_FRACTION", None)
        env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
        env[fraction_variable()] = str(fraction)
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
    return env


def run_child(spec: dict, timeout: float, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    began = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=child_env(args.mem_fraction, args.child_xla_flags)
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - began}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "ok": False,
            "error": f"exit code {proc.returncode}: " + " | ".join(tail)[-600:],
            "oom": "RESOURCE_EXHAUSTED" in proc.stderr,
            "wall_s": time.perf_counter() - began,
        }
    return dict(json.loads(lines[-1]), wall_s=time.perf_counter() - began)


@functools.cache
def weight_bytes(size: str, quantize: str = "none") -> int:
    """Bytes of the model's weights, its base stored as `quantize` says, from shapes only."""
    import jax
    from flax import nnx

    from stjax.models.qwen_vl import abstract_model

    return sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(nnx.state(abstract_model(model_config(size, quantize=quantize))))
    )


@functools.cache
def count_params(size: str) -> tuple[int, int]:
    """(all parameters, of which the vision tower), from shapes only."""
    import jax
    from flax import nnx

    from stjax.models.qwen_vl import abstract_model

    state = nnx.state(abstract_model(model_config(size)), nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    total = sum(int(np.prod(x.shape)) for _, x in leaves)
    vision = sum(int(np.prod(x.shape)) for p, x in leaves if "visual" in jax.tree_util.keystr(p))
    return total, vision


def nvidia_memory() -> float:
    """Total memory of GPU 0 in bytes from nvidia-smi (0 when there is none)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        return float(out[0]) * 2**20 if out else 0.0
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0.0


def gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def si(x: float, billion: str = "B") -> str:
    """1.54B, 238K, 56.3T: three significant figures and a magnitude letter (`billion`: B or G)."""
    for scale, letter in ((1e15, "P"), (1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{letter}"
    return f"{x:.3g}"


def part_mfu(args, report: dict) -> None:
    total, vision = count_params(args.mfu_size)
    video = parse_video(args.video)
    what = "text only" if not video else f"a {video[0]}-frame {video[1]}x{video[1]} video prompt + text"
    double = " with double quantization" if args.quantize == "nf4" else ""
    base = f"{args.quantize} base{double} (every linear but the LM head), " if args.quantize != "none" else ""
    print(
        f"\n[MFU] {args.mfu_size}: {SIZES[args.mfu_size][2]}, {si(total)} parameters "
        f"(decoder {si(total - vision)}, vision {si(vision)}), "
        f"{f'LoRA rank {args.lora_rank} on q, k, v, o trained' if args.mfu_lora else 'all trained'}; "
        f"{base}bf16 params and "
        f"compute, fp32 masters + AdamW; attention={args.attention}; {args.batch} x {args.seq} tokens ({what}); "
        f"loss chunk {args.loss_chunk}"
    )
    for remat in args.remat.split(","):
        spec = dict(
            size=args.mfu_size,
            attention=args.attention,
            remat=remat,
            lora_rank=args.lora_rank if args.mfu_lora else 0,
            batch=args.batch,
            seq=args.seq,
            video=args.video,
            steps=args.steps,
            warmup=args.warmup,
            peak_flops=args.peak_flops,
            loss_chunk=args.loss_chunk,
            breakdown=args.breakdown,
            profile=args.profile,
            all_logits=args.all_logits,
            quantize=args.quantize,
        )
        r = run_child(spec, args.mfu_timeout, args)
        report.setdefault("mfu", []).append(dict(spec, **r))
        if not r["ok"]:
            where = f" in {r['phase']}" if "phase" in r else ""
            print(f"  remat={remat}: failed{where} after {r['wall_s']:.0f} s: {r['error']}")
            if r.get("oom"):
                continue  # the next policy stores less
            break
        t = float(np.median(r["step_s"]))
        flops_per_s = r["flops"] / t
        print(
            f"  device {r['device']} (jax {r['jax']}); init {r['init_s']:.1f} s, compile + first step "
            f"{r['warmup_s'][0]:.1f} s"
        )
        line = (
            f"  remat={remat}: step {t * 1e3:.1f} ms (median of {len(r['step_s'])}, min {min(r['step_s']) * 1e3:.1f})"
            f"  {r['tokens'] / t:,.0f} tokens/s  {si(r['flops'], 'G')}FLOP/step -> "
            f"{flops_per_s / 1e12:.4g} model TFLOP/s"
        )
        if r["peak_flops"]:
            causal = (r["flops"] - r["attention_flops"] / 2) / t  # causal attention counted at half
            line += (
                f"  MFU {100 * flops_per_s / r['peak_flops']:.1f}% of {r['peak_flops'] / 1e12:.0f} TFLOP/s "
                f"(target >= 40%; {100 * causal / r['peak_flops']:.1f}% with causal attention counted at half)"
            )
        else:
            line += "  MFU: no known peak for this device (pass --peak-flops)"
        print(line)
        print(
            f"  peak {r['memory_kind']} memory {gib(r['peak_bytes'])}"
            + (f" of {gib(r['limit_bytes'])}" if r["limit_bytes"] else "")
            + f"; loss {r['loss']:.3f}, skipped steps {r['skipped']}"
        )
        print("\n".join("  " + line for line in r.get("profile", [])))
        if "grad_s" in r:
            print(
                f"  breakdown (median of 3): loss alone {r['loss_s'] * 1e3:.1f} ms, loss + gradients "
                f"{r['grad_s'] * 1e3:.1f} ms, the rest of the step (optimizer, clipping) "
                f"{(t - r['grad_s']) * 1e3:.1f} ms"
            )
        report["device_memory"] = r["limit_bytes"] or report.get("device_memory", 0)
        if not args.every_remat:
            break


def part_largest(args, report: dict) -> None:
    began = time.perf_counter()
    limit = args.device_memory_gb * GB or report.get("device_memory") or nvidia_memory() * args.mem_fraction
    sizes = sorted(args.sizes.split(","), key=lambda s: -count_params(s)[0])
    print(
        f"\n[largest] one device, 1 x {args.largest_seq} tokens (text only), remat=full, attention={args.attention}, "
        f"bf16 params and compute; LoRA: rank {args.lora_rank} on q, k, v, o, frozen bf16 base; full: fp32 "
        f"masters + AdamW; QLoRA: LoRA over an nf4 base (double quantization, every linear but the LM head); "
        f"memory for the run: {gib(limit) if limit else 'unknown'}"
    )
    print(f"  {'mode':<5s} {'size':<10s} {'params':>8s} {'at least':>10s}  result")
    largest = {}
    least = {
        "lora": lambda size: weight_bytes(size),
        "qlora": lambda size: weight_bytes(size, "nf4"),
        "full": lambda size: 16 * count_params(size)[0],
    }
    for mode in args.modes.split(","):
        for size in sizes:
            total, _ = count_params(size)
            need = least[mode](size)
            head = f"  {mode:<5s} {size:<10s} {si(total):>8s} {gib(need):>10s}  "
            row = dict(mode=mode, size=size, params=total, least_bytes=need)
            report.setdefault("largest", []).append(row)
            if limit and need > limit:
                row.update(ok=False, error="does not fit")
                print(
                    head + f"does not fit: {'weights + optimizer state' if mode == 'full' else 'weights'} alone "
                    f"exceed {gib(limit)}"
                )
                continue
            left = args.budget - (time.perf_counter() - began)
            if left < 20:
                row.update(ok=False, error="not tried (time budget)")
                print(head + f"not tried: the --budget of {args.budget:.0f} s is spent")
                continue
            spec = dict(
                size=size,
                attention=args.attention,
                remat="full",
                lora_rank=args.lora_rank if mode != "full" else 0,
                batch=1,
                seq=args.largest_seq,
                video="",
                steps=1,
                warmup=1,
                peak_flops=args.peak_flops,
                loss_chunk=args.loss_chunk,
                quantize="nf4" if mode == "qlora" else "none",
            )
            r = run_child(spec, min(args.trial_timeout, left), args)
            row.update(r)
            if r.get("limit_bytes") and not args.device_memory_gb:
                limit = r["limit_bytes"]
            if r["ok"]:
                mfu = f", MFU {100 * r['flops'] / r['step_s'][0] / r['peak_flops']:.1f}%" if r["peak_flops"] else ""
                print(
                    head + f"trains: peak {r['memory_kind']} memory {gib(r['peak_bytes'])}, step "
                    f"{r['step_s'][0]:.2f} s{mfu}, loss {r['loss']:.3f} ({r['wall_s']:.0f} s in all)"
                )
                largest[mode] = f"{size} ({si(total)} parameters)"
                break
            where = f" in {r['phase']}" if "phase" in r else ""
            print(head + f"fails{where}: {'out of memory' if r.get('oom') else r['error'][:300]} ({r['wall_s']:.0f} s)")
    names = {"lora": "LoRA", "full": "full fine-tuning", "qlora": "QLoRA"}
    print(
        "  largest that trains on this device: "
        + "; ".join(f"{names[mode]} {largest.get(mode, 'none of these')}" for mode in args.modes.split(","))
    )
    report["largest_that_trains"] = largest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", default="all", choices=["all", "mfu", "largest"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device exists (CPU: < 1 minute)")
    parser.add_argument("--mfu-size", default="1.5b", choices=sorted(SIZES))
    parser.add_argument(
        "--mfu-lora",
        action="store_true",
        help="train LoRA adapters (rank --lora-rank on q, k, v, o) on a frozen bf16 base (MFU; the "
        "FLOPs still count the base's weight gradients, which LoRA skips: read the step time)",
    )
    parser.add_argument("--seq", type=int, default=4096, help="tokens per row (MFU)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (MFU)")
    parser.add_argument("--video", default="", help="FRAMESxSIZE: a video prompt in every row (MFU), e.g. 8x336")
    parser.add_argument(
        "--remat",
        default="none,dots,full",
        help="remat policies for MFU, first that fits (none, dots, dots_attention, full)",
    )
    parser.add_argument(
        "--every-remat", action="store_true", help="time every --remat policy, not only the first that fits"
    )
    parser.add_argument("--attention", default="dot_product", help="attention backend (xla, dot_product, pallas_tpu)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (MFU)")
    parser.add_argument(
        "--loss-chunk", type=int, default=512, help="positions per slice of logits in the loss (0: all)"
    )
    parser.add_argument(
        "--all-logits",
        action="store_true",
        help="make logits at every position, not only where the loss needs them (MFU)",
    )
    parser.add_argument(
        "--profile", default="", help="trace two more steps into this folder and print the top operations (MFU)"
    )
    parser.add_argument("--breakdown", action="store_true", help="also time the loss alone and loss + gradients (MFU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, compilation included (MFU)")
    parser.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (default: looked up)")
    parser.add_argument("--mfu-timeout", type=float, default=150.0, help="seconds for each MFU child process")
    parser.add_argument("--sizes", default="72b,32b,14b,7b,3b,1.5b", help="sizes to try for the largest model")
    parser.add_argument("--largest-seq", type=int, default=2048, help="tokens of the largest-model trials")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--modes", default="lora,full", help="largest model: any of lora, full, qlora")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "nf4", "int8"],
        help="MFU: the base stored so (every linear but the LM head; nf4 with double quantization)",
    )
    parser.add_argument("--trial-timeout", type=float, default=90.0, help="seconds for each largest-model trial")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for all largest-model trials")
    parser.add_argument(
        "--device-memory-gb",
        type=float,
        default=0.0,
        help="memory to size against (default: the device's limit as the children report it)",
    )
    parser.add_argument(
        "--mem-fraction",
        type=float,
        default=0.95,
        help="GPU memory the children preallocate (0: leave the environment alone)",
    )
    parser.add_argument("--child-xla-flags", default="", help="appended to XLA_FLAGS in the child processes")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    if "--smoke" in sys.argv[1:]:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child_run(json.loads(args.child))))
        return
    os.environ["JAX_PLATFORMS"] = "cpu"  # this process only counts parameters; children get the device
    import jax

    report: dict = {"args": vars(args), "orchestrator_jax": jax.__version__}
    if args.part in ("all", "mfu"):
        part_mfu(args, report)
    if args.part in ("all", "largest"):
        part_largest(args, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
