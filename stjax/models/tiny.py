"""The embedded default model: a tiny random Qwen-VL matching a locally built tokenizer.

The demo, the trainer (no `model.model_name_or_path`) and the evaluator (no `--model`) use it so that every path
runs with nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx, traverse_util
from transformers import AutoTokenizer

from stjax.data.tokenizer import special_token_ids
from stjax.models.config import QwenVLConfig
from stjax.models.loading import save_hf
from stjax.models.qwen_vl import init_model


def tiny_model_dir(tokenizer_dir: Path, out: Path, arch: str, seed: int) -> Path:
    """A random tiny model whose vocabulary and special ids match the tokenizer, as a HF directory."""
    ids = special_token_ids(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    cfg = QwenVLConfig.from_file("tiny-qwen2.5-vl" if arch == "qwen2_5_vl" else "tiny-qwen2-vl")
    vocab = -(-ids["vocab_size"] // 64) * 64
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "vocab_size": vocab}),
                      **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "vision_start_token_id",
                                             "vision_end_token_id", "image_token_id", "video_token_id")})
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(init_model(cfg, seed), nnx.Param)))
    save_hf(out, cfg, {k: np.asarray(v) for k, v in params.items()}, side_files=tokenizer_dir, overwrite=True)
    return out
