"""One GRPO step of stjax against TRL 1.16's `GRPOTrainer`: the same tiny Qwen2-VL (same weights), the
same prompts and settings, timed in turn in one run on the CPU, with each side's split.

    python benchmarks/bench_grpo.py [--steps 3] [--prompts 2] [--generations 8] [--tokens 64]

Settings: P prompts x G completions, at most `--tokens` completion tokens at temperature 1.0, beta 0.1
(a reference model's log-probs every step), loss_type grpo, one update per rollout batch, lr 1e-5, fp32.
stjax runs its GRPO stage's step (`stjax.train.grpo.GRPO.step`: the jitted sampler, rewards, the
reference log-probs, the compiled update); TRL runs `GRPOTrainer.train` (transformers' `generate`,
no vLLM). Each prompt carries one 672x672 image, 2304 patches, as many as an 8-frame 336x336 video:
TRL 1.16 takes images for vision-language models, but transformers' Qwen2-VL video processor needs
torchvision, which cannot be installed beside this torch; so both sides take the image.

Split: stjax reports its own phases (rollout, log-probs, update; scoring is host work). TRL's are
measured by wrapping its methods: rollout = `_generate`, log-probs = `_get_per_token_logps_and_entropies`
without gradients (the reference's), update = the rest of the step (its loss forward and backward and
the optimizer). After one untimed warm-up step each (compiles, first allocations), the medians of
`--steps` steps are printed with the ratio.

Floor: the step's model FLOPs at the best matrix-product rate measured in the same run
(`bench_forward.best_matmul_rate`). The update's FLOPs are the stage's own count
(`grpo.update_flops`: each prompt once, vision included, each completion token after it); the
rollout (prefill and decoding) and the reference's log-probs are one forward each over the same
tokens, a third of it apiece, so the step is 5/3 of the update's count.
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

SIDE = 672  # pixels: (672 / 14)^2 = 2304 patches


def assets(root: Path) -> tuple[Path, Path]:
    """A synthetic set's tokenizer and a tiny random Qwen2-VL for it (HF directory)."""
    from stjax.data.synthetic import generate
    from stjax.data.tokenizer import tiny_model_dir

    data = generate(root / "data", 1, seed=0, sheet=0)
    return data / "tokenizer", tiny_model_dir(data / "tokenizer", root / "model", "qwen2_vl", seed=0)


def prompts(count: int) -> tuple[list[str], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    texts = [
        f"Which landmarks did you pass by on walk {i}? Options: A. a red cube, B. a blue cylinder" for i in range(count)
    ]
    return texts, [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(count)]


def stjax_steps(tokenizer: Path, model_dir: Path, texts, images, args, out: Path) -> list[dict]:
    from stjax.data.formats import Sample
    from stjax.data.loader import LoaderConfig, pad_batch
    from stjax.data.processor import Processor
    from stjax.models.inputs import bucket
    from stjax.models.loading import load_pretrained
    from stjax.sharding import make_mesh
    from stjax.train import config
    from stjax.train.grpo import GRPO
    from stjax.train.loop import stage_context

    cfg = config.load(
        None,
        [
            f"batch_size={args.prompts * args.generations}",
            f"grpo.num_generations={args.generations}",
            f"grpo.max_completion_length={args.tokens}",
            "grpo.beta=0.1",
            "grpo.loss_type=grpo",
            "grpo.log_completions_steps=0",
            "optim.learning_rate=1e-5",
            "loss_chunk=0",
        ],
        stage="grpo",
    )
    model, _ = load_pretrained(model_dir)
    mesh = make_mesh({"fsdp": 1})
    optim = dataclasses.replace(cfg.optim, total_steps=args.steps + 1)
    processor = Processor.from_pretrained(tokenizer)
    samples = [
        Sample(
            id=f"p{i}",
            video="",
            question=t,
            options=["A. a red cube", "B. a blue cylinder"],
            answer="A",
            task="landmark",
            direction="forward",
        )
        for i, t in enumerate(texts)
    ]
    items = [processor.encode(t, images=[im]) | {"sample_id": s.id} for t, im, s in zip(texts, images, samples)]
    length = bucket(max(len(x["input_ids"]) for x in items))  # the prompts' shape bucket, as the loader's would be
    batch = pad_batch(
        items,
        LoaderConfig(
            batch_size=len(items),
            token_buckets=(length,),
            patch_buckets=(0,),
            image_patch_buckets=(SIDE * SIDE // 196,),
            videos_per_sample=0,
            images_per_sample=1,
        ),
        processor.tokenizer.pad_token_id,
    )
    # peak_flops: the measured rate, so that "mfu" is the update's share of it
    context, state = stage_context(cfg, mesh, model, processor, samples, out, optim, peak_flops=args.rate)
    stage = GRPO(context, model, state)
    times = []
    for step in range(args.steps + 1):
        began = time.perf_counter()
        state, metrics = stage.step(state, iter([dict(batch)]), step)
        times.append(
            {
                "step": time.perf_counter() - began,
                "rollout": metrics["rollout_time"],
                "log-probs": metrics["logprob_time"],
                "update": metrics["update_time"],
                "tokens": metrics["completions/mean_length"] * len(texts) * args.generations,
                "update FLOPs": metrics["mfu"] * args.rate * metrics["update_time"],
            }
        )
    return times[1:]


class ImageOnlyProcessor:
    """transformers' Qwen2VLProcessor without its video processor (which needs torchvision)."""

    @staticmethod
    def make(tokenizer_dir: Path):
        from transformers import AutoTokenizer, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.processing_utils import ProcessorMixin

        class Processor(Qwen2VLProcessor):
            @classmethod
            def get_attributes(cls):
                return ["image_processor", "tokenizer"]

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        images = Qwen2VLImageProcessorPil(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)
        return Processor(images, tokenizer, chat_template=tokenizer.chat_template)


def trl_steps(tokenizer: Path, model_dir: Path, texts, images, args, out: Path) -> list[dict]:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    rows = [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
            "image": Image.fromarray(im),
        }
        for t, im in zip(texts, images)
    ]

    def accuracy(completions, **_):
        return [float("<answer>A" in c[0]["content"]) for c in completions]

    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=len(texts) * args.generations,
        num_generations=args.generations,
        max_completion_length=args.tokens,
        temperature=1.0,
        beta=0.1,
        loss_type="grpo",
        learning_rate=1e-5,
        max_steps=args.steps + 1,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=Qwen2VLForConditionalGeneration.from_pretrained(model_dir),
        reward_funcs=[accuracy],
        args=config,
        train_dataset=Dataset.from_list(rows * (args.steps + 1)),
        processing_class=ImageOnlyProcessor.make(tokenizer),
    )
    spent = {"rollout": 0.0, "log-probs": 0.0, "tokens": 0}

    def timed(name, fn):
        def wrapper(*a, **k):
            began = time.perf_counter()
            result = fn(*a, **k)
            if name != "log-probs" or not torch.is_grad_enabled():
                spent[name] += time.perf_counter() - began
            if name == "rollout":
                spent["tokens"] += sum(len(ids) for ids in result[1])  # completion_ids
            return result

        return wrapper

    trainer._generate = timed("rollout", trainer._generate)
    trainer._get_per_token_logps_and_entropies = timed("log-probs", trainer._get_per_token_logps_and_entropies)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            spent.update(rollout=0.0, tokens=0, began=time.perf_counter())
            spent["log-probs"] = 0.0

        def on_step_end(self, *_, **__):
            step = time.perf_counter() - spent["began"]
            times.append(
                {
                    "step": step,
                    "rollout": spent["rollout"],
                    "log-probs": spent["log-probs"],
                    "update": step - spent["rollout"] - spent["log-probs"],
                    "tokens": spent["tokens"],
                }
            )

    trainer.add_callback(Clock())
    trainer.train()
    return times[1:]


def median(times: list[dict], key: str) -> float:
    return statistics.median(t[key] for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="max completion tokens")
    args = parser.parse_args()
    from bench_forward import best_matmul_rate

    args.rate = best_matmul_rate()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer, model_dir = assets(root)
        texts, images = prompts(args.prompts)
        ours = stjax_steps(tokenizer, model_dir, texts, images, args, root / "stjax")
        theirs = trl_steps(tokenizer, model_dir, texts, images, args, root / "trl")
    print(
        f"GRPO step, tiny Qwen2-VL, {args.prompts} prompts x G={args.generations}, <= {args.tokens} completion "
        f"tokens, one {SIDE}x{SIDE} image per prompt (2304 patches; TRL takes no Qwen2-VL video here), beta 0.1, "
        f"median of {args.steps} steps"
    )
    print(f"{'':12} {'stjax s':>9} {'TRL s':>9} {'TRL / stjax':>12}")
    for key in ("step", "rollout", "log-probs", "update"):
        a, b = median(ours, key), median(theirs, key)
        print(f"{key:12} {a:9.3f} {b:9.3f} {b / a:11.1f}x")
    per_token = lambda times: median(times, "step") / median(times, "tokens")
    print(
        f"completion tokens per step: stjax {median(ours, 'tokens'):.0f}, TRL {median(theirs, 'tokens'):.0f} "
        f"(sampled: lengths differ between the sides); per completion token TRL / stjax "
        f"{per_token(theirs) / per_token(ours):.1f}x"
    )
    flops = 5 / 3 * median(ours, "update FLOPs")
    floor, target = flops / args.rate, median(theirs, "step") / 5
    print(
        f"floor: {flops / 1e9:.1f} GFLOP per step at {args.rate / 1e9:.0f} GFLOP/s (the best 2048^3 float32 "
        f"product here) = {floor:.3f} s; the 5x target is a step of {target:.3f} s, "
        f"{'above' if target > floor else 'below'} the floor; stjax runs at {floor / median(ours, 'step'):.0%} "
        "of the floor's rate"
    )


if __name__ == "__main__":
    main()
