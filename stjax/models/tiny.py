"""The embedded default model: a tiny random Qwen-VL of a family's tiny preset, sized to a tokenizer.

The demo, the trainer (no `model.model_name_or_path`) and the evaluator (no `--model`) use it (through
`stjax.data.tokenizer.tiny_model_dir`, which reads the ids from the locally built tokenizer) so that
every path runs with nothing downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flax import nnx, traverse_util

from stjax.models.config import QwenVLConfig
from stjax.models.families import family
from stjax.models.loading import save_hf
from stjax.models.qwen_vl import init_model

TOKEN_ID_FIELDS = (
    "bos_token_id",
    "eos_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "image_token_id",
    "video_token_id",
)


def save_tiny_model(out: Path, arch: str, seed: int, token_ids: dict[str, int], side_files: Path | None = None) -> Path:
    """A random tiny model of family `arch` (a model_type) as a HF directory: its vocabulary holds
    `token_ids["vocab_size"]` tokens (rounded up to a multiple of 64) and its special ids are those of
    `token_ids` (keyed like the config fields); `side_files` (the tokenizer's directory) are copied beside it."""
    cfg = QwenVLConfig.from_file(family(arch).tiny_preset)
    vocab = -(-token_ids["vocab_size"] // 64) * 64
    ids = {k: token_ids[k] for k in TOKEN_ID_FIELDS}
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab), **ids)
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(init_model(cfg, seed), nnx.Param)))
    save_hf(out, cfg, {k: np.asarray(v) for k, v in params.items()}, side_files=side_files, overwrite=True)
    return out
