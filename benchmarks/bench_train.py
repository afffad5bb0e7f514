"""SFT train-step throughput and host memory: stjax's `compiled_train_step` vs a transformers
(PyTorch) step, same architecture, same weights, same batch, same device, fp32.

    python benchmarks/bench_train.py [--arch qwen2_5_vl] [--steps 5] [--frames 8] [--size 336] [--lora]
        [--remat none,dots,full] [--attention xla] [--xla-flags "..."] [--torch-adamw default,fused] [--scale 1]
    python benchmarks/bench_train.py --memory-only            # peak RSS per parameter, fresh processes
    python benchmarks/bench_train.py --qlora [--steps 5]      # LoRA over a bf16 base vs over its nf4 / int8 copy

Throughput: bench_forward's mid-size config (text hidden 512 x 4 layers, vocab 8192, vision hidden
256 x depth 4; `--scale` multiplies widths and depths), one SFT row: an 8-frame 336x336 video prompt
(64 text tokens around it) followed by a 62-token answer; the loss is the token cross-entropy over
the answer (loss mask); AdamW (same lr / betas / eps, no weight decay, warmup + cosine) with
global-norm clipping on both sides; transformers with `sdpa` attention, torch.set_num_threads(cores).
The defaults give 704 tokens, exactly a stjax shape bucket (no padding). tokens/s counts the real
tokens of the row. stjax makes logits only at the positions that predict an answer token, as its
trainer does (`stjax.train.batch.loss_positions`; `--all-logits` also times logits everywhere, as
transformers does with `labels`). `--lora` also times LoRA rank 8 on the decoder's q, k, v, o
(stjax `with_lora`; torch: a hand-written adapter with the same initial A and B, since peft is not
installed here).

Timing: after --warmup untimed steps each, the variants (stjax ones, then torch ones) take steps in
turn. The machine may be shared: a step during which other processes used more than --quiet of the
cores (from /proc/stat) is set aside and another is run, up to --max-rounds rounds; the median of
the quiet steps is reported (of all steps if too few were quiet). Both sides start from the same
weights, so their losses after the same number of steps agree (a check that the steps match).

`--qlora`: stjax alone, the same config and row: LoRA r8 on q, k, v, o over a bf16 base against the
same over that base stored quantized (`lora.quantize_base` nf4, nf4 with double quantization, int8;
`quantize_targets: all`, every linear but the LM head) and over its float32 copy, float32 compute,
the steps taken in turn as above: what dequantizing the frozen weights at every step costs.

Memory (`--memory` / `--memory-only`): a text-heavy model (~250M parameters: text hidden 1024 x 16
layers, vocab 32768, a small vision tower), each case in a fresh process that runs a few steps on a
192-token video + text row and reports its peak RSS (getrusage ru_maxrss); plus the RSS of a
process that only imported the framework. The stjax cases drop the initial model once the train
state (master copy + optimizer state) is made, as a training loop would. `stjax-lora-bf16` and
`stjax-qlora-nf4` load the model from a bf16 Hugging Face checkpoint (written first by another
process) as the trainer does, the latter quantizing it on load, and report the bytes their frozen
base holds per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository (when stjax is not installed)
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def cores() -> int:
    return len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- configs and batch


def mem_config(arch: str, layers: int = 16):
    """Text-heavy ~250M-parameter config for the memory figures."""
    from stjax.models.config import QwenVLConfig

    cfg = QwenVLConfig.from_file("tiny-qwen2.5-vl" if arch == "qwen2_5_vl" else "tiny-qwen2-vl")
    text = cfg.text.__class__(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=4,
        mrope_section=(8, 12, 12),
    )
    vision = cfg.vision.__class__(
        **{
            **cfg.vision.__dict__,
            "depth": 2,
            "hidden_size": 256,
            "num_heads": 4,
            "intermediate_size": 1024,
            "out_hidden_size": 1024,
            "fullatt_block_indexes": (1,) if arch == "qwen2_5_vl" else (),
        }
    )
    return cfg.replace(text=text, vision=vision, initializer_range=0.02)


def sft_row(cfg, text: int, frames: int, size: int, answer: int, seed: int = 0) -> dict:
    """One row: text, a video, text (the prompt), then `answer` random tokens; loss_mask marks the answer."""
    from reference import make_batch, rope_index

    grid = size // 14
    prompt = make_batch(cfg, [[text // 2, ("video", frames // 2, grid, grid), text - text // 2]], seed=seed)
    answers = np.random.default_rng(seed + 100).integers(0, 400, (1, answer))
    ids = np.concatenate([prompt["input_ids"], answers], axis=1)
    mask = np.ones_like(ids)
    full = dict(prompt, input_ids=ids, attention_mask=mask)
    full["position_ids"], _ = rope_index(
        ids, mask, None, prompt.get("video_grid_thw"), prompt.get("second_per_grid_ts"), cfg
    )
    loss_mask = np.zeros_like(mask)
    loss_mask[:, -answer:] = 1
    return dict(full, loss_mask=loss_mask)


def optim_config():
    from stjax.train.step import OptimConfig

    # A small lr keeps the two runs close over the benchmark's steps (the losses are compared).
    return OptimConfig(learning_rate=1e-5, total_steps=1000, warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=0.3)


# ----------------------------------------------------------------------------- stjax side


def stjax_batch(cfg, row: dict):
    import jax

    from stjax.models.inputs import prepare_inputs
    from stjax.train.batch import target_positions
    from stjax.train.step import Batch

    args = {k: v for k, v in row.items() if k != "loss_mask"}
    inputs = prepare_inputs(cfg, **args)
    length = inputs.input_ids.shape[1]
    loss_mask = np.pad(row["loss_mask"], ((0, 0), (0, length - row["loss_mask"].shape[1])))
    stack = lambda tree: jax.tree.map(lambda x: np.asarray(x)[None], tree)
    return jax.device_put(
        Batch(inputs=stack(inputs), loss_mask=stack(loss_mask), loss_positions=stack(target_positions(loss_mask)))
    ), length


class StjaxStep:
    """Holds the train state (donated and replaced every step) and runs one compiled step."""

    def __init__(self, model, optim, batch):
        import jax

        from stjax.train.step import init_state, split_trainable

        self.graphdef, params, self.frozen = split_trainable(model)
        self.state = init_state(params, optim)
        self.optim, self.batch = optim, batch
        self.metrics = None
        self.steps = 0
        self.count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    def __call__(self):
        import jax

        from stjax.train.step import compiled_train_step

        self.state, self.metrics = compiled_train_step(self.graphdef, self.optim, self.state, self.frozen, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        self.steps += 1

    def loss(self) -> float:
        return float(self.metrics["loss"])


# ----------------------------------------------------------------------------- torch side


def torch_lora(ref, rank: int, alpha: float, std: float, init: dict | None = None):
    """Freeze `ref` and wrap the decoder's q, k, v, o projections with LoRA adapters
    (y = W x + b + alpha / r * B A x, B = 0 at the start). `init[(layer, name)] = (A, B)` sets them."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, a, b):
            super().__init__()
            self.base = base
            self.lora_A = torch.nn.Parameter(a)
            self.lora_B = torch.nn.Parameter(b)
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + self.scale * torch.nn.functional.linear(
                torch.nn.functional.linear(x, self.lora_A), self.lora_B
            )

    for p in ref.parameters():
        p.requires_grad_(False)
    pattern = re.compile(r"(.*language_model\.layers\.(\d+)\.self_attn)\.([qkvo]_proj)$")
    for name, module in list(ref.named_modules()):
        m = pattern.match(name)
        if not m:
            continue
        parent, layer, proj = ref.get_submodule(m.group(1)), int(m.group(2)), m.group(3)
        if init is not None:
            a, b = (torch.from_numpy(np.ascontiguousarray(x)) for x in init[(layer, proj)])
        else:
            a = torch.randn(rank, module.in_features) * std
            b = torch.zeros(module.out_features, rank)
        setattr(parent, proj, LoRALinear(module, a.to(module.weight.dtype), b.to(module.weight.dtype)))
    return ref


class TorchStep:
    """zero_grad, forward with labels (-100 outside the loss mask), backward, clip, AdamW, schedule."""

    def __init__(self, ref, optim, row: dict, adamw: str = "default"):
        import torch

        self.model = ref.train()
        self.params = [p for p in ref.parameters() if p.requires_grad]
        self.count = sum(p.numel() for p in self.params)
        impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
        self.opt = torch.optim.AdamW(
            self.params,
            lr=optim.learning_rate,
            betas=(optim.adam_beta1, optim.adam_beta2),
            eps=optim.adam_epsilon,
            weight_decay=optim.weight_decay,
            **impl,
        )
        # the same warmup + cosine schedule, tabulated once (no JAX work inside the timed step)
        lrs = np.asarray(optim.schedule()(np.arange(optim.total_steps + 1)), np.float64) / optim.learning_rate
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: float(lrs[min(step, len(lrs) - 1)]))
        self.max_norm = optim.max_grad_norm
        keep = (
            "input_ids",
            "attention_mask",
            "position_ids",
            "pixel_values_videos",
            "video_grid_thw",
            "pixel_values",
            "image_grid_thw",
        )
        self.kwargs = {k: torch.from_numpy(np.asarray(row[k])) for k in keep if k in row}
        labels = np.where(row["loss_mask"] == 1, row["input_ids"], -100)
        self.kwargs["labels"] = torch.from_numpy(labels)
        self.last = None
        self.steps = 0

    def __call__(self):
        import torch

        self.opt.zero_grad(set_to_none=True)
        loss = self.model(**self.kwargs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        self.sched.step()
        self.last = loss.detach()
        self.steps += 1

    def loss(self) -> float:
        return float(self.last)


# ----------------------------------------------------------------------------- throughput


def busy_seconds() -> float:
    """CPU time used by the whole machine so far (all processes, /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, share of the machine's cores used by other processes meanwhile)."""
    busy, own, start = busy_seconds(), own_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    foreign = (busy_seconds() - busy) - (own_seconds() - own)
    return wall, max(foreign, 0.0) / (wall * cores())


def interleaved_times(
    fns: list, repeats: int, warmup: int = 2, quiet: float = 1.0, max_rounds: int = 0
) -> list[list[tuple[float, float]]]:
    """(wall time, foreign CPU share) of each step, the functions run in turn so that machine load
    hits all alike. A step during which other processes used more than `quiet` of the cores counts
    as disturbed: rounds go on (up to `max_rounds`) until each function has `repeats` quiet steps."""
    for fn in fns:  # compile / warm up
        for _ in range(warmup):
            fn()
    runs = [[] for _ in fns]
    quiet_count = lambda r: sum(share <= quiet for _, share in r)
    for _ in range(max(max_rounds, repeats)):
        if all(quiet_count(r) >= repeats for r in runs):
            break
        for fn, r in zip(fns, runs):
            if quiet_count(r) < repeats:
                r.append(timed(fn))
    return runs


def lora_init_from(model) -> dict:
    """stjax's adapters as torch (A (r, in), B (out, r)) per (layer, projection)."""
    layers = model.model.layers
    out = {}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(layers, proj)
        a, b = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...])  # (layers, in, r), (layers, r, out)
        for i in range(a.shape[0]):
            out[(i, proj)] = (a[i].T, b[i].T)
    return out


def throughput(args) -> None:
    import copy

    import jax
    import torch
    from bench_forward import best_matmul_rate, forward_flops, mid_config
    from reference import hf_model

    from stjax.models.loading import load_pretrained
    from stjax.train.lora import with_lora

    torch.set_num_threads(cores())
    cfg = mid_config(args.arch, args.scale)
    row = sft_row(cfg, args.text, args.frames, args.size, args.answer)
    optim = optim_config()
    ref = hf_model(cfg, dtype=torch.float32)
    ref.set_attn_implementation(args.torch_attention)
    remats = args.remat.split(",")
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        for remat in remats:
            models[remat], _ = load_pretrained(tmp, attention=args.attention, remat=remat)
    batch, length = stjax_batch(cfg, row)
    tokens = row["input_ids"].shape[1]
    n_params = sum(p.numel() for p in ref.parameters())

    print(
        f"machine: {cpu_model()}, {cores()} cores; jax {jax.__version__} ({jax.devices()[0].device_kind}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); fp32"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(
        f"{args.arch}: {n_params / 1e6:.1f}M params ({cfg.vision.depth} vision / {cfg.text.num_layers} text layers, "
        f"text hidden {cfg.text.hidden_size}, vocab {cfg.text.vocab_size}); {args.frames} frames "
        f"{args.size}x{args.size}, {tokens} tokens ({args.answer} answer tokens in the loss; stjax bucket {length})"
    )

    def run(label: str, ours: dict, theirs: dict, flops: float = 0.0) -> None:
        """Time the variants in turn; `flops` (when given) prints the floor of a step at the best
        matrix-product rate measured here (`bench_forward.best_matmul_rate`)."""
        steps = {**{f"stjax {n}": f for n, f in ours.items()}, **{f"torch {n}": f for n, f in theirs.items()}}
        t0 = time.perf_counter()
        runs = interleaved_times(list(steps.values()), args.steps, args.warmup, args.quiet, args.max_rounds)
        wall = time.perf_counter() - t0
        times, notes = {}, {}
        for name, r in zip(steps, runs):
            quiet = [t for t, share in r if share <= args.quiet]
            use = quiet if len(quiet) >= max(1, args.steps // 2) else [t for t, _ in r]
            times[name] = float(np.median(use))
            notes[name] = (
                f"min {min(use) * 1e3:7.1f}, {len(quiet)}/{len(r)} quiet, "
                f"others {np.mean([sh for _, sh in r]) * 100:3.0f}%"
            )
        best_torch = min((n for n in steps if n.startswith("torch")), key=times.get)
        first = lambda d: next(iter(d.values()))
        print(
            f"\n[{label}] trainable params: stjax {first(ours).count / 1e6:.3f}M, "
            f"torch {first(theirs).count / 1e6:.3f}M; "
            f"median of the quiet steps (other processes <= {args.quiet:.0%} of the cores) after {args.warmup} "
            f"warm-up steps each ({wall:.0f} s in all)"
        )
        for name, fn in steps.items():
            t = times[name]
            print(
                f"  {name:<32s} {t * 1e3:8.1f} ms/step ({notes[name]})  {tokens / t:7.1f} tokens/s  "
                f"loss {fn.loss():.6f} after {fn.steps} steps"
            )
        print(
            f"  stjax/torch tokens/s (against the fastest torch variant, {best_torch.split(' ', 1)[1]}): "
            + ", ".join(
                f"{n.split(' ', 1)[1]} {times[best_torch] / times[n]:.2f}x" for n in steps if n.startswith("stjax")
            )
        )
        if flops:
            rate = best_matmul_rate()
            floor, fastest = flops / rate, min(times[n] for n in steps if n.startswith("stjax"))
            print(
                f"  floor: torch's {flops / 1e9:.1f} GFLOP per step (logits at every position) at "
                f"{rate / 1e9:.0f} GFLOP/s (the best 2048^3 float32 matrix product here) take "
                f"{floor * 1e3:.0f} ms: computing what torch computes, "
                f"at most {times[best_torch] / floor:.2f}x faster than torch; torch runs at "
                f"{flops / times[best_torch] / 1e9:.0f} GFLOP/s, stjax in {fastest * 1e3:.0f} ms"
            )

    adamws = args.torch_adamw.split(",")
    torch_name = lambda a: f"attn={args.torch_attention} adamw={a}"
    if not args.lora_only:
        ours = {f"remat={r} attn={args.attention}": StjaxStep(models[r], optim, batch) for r in remats}
        if args.all_logits:  # the trainer's default makes logits at the loss positions only
            ours.update(
                {
                    f"remat={r} attn={args.attention} all logits": StjaxStep(
                        models[r], optim, batch.replace(loss_positions=None)
                    )
                    for r in remats
                }
            )
        theirs = {torch_name(a): TorchStep(copy.deepcopy(ref), optim, row, a) for a in adamws}
        # A training step is three forwards' worth of FLOPs (the backward two).
        run("full fine-tuning", ours, theirs, 3 * forward_flops(cfg, tokens, row["video_grid_thw"][0]))
        del ours, theirs
    if args.lora or args.lora_only:
        lora_models = {r: with_lora(models[r], args.lora_rank, alpha=args.lora_alpha) for r in remats}
        del models
        init = lora_init_from(lora_models[remats[0]])
        ours = {f"lora remat={r} attn={args.attention}": StjaxStep(m, optim, batch) for r, m in lora_models.items()}
        theirs = {
            torch_name(a): TorchStep(
                torch_lora(copy.deepcopy(ref), args.lora_rank, args.lora_alpha, cfg.initializer_range, init),
                optim,
                row,
                a,
            )
            for a in adamws
        }
        run(f"LoRA rank {args.lora_rank} on q,k,v,o (torch: hand-written adapters)", ours, theirs)


def qlora_throughput(args) -> None:
    import jax
    from bench_forward import mid_config
    from flax import nnx, traverse_util

    from stjax.models.loading import model_from_params, quantize_model
    from stjax.models.qwen_vl import init_model
    from stjax.train.lora import with_lora

    cfg = mid_config(args.arch, args.scale).replace(
        param_dtype="bfloat16", attention=args.attention, remat=args.remat.split(",")[0]
    )
    row = sft_row(cfg, args.text, args.frames, args.size, args.answer)
    batch, length = stjax_batch(cfg, row)
    base = init_model(cfg, seed=0)
    values = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(base)))
    bases = {"float32": model_from_params(cfg.replace(param_dtype="float32"), values), "bf16": base}  # same values
    for name, fmt, double_quant in (("nf4", "nf4", False), ("nf4 double_quant", "nf4", True), ("int8", "int8", False)):
        bases[name] = quantize_model(base, quantize_base=fmt, quantize_targets="all", double_quant=double_quant)
    steps = {
        name: StjaxStep(with_lora(m, args.lora_rank, alpha=args.lora_alpha), optim_config(), batch)
        for name, m in bases.items()
    }
    frozen = {name: sum(x.nbytes for x in jax.tree.leaves(step.frozen)) for name, step in steps.items()}
    print(
        f"machine: {cpu_model()}, {cores()} cores; jax {jax.__version__}; float32 compute, remat={cfg.remat}, "
        f"attn={cfg.attention}"
    )
    print(
        f"{args.arch}: LoRA r{args.lora_rank} on q, k, v, o over a frozen base (every linear but the LM head "
        f"stored as named), {row['input_ids'].shape[1]} tokens (bucket {length})"
    )
    t0 = time.perf_counter()
    runs = interleaved_times(list(steps.values()), args.steps, args.warmup, args.quiet, args.max_rounds)
    quiet = {name: [t for t, share in r if share <= args.quiet] for name, r in zip(steps, runs)}
    times = {
        name: float(np.median(quiet[name] if len(quiet[name]) >= max(1, args.steps // 2) else [t for t, _ in r]))
        for name, r in zip(steps, runs)
    }
    for (name, step), r in zip(steps.items(), runs):
        print(
            f"  {name + ' base':<22s} {times[name] * 1e3:8.1f} ms/step ({len(quiet[name])}/{len(r)} quiet)  "
            f"x{times[name] / times['bf16']:.2f} of bf16  frozen base {frozen[name] / 2**20:6.1f} MiB  "
            f"loss {step.loss():.4f} after {step.steps} steps"
        )
    print(f"  ({time.perf_counter() - t0:.0f} s in all)")


# ----------------------------------------------------------------------------- memory


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def memory_child(mode: str, args) -> dict:
    """One case in this (fresh) process; returns the figures as a dict."""
    out = {"mode": mode}
    if mode == "jax-import":
        import jax

        from stjax.train.step import compiled_train_step

        assert compiled_train_step is not None  # stjax's model and train modules imported
        jax.numpy.zeros(1).block_until_ready()  # the backend initialised
        return dict(out, peak=peak_rss(), rss=rss_now())
    if mode == "torch-import":
        import torch
        import transformers

        assert transformers.Qwen2VLForConditionalGeneration  # the model module imported
        torch.zeros(1)
        return dict(out, peak=peak_rss(), rss=rss_now())

    cfg = mem_config(args.arch, args.mem_layers)
    row = sft_row(cfg, 62, 2, 224, 64)  # 64 vision tokens + 2 + 62 + 64 = 192 tokens, a bucket
    optim = optim_config()
    if mode == "checkpoint":  # the bf16 Hugging Face directory that the loading cases read
        from flax import nnx, traverse_util

        from stjax.models.loading import save_hf
        from stjax.models.qwen_vl import init_model

        model = init_model(cfg.replace(param_dtype="bfloat16"), seed=0)
        save_hf(args.checkpoint, model.config, traverse_util.flatten_dict(nnx.to_pure_dict(nnx_params(model))))
        return out
    if mode.startswith("stjax"):
        import jax

        from stjax.models.loading import load_pretrained
        from stjax.models.qwen_vl import abstract_model, init_model
        from stjax.train.lora import with_lora

        if mode in ("stjax-lora-bf16", "stjax-qlora-nf4"):  # loaded as the trainer loads, fp32 compute
            quantize = dict(quantize_base="nf4", quantize_targets="all") if mode == "stjax-qlora-nf4" else {}
            model, _ = load_pretrained(args.checkpoint, compute_dtype="float32", **quantize)
        else:
            model = init_model(cfg, seed=0)
        out["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx_params(abstract_model(cfg))))
        if "lora" in mode:
            model = with_lora(model, 8)
        batch, _ = stjax_batch(cfg, row)
        step = StjaxStep(model, optim, batch)
        del model  # a training loop keeps the state (and the frozen base), not the initial model
        out["frozen_bytes"] = sum(x.nbytes for x in jax.tree.leaves(step.frozen))
    else:
        import torch
        from reference import hf_model

        torch.set_num_threads(cores())
        ref = hf_model(cfg, dtype=torch.float32)
        ref.set_attn_implementation("sdpa")
        out["params"] = sum(p.numel() for p in ref.parameters())
        if mode == "torch-lora":
            ref = torch_lora(ref, 8, 8.0, cfg.initializer_range)
        step = TorchStep(ref, optim, row, args.torch_adamw.split(",")[0])
        del ref
    out["trainable"] = step.count
    out["rss_before_steps"] = rss_now()
    times = []
    for _ in range(args.mem_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out.update(peak=peak_rss(), rss=rss_now(), loss=step.loss(), step_s=times)
    return out


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def memory(args) -> None:
    modes = [
        "jax-import",
        "torch-import",
        "checkpoint",
        "stjax-full",
        "stjax-lora",
        "stjax-lora-bf16",
        "stjax-qlora-nf4",
        "torch-full",
        "torch-lora",
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--arch",
                args.arch,
                "--mem-layers",
                str(args.mem_layers),
                "--mem-steps",
                str(args.mem_steps),
                "--torch-adamw",
                args.torch_adamw,
                "--checkpoint",
                str(Path(tmp) / "bf16"),
            ]  # XLA_FLAGS: inherited
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode or not lines:
                print(f"{mode}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            results[mode] = json.loads(lines[-1])
    gb = lambda b: f"{b / 2**30:6.2f} GiB"
    print(f"\nPeak host RSS ({args.arch}, {args.mem_steps} steps, 192-token video + text row), fresh process each:")
    base = {
        "stjax": results.get("jax-import", {}).get("peak", 0),
        "torch": results.get("torch-import", {}).get("peak", 0),
    }
    for mode in ("jax-import", "torch-import"):
        if mode in results:
            print(f"  {mode:<12s} peak {gb(results[mode]['peak'])}  (import + backend only)")
    for mode in ("stjax-full", "stjax-lora", "stjax-lora-bf16", "stjax-qlora-nf4", "torch-full", "torch-lora"):
        r = results.get(mode)
        if r is None:
            continue
        n = r["params"]
        b = base[mode.split("-")[0]]
        frozen = f"  frozen base {r['frozen_bytes'] / n:.3f} B/param" if r.get("frozen_bytes") else ""
        print(
            f"  {mode:<15s} peak {gb(r['peak'])}  params {n / 1e6:.1f}M (trainable {r['trainable'] / 1e6:.2f}M)  "
            f"{r['peak'] / n:5.2f} B/param  ({(r['peak'] - b) / n:5.2f} B/param above the import baseline)  "
            f"before steps {gb(r['rss_before_steps'])}  step {np.median(r['step_s']):.2f} s  loss {r['loss']:.4f}"
            + frozen
        )


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.1,
        help="a timed step counts only if other processes used at most this share of the cores meanwhile",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=0,
        help="give up waiting for quiet steps after this many "
        "rounds (default 3 x --steps); the median is then over all steps",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (compilation)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=336, help="frame side in pixels (a multiple of 28)")
    parser.add_argument("--text", type=int, default=64, help="prompt text tokens around the video")
    parser.add_argument("--answer", type=int, default=62, help="answer tokens (the loss mask)")
    parser.add_argument("--scale", type=int, default=1, help="multiply bench_forward's widths and depths")
    parser.add_argument("--lora", action="store_true", help="also time LoRA (rank --lora-rank on q,k,v,o)")
    parser.add_argument("--lora-only", action="store_true", help="time LoRA only")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=8.0)
    parser.add_argument(
        "--remat", default="none", help="stjax remat policies to time, comma-separated (none,dots,full)"
    )
    parser.add_argument("--attention", default="cpu_flash", help="stjax attention backend")
    parser.add_argument(
        "--all-logits",
        action="store_true",
        help="also time stjax making logits at every position, not only where the loss needs them",
    )
    parser.add_argument("--torch-attention", default="sdpa", help="transformers attn_implementation")
    parser.add_argument(
        "--torch-adamw",
        default="default",
        help="torch AdamW implementations to time, comma-separated: default (for-loop on CPU), foreach, fused",
    )
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS per parameter")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--mem-layers", type=int, default=16, help="text layers of the memory model")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument(
        "--qlora", action="store_true", help="time LoRA over a bf16 base against over its float32, nf4 and int8 copies"
    )
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # the memory cases' bf16 checkpoint
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    args.max_rounds = args.max_rounds or 3 * args.steps
    if args.child:
        print(json.dumps(memory_child(args.child, args)))
        return
    if args.qlora:
        qlora_throughput(args)
    elif not args.memory_only:
        throughput(args)
    if args.memory or args.memory_only:
        memory(args)


if __name__ == "__main__":
    main()
