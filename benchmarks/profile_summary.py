"""Where a compiled program's time goes: the top operations of a `jax.profiler` trace, read with
jax's own `ProfileData` (no TensorBoard needed), so a lent GPU can print its profile in the same call.

    python benchmarks/profile_summary.py TRACE_DIR [--top 20] [--steps N]

Device planes (`/device:GPU:0`, its "XLA Ops" line) are used when the trace has them; on the CPU, the
XLA thunks of the host threads. Operations are summed by name and by kind (the name without its
numeric suffix: `fusion`, `custom-call`, `loop_dynamic_update_slice_fusion`, ...).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def op_times(trace_dir: str) -> dict[str, float]:
    """Total seconds per operation name in the newest trace under `trace_dir`."""
    import jax

    path = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)[-1]
    planes = list(jax.profiler.ProfileData.from_file(str(path)).planes)
    devices = [p for p in planes if p.name.startswith("/device:") and ("GPU" in p.name or "TPU" in p.name)]
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in devices or [p for p in planes if p.name == "/host:CPU"]:
        lines = list(plane.lines)
        if devices:  # the per-operation line when the device plane has one, else its streams
            lines = [line for line in lines if line.name == "XLA Ops"] or lines
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                if devices or "hlo_op" in stats:  # on the CPU: XLA thunks only (not Python or thread pools)
                    totals[str(stats.get("hlo_op", event.name))] += event.duration_ns * 1e-9
    return dict(totals)


def kind(name: str) -> str:
    return re.sub(r"[._]?\d+$", "", name)


def summary(trace_dir: str, top: int = 15, steps: int = 1) -> list[str]:
    """Lines of a table: the top operations and the top kinds, in ms per step and % of the total."""
    totals = op_times(trace_dir)
    whole = sum(totals.values()) or 1.0
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, t in totals.items():
        by_kind[kind(name)] += t
    lines = [f"profile: {whole / steps * 1e3:.1f} ms of device operations per step"]
    for title, table in (("kind", by_kind), ("operation", totals)):
        lines.append(f"  {'ms/step':>8s} {'share':>6s}  {title}")
        for name, t in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {t / steps * 1e3:8.2f} {100 * t / whole:5.1f}%  {name[:110]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1, help="steps in the trace (for per-step figures)")
    args = parser.parse_args()
    print("\n".join(summary(args.trace_dir, args.top, args.steps)))


if __name__ == "__main__":
    main()
