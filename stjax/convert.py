"""HF <-> stjax model directories (the library behind convert/to_stjax.py and convert/to_hf.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stjax.io import check_target
from stjax.models.config import QwenVLConfig
from stjax.models.loading import float_dtype, hf_params, resolve_model_dir, save_hf, save_stjax, stjax_params


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {text!r}; use e.g. 5GB or 500MB")
    value, unit, suffix = match.groups()
    base = 1024 if suffix and suffix.lower() == "ib" else 1000
    return int(float(value) * base ** "_KMGT".index(unit.upper() or "_"))


def _bar(total: int | None, what: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)


def hf_to_stjax(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> QwenVLConfig:
    """Write `out_dir` whole or not at all; an occupied `out_dir` is refused unless `overwrite`.
    `hf_dir` may also be a hub id (`owner/name`, at `revision`): see `resolve_model_dir`."""
    float_dtype(dtype)
    check_target(out_dir, overwrite)  # before any reading
    hf_dir = resolve_model_dir(hf_dir, revision)
    cfg = QwenVLConfig.from_file(hf_dir)
    with _bar(None, "convert") as bar:
        params = hf_params(cfg, hf_dir, dtype, bar.update)
        bar.total = sum(t.nbytes for t in next(iter(params.values())).reader.tensors.values())
        save_stjax(out_dir, cfg, params, side_files=hf_dir, overwrite=overwrite)
    return cfg


def stjax_to_hf(
    stjax_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = 5 << 30,
    overwrite: bool = False,
) -> QwenVLConfig:
    """Write `out_dir` whole or not at all; an occupied `out_dir` is refused unless `overwrite`."""
    float_dtype(dtype)
    check_target(out_dir, overwrite)
    cfg = QwenVLConfig.from_file(stjax_dir)
    params = stjax_params(stjax_dir)
    total = sum(int(np.prod(a.shape)) * np.dtype(dtype or a.dtype).itemsize for a in params.values())
    with _bar(total, "write") as bar:
        save_hf(
            out_dir, cfg, params, dtype, max_shard_bytes, progress=bar.update, side_files=stjax_dir, overwrite=overwrite
        )
    return cfg
