"""Convert a stjax model directory back into a Hugging Face directory.

    python convert/to_hf.py STJAX_DIR OUT_DIR [--dtype bfloat16] [--overwrite] [--max-shard-size 5GB]

Writes sharded safetensors (with model.safetensors.index.json past the shard size) in the hub's
on-disk tensor names, config.json, and the tokenizer and processor files; loads with
`from_pretrained`.
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
from stjax.convert import parse_size, stjax_to_hf  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stjax_dir", help="stjax model directory (config.json + params/)")
    parser.add_argument("out_dir", help="where to write the Hugging Face directory")
    parser.add_argument("--dtype", default=None, help="cast tensors to this dtype; default: keep the checkpoint's")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=parse_size,
        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR whole when it already holds files (default: refuse)"
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    stjax_to_hf(
        args.stjax_dir, args.out_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite
    )
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_cli(main)
