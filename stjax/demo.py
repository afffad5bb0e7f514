"""The embedded default, end to end, with no download:

1. render a small synthetic ego-centric benchmark (videos, Ego-ST MCQ files, ST-R1 rows, tokenizer);
2. make a tiny random Qwen2.5-VL (or Qwen2-VL) matching that tokenizer, saved as a HF directory;
3. convert it HF -> stjax -> HF and check the round trip is bit-exact;
4. load the stjax directory and score the MCQ option letters after the seed prompt for each sample
   (a random model, so accuracy is near chance: this shows the path, not a result).

    python -m stjax.demo [--out runs/demo] [--walks 4] [--arch qwen2_5_vl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from flax import nnx, traverse_util
from tqdm import tqdm


def tiny_model_dir(tokenizer_dir: Path, out: Path, arch: str, seed: int) -> Path:
    """A random tiny model whose vocabulary and special ids match the tokenizer, as a HF directory."""
    from transformers import AutoTokenizer

    from stjax.data.tokenizer import special_token_ids
    from stjax.models.config import QwenVLConfig
    from stjax.models.loading import save_hf
    from stjax.models.qwen_vl import init_model

    ids = special_token_ids(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    cfg = QwenVLConfig.from_file("tiny-qwen2.5-vl" if arch == "qwen2_5_vl" else "tiny-qwen2-vl")
    vocab = -(-ids["vocab_size"] // 64) * 64
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": vocab}),
                      **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "vision_start_token_id",
                                             "vision_end_token_id", "image_token_id", "video_token_id")})
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(init_model(cfg, seed), nnx.Param)))
    save_hf(out, cfg, {k: np.asarray(v) for k, v in params.items()}, side_files=tokenizer_dir, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--walks", type=int, default=4, help="synthetic walks to render, 6 questions each")
    parser.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from stjax.convert import hf_to_stjax, stjax_to_hf
    from stjax.data.formats import read_plain_jsonl
    from stjax.data.processor import Processor
    from stjax.data.synthetic import generate
    from stjax.data.video import SampleError
    from stjax.models.loading import load_pretrained
    from stjax.models.safetensors_io import differing_tensors

    out = Path(args.out)
    start = time.perf_counter()
    data = generate(out / "data", args.walks, args.seed)
    print(f"[1/4] synthetic benchmark: {args.walks} walks in {data} (contact sheet: {data / 'contact_sheet.png'})")

    hf_dir = tiny_model_dir(data / "tokenizer", out / "tiny-hf", args.arch, args.seed)
    print(f"[2/4] tiny {args.arch} model: {hf_dir}")

    hf_to_stjax(hf_dir, out / "tiny-stjax", overwrite=True)  # the demo's own outputs: a rerun replaces them
    stjax_to_hf(out / "tiny-stjax", out / "tiny-hf-roundtrip", overwrite=True)
    exact = not differing_tensors(hf_dir, out / "tiny-hf-roundtrip")
    print(f"[3/4] HF -> stjax -> HF round trip bit-exact: {exact}")
    if not exact:
        raise SystemExit("round trip changed the weights")

    model, cfg = load_pretrained(out / "tiny-stjax")
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"), local_files_only=True)
    processor = Processor(tokenizer, tokens_per_second=cfg.vision.tokens_per_second if cfg.is_qwen2_5 else None)
    letters = {letter: tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"}
    samples = read_plain_jsonl(data / "plain.jsonl").samples
    records, failed = [], []
    for sample in tqdm(samples, desc="[4/4] scoring", unit="sample"):
        try:
            batch = processor(sample, "seed_mcq")
        except SampleError as e:
            failed.append({"id": sample.id, "reason": str(e)})
            continue
        logits = np.asarray(model(batch["input_ids"][None], pixel_values_videos=batch["pixel_values_videos"],
                                  video_grid_thw=batch["video_grid_thw"],
                                  second_per_grid_ts=batch["second_per_grid_ts"]))[0, -1]
        choices = [k for k in "ABCD"[: len(sample.options)]]
        pred = max(choices, key=lambda k: logits[letters[k]])
        records.append({"id": sample.id, "task": sample.task, "direction": sample.direction,
                        "tokens": int(batch["input_ids"].shape[0]), "pred": pred, "gold": sample.answer,
                        "correct": pred == sample.answer})
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    accuracy = np.mean([r["correct"] for r in records]) if records else float("nan")
    print(f"scored {len(records)} samples ({len(failed)} failed), accuracy {accuracy:.2f} "
          f"(random weights: chance is about 0.25); predictions in {out / 'predictions.jsonl'}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
