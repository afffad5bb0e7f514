"""Convert a Hugging Face Qwen2-VL / Qwen2.5-VL directory into a stjax model directory.

    python convert/to_stjax.py HF_DIR_OR_HUB_ID OUT_DIR [--revision REV] [--dtype bfloat16] [--overwrite]

Reads the safetensors (one file or shards with model.safetensors.index.json; on-disk or in-memory
tensor names) one tensor at a time into stacked arrays, writes them as an orbax checkpoint with
config.json, and copies the tokenizer and processor files along. A hub id (Qwen/Qwen2-VL-7B-Instruct)
comes from the Hugging Face cache, downloaded there first unless HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work

from stjax.cli import add_debug_flag, run_cli  # noqa: E402
from stjax.convert import hf_to_stjax  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "hf_dir", help="Hugging Face model directory (config.json + safetensors) or hub id (owner/name)"
    )
    parser.add_argument("out_dir", help="where to write the stjax model directory")
    parser.add_argument(
        "--dtype",
        default=None,
        help="cast parameters to this dtype (float32, bfloat16, ...); default: keep the checkpoint's",
    )
    parser.add_argument("--revision", default=None, help="hub id only: branch, tag or commit (default: main)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR whole when it already holds files (default: refuse)"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    hf_to_stjax(args.hf_dir, args.out_dir, dtype=args.dtype, revision=args.revision, overwrite=args.overwrite)
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(main)
