"""A GRPO step on one accelerator, by parts: rollout tokens/s, the decoding loop's share of the
card's memory bandwidth, and the update's MFU, for a Qwen2.5-VL-3B-shaped model with video prompts.

    python benchmarks/bench_grpo_gpu.py [--size 3b] [--prompts 2] [--generations 8] [--tokens 256]
                                        [--video 8x336] [--remat dots_attention] [--peak-flops 989e12]
                                        [--peak-bandwidth 3.35e12]
    python benchmarks/bench_grpo_gpu.py --smoke     # tiny shapes, the same code paths, CPU, < 1 minute

The model is `bench_train_gpu.model_config(size)` (bf16 parameters and compute, cuDNN attention)
with random weights and the special token ids of the synthetic set's tokenizer, whose chat template
and processor make the prompts: P prompts, each an 8-frame 336x336 random video and a question, as
the loader pads them. The stage's own parts run, as `stjax.train.grpo.GRPO.step` calls them:

- Rollout: `stjax.train.rl.rollout.Rollout.generate` (the weights cast for decoding, one prefill per
  prompt shared by its G completions, one key per completion), temperature 1, EOS never ends a
  completion, so each row decodes all `--tokens`.
  Decoding step time = (time for T tokens - time for 1 token) / (T - 1). Bytes per decoding step:
  the decoder's weights (every layer, the final norm, the LM head matrix) and the KV cache slots
  read on average (the prompt and half the completion, every row, layer, K and V). Bandwidth share
  = bytes / step time / the card's peak (`--peak-bandwidth`, else by device kind). Target 50%.
- Update: the reference's log-probs (`Rollout.logps`, beta 0.1: a frozen copy of the weights), then
  the compiled update (`stjax.train.rl.learner.Learner`: the loss forward and backward over each
  prompt once and its G completions, AdamW on fp32 masters) on the rollout's completions.
  MFU = `learner.update_flops` / (median update time x peak FLOP/s). Target 35%.

Each part is compiled and run once untimed, then timed `--repeats` times (medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository (when stjax is not installed)

PEAK_BANDWIDTH = {"h100": 3.35e12, "h200": 4.8e12, "a100": 2.04e12}  # HBM bytes/s (SXM parts)


def device_peak_bandwidth(override: float | None) -> float | None:
    import jax

    kind = jax.devices()[0].device_kind.lower()
    return override or next((v for k, v in PEAK_BANDWIDTH.items() if k in kind), None)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which blocks) after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def model_and_prompts(args, root: Path):
    """The random model (special ids from the synthetic tokenizer) and the prompts as the loader
    pads them."""
    from bench_train_gpu import init_weights, model_config
    from transformers import AutoTokenizer

    from stjax.data.loader import LoaderConfig, pad_batch
    from stjax.data.processor import Processor
    from stjax.data.synthetic import generate
    from stjax.data.tokenizer import special_token_ids
    from stjax.data.video import VideoClip
    from stjax.models.tiny import TOKEN_ID_FIELDS

    tokenizer = generate(root / "data", 1, seed=0, sheet=0) / "tokenizer"
    ids = special_token_ids(AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True))
    cfg = model_config(args.size, attention=args.attention, remat=args.remat)
    vocab = max(cfg.text.vocab_size, -(-ids["vocab_size"] // 64) * 64)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab), **{k: ids[k] for k in TOKEN_ID_FIELDS})
    processor = Processor.from_pretrained(tokenizer)
    frames, side = args.video
    rng = np.random.default_rng(0)
    items = []
    for i in range(args.prompts):
        clip = VideoClip(
            frames=rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8),
            frame_indices=np.arange(frames),
            total_frames=frames,
            video_fps=1.0,
            sample_fps=1.0,
            second_per_grid_t=2.0,
        )
        items.append(
            processor.encode(f"Walk {i}: which landmark did you pass first? A. a cube B. a cone", videos=[clip])
        )
    patches = max(len(x["pixel_values_videos"]) for x in items)
    loader = LoaderConfig(
        batch_size=args.prompts, token_buckets=(args.prompt_length,), patch_buckets=(patches,), image_patch_buckets=(0,)
    )
    return init_weights(cfg), pad_batch(items, loader, processor.tokenizer.pad_token_id)


def decoder_bytes(model) -> int:
    """Bytes of the weights one decoding step reads: the decoder layers, the final norm and the LM
    head matrix (the token embedding is a gather of B rows, unless tied to the head)."""
    import jax
    from flax import nnx

    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    text = model.model
    head = model.lm_head if getattr(model, "lm_head", None) is not None else text.embed_tokens
    return size(nnx.state(text.layers)) + size(nnx.state(text.norm)) + size(nnx.state(head))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--size", default="3b", help="a bench_train_gpu size (3b: the Qwen2.5-VL-3B preset)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="completion tokens (every row decodes all)")
    parser.add_argument("--video", default="8x336", help="FRAMESxSIZE of each prompt's video")
    parser.add_argument("--prompt-length", type=int, default=1024, help="the prompts' token bucket")
    parser.add_argument("--attention", default="dot_product")
    parser.add_argument("--remat", default="dots_attention", help="the update's rematerialisation policy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=None, help="FLOP/s of the chip (default: by kind)")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="bytes/s of the chip (default: by kind)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the code paths only")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.tokens, args.video, args.prompt_length, args.attention = "tiny", 8, "4x56", 64, "auto"
        args.repeats = 1
    args.video = tuple(int(x) for x in args.video.lower().split("x"))

    import jax
    import jax.numpy as jnp

    from stjax.sampling.sampler import SamplingConfig
    from stjax.sharding import make_mesh
    from stjax.train import config
    from stjax.train.loop import placed_state
    from stjax.train.metrics import device_peak_flops, mfu
    from stjax.train.rl.learner import Learner, LossSettings, reference_params, update_flops
    from stjax.train.rl.rollout import Rollout, prompt_inputs
    from stjax.train.step import split_trainable

    with tempfile.TemporaryDirectory() as tmp:
        model, loaded = model_and_prompts(args, Path(tmp))
    cfg, g = model.config, args.generations
    mesh = make_mesh({"fsdp": 1})
    prompts, starts = prompt_inputs(cfg, loaded)
    length = prompts.input_ids.shape[1]
    rows = args.prompts * g
    train_cfg = config.load(
        None,
        [
            f"batch_size={rows}",
            f"grpo.num_generations={g}",
            "grpo.beta=0.1",
            f"grpo.max_completion_length={args.tokens}",
            "grpo.loss_type=grpo",
        ],
        stage="grpo",
    )
    settings = LossSettings.of(train_cfg)
    optim = dataclasses.replace(train_cfg.optim, total_steps=100)
    graphdef, params, frozen = split_trainable(model)
    state = placed_state(params, optim, 0, mesh)
    sample_ids = [f"prompt-{i}" for i in range(args.prompts)]

    # ---- rollout: the stage's `Rollout.generate` (the actor's weights cast for decoding, one key per completion)
    def rollout(tokens: int):
        sampling = SamplingConfig(
            max_new_tokens=tokens,
            temperature=1.0,
            num_samples=g,
            eos_ids=(),
            pad_id=0,
            suppress_ids=(cfg.image_token_id, cfg.video_token_id),
        )
        return Rollout(model, graphdef, frozen, sampling, settings, mesh)

    decoders = {tokens: rollout(tokens) for tokens in (args.tokens, 1)}
    generate = lambda tokens: decoders[tokens].generate(state, prompts, starts, sample_ids, 0)
    full, first = timed(lambda: generate(args.tokens), args.repeats), timed(lambda: generate(1), args.repeats)
    decode_step = (full - first) / (args.tokens - 1)
    out = generate(args.tokens)
    text = cfg.text
    kv_bytes = 2 * text.num_layers * rows * text.num_kv_heads * text.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
    step_bytes = decoder_bytes(model) + kv_bytes * (length + args.tokens / 2)
    bandwidth = device_peak_bandwidth(args.peak_bandwidth)

    # ---- update: the reference's log-probs, then the compiled update (the stage's `Learner`)
    learner = Learner(graphdef, optim, settings, state, frozen, mesh, group_size=g, accumulation=1)
    advantages = np.random.default_rng(0).normal(size=rows).astype(np.float32)
    mask = np.arange(args.tokens) < out.lengths[:, None]
    batch = learner.batch(prompts, starts, out.tokens, out.lengths, mask, advantages)
    reference = reference_params(model, state, cfg.compute_dtype, lora=False)  # beta 0.1: a frozen copy
    scorer = decoders[args.tokens]
    logp_time = timed(lambda: jax.block_until_ready(scorer.logps(reference, batch)), args.repeats)
    batch = batch.replace(ref_logp=scorer.logps(reference, batch))
    holder = {"state": state}

    def one_update():
        holder["state"], holder["metrics"] = learner.update(holder["state"], batch, iterations=1)  # synced: floats

    update_time = timed(one_update, args.repeats)
    metrics = holder["metrics"]
    flops = update_flops(cfg, batch, metrics)
    peak = device_peak_flops(jax.devices()[0], args.peak_flops)

    kind = jax.devices()[0].device_kind
    print(
        f"GRPO step by parts, {args.size} ({kind}), {args.prompts} prompts x G={g}, {args.tokens} completion "
        f"tokens, {args.video[0]}-frame {args.video[1]}x{args.video[1]} videos, prompts of {length} tokens"
    )
    print(
        f"rollout: {full:.3f} s for {rows * args.tokens} tokens = {rows * args.tokens / full:.0f} tokens/s "
        f"(prefill and first token {first:.3f} s)"
    )
    share = (
        f"{step_bytes / decode_step / bandwidth:.1%} of {bandwidth / 1e12:.2f} TB/s" if bandwidth else "no peak known"
    )
    print(
        f"decode: {decode_step * 1e3:.2f} ms/step, {step_bytes / 1e9:.3f} GB read per step = "
        f"{step_bytes / decode_step / 1e9:.0f} GB/s, {share} (target 50%)"
    )
    print(f"reference log-probs: {logp_time:.3f} s")
    utilisation = (
        f"MFU {mfu(flops, update_time, 1, peak):.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known"
    )
    print(
        f"update: {update_time:.3f} s, {flops / 1e12:.2f} TFLOP = {flops / update_time / 1e12:.1f} TFLOP/s, "
        f"{utilisation} (target 35%); loss {metrics['loss']:.4f}"
    )


if __name__ == "__main__":
    main()
