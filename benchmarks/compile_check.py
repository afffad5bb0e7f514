"""Compile every shipped accelerator config for its target (`--compile-only`) and write the table.

    python benchmarks/compile_check.py [--only v5p-64 ...] [--label after] [--write BENCHMARKS.md]

Each config runs in its own process (`python -m stjax.train --compile-only --topology T`; a 7B step
takes minutes to compile on a 2-core machine), the rows are printed as they come and, with --write,
replace the table of the same label in BENCHMARKS.md's "Compile check" section. GPU targets need
jax's CUDA plugin in the interpreter (`pip install -e ".[cuda]"`), TPU targets libtpu (`.[tpu]`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from stjax.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
# config -> the target it is written for
TARGETS = {  # the pod configs first: they are the ones no machine here has checked
    "configs/grpo/qwen2.5-vl-7b-tpu-v5p-64.yaml": "v5p:4x4x2",
    "configs/sft/qwen2.5-vl-7b-tpu-v5p-64.yaml": "v5p:4x4x2",
    "configs/grpo/qwen2.5-vl-7b-lora-tpu-v6e-8.yaml": "v6e:2x4",
    "configs/sft/qwen2.5-vl-7b-lora-tpu-v6e-8.yaml": "v6e:2x4",
    "configs/grpo/qwen2-vl-7b-tpu-v5p-16.yaml": "v5p:2x2x2",
    "configs/grpo/qwen3-vl-8b-tpu-v5p-64.yaml": "v5p:4x4x2",
    "configs/sft/qwen3-vl-8b-tpu-v5p-64.yaml": "v5p:4x4x2",
    "configs/grpo/qwen2.5-vl-7b-h100x8.yaml": "h100x8",
    "configs/sft/qwen2.5-vl-7b-h100x8.yaml": "h100x8",
    "configs/grpo/qwen2-vl-7b-h100x4.yaml": "h100x4",
    "configs/sft/qwen2-vl-7b-h100x8.yaml": "h100x8",
    "configs/sft/qwen2.5-vl-7b-h100x4.yaml": "h100x4",
    "configs/sft/qwen2-vl-7b-h100x4.yaml": "h100x4",
    "configs/grpo/qwen3-vl-8b-h100x8.yaml": "h100x8",
    "configs/sft/qwen3-vl-8b-h100x8.yaml": "h100x8",
}
HEADER = (
    "| config | program | target | GiB per chip | headroom GiB | collective GiB/step | roofline step | "
    "MFU ceiling | compile s |\n|---|---|---|---|---|---|---|---|---|"
)


def one(config: str, topology: str) -> None:
    """In the child: compile, printing one JSON line per program as soon as it is compiled."""
    from stjax import compile_only as co
    from stjax.sharding import make_mesh
    from stjax.train import config as train_config
    from stjax.train.compile_only import programs

    cfg = train_config.load(config)
    target = co.target(topology)
    mesh = make_mesh(train_config.check(cfg, len(target.devices)), target.devices)
    for program in programs(cfg, mesh):
        r, _ = co.compile_program(program, target, mesh)
        print(co.format_report(r), file=sys.stderr, flush=True)
        print(
            json.dumps(
                {
                    "program": r.name,
                    "target": r.target,
                    "need": r.need / co.GIB,
                    "headroom": r.headroom / co.GIB,
                    "collective": r.collective_bytes / co.GIB,
                    "roofline": r.roofline_s,
                    "mfu": r.mfu_ceiling,
                    "compile": r.compile_s,
                }
            ),
            flush=True,
        )


def row(name: str, r: dict) -> str:
    return (
        f"| {name} | {r['program']} | {r['target']} | {r['need']:.1f} | {r['headroom']:.1f} | "
        f"{r['collective']:.2f} | {r['roofline'] * 1e3:.0f} ms | {r['mfu']:.0%} | {r['compile']:.0f} |"
    )


def rows(config: str, topology: str):
    """Table rows of one config, yielded as its programs compile (a failure: one row saying why)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as log:  # the child's reports and errors (a pipe could fill and stall it)
        child = subprocess.Popen(
            [sys.executable, __file__, "--one", config, topology],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            cwd=ROOT,
        )
        name, count = f"{Path(config).parent.name}/{Path(config).stem}", 0
        for line in child.stdout:
            if line.startswith("{"):
                count += 1
                yield row(name, json.loads(line))
        log.seek(0)
        lines = log.read().strip().splitlines()
    if child.wait() or not count:  # the exception's line, not JAX's note on filtered frames printed after it
        error = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)] or lines or ["no output"]
        yield f"| {name} | - | {topology} | failed: {error[-1][:200]} | | | | | |"


def _config_of(row: str) -> str:
    return row.split("|")[1].strip()


def write(path: Path, label: str, table: list[str]) -> None:
    """Put `table`'s rows in the `label` table of the "Compile check" section (made if missing), replacing
    the rows of the configs compiled now and keeping the others (so configs can be compiled one at a time)."""
    text = path.read_text()
    title = "## Compile check: every accelerator config on its target (issue 22)"
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\n\n`python benchmarks/compile_check.py --write BENCHMARKS.md`\n"
    pattern = re.compile(rf"### {re.escape(label)}, [\d-]+\n\n.*?(?=\n### |\n## |\Z)", re.S)
    found = pattern.search(text)
    compiled = {_config_of(line) for line in table}
    kept = [
        line
        for line in (found.group(0).splitlines() if found else [])
        if line.startswith("| ") and not line.startswith("| config |") and _config_of(line) not in compiled
    ]
    block = f"### {label}, {datetime.date.today()}\n\n{HEADER}\n" + "\n".join(kept + table)
    text = pattern.sub(lambda _: block, text) if found else text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)  # BENCHMARKS.md whole or as it was, never cut short


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[], help="configs whose path contains one of these")
    parser.add_argument("--label", default="current", help="the table's title (e.g. before / after a change)")
    parser.add_argument("--write", type=Path, help="BENCHMARKS.md to update")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(*args.one)
    chosen = [(c, t) for c, t in TARGETS.items() if not args.only or any(o in c for o in args.only)]
    print(HEADER, flush=True)
    table = []
    for config, topology in chosen:
        if not (ROOT / config).exists():
            continue
        for line in rows(config, topology):
            print(line, flush=True)
            table.append(line)
    if args.write:
        write(args.write, args.label, table)


if __name__ == "__main__":
    main()
