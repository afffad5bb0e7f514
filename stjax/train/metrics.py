"""Training metrics: FLOP counts for MFU, accelerator peaks, and a logger that writes every step to
JSONL and the `report_to` integrations, with a progress bar on a terminal and plain lines elsewhere.

FLOP convention (PaLM, Chowdhery et al. 2022, appendix B): a training step costs 3x the forward
(forward + backward for activations and weights), and a matmul with an (in, out) kernel costs
2 * in * out FLOPs per row. So one row costs 6 * (matmul parameters) + the attention matmuls
(QK^T and AV: 2 * 2 * keys * width forward, x3 for training). Causal attention is NOT halved: every
query is counted against all `seq_len` keys, as in PaLM, so numbers compare with published MFU;
this overstates the decoder's attention by up to 2x next to a kernel that skips masked blocks.
Norms, activations, softmax, rotary and the embedding lookup are left out (they are not matmuls),
and so are LoRA adapters; frozen weights are still counted as 6 * N (the convention, even though
their weight gradients are not computed).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from types import TracebackType

import jax
from etils import epath
from tqdm import tqdm

from stjax.io import AppendLog, as_path, write_text_atomic
from stjax.models.config import QwenVLConfig
from stjax.train.reporters import make_reporters

# Dense bf16 peak FLOP/s per chip, keyed by a lower-case piece of `jax.Device.device_kind`.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,  # SXM
    "h100 pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p reports itself as "TPU v5"
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}


def lm_head_flops_per_token(cfg: QwenVLConfig) -> float:
    """Training FLOPs of the LM head for one row of logits."""
    return float(6 * cfg.text.hidden_size * cfg.text.vocab_size)


def model_flops_per_token(cfg: QwenVLConfig, seq_len: int) -> float:
    """Training FLOPs per text token of the decoder and LM head at sequence length `seq_len`.

    The LM head counts hidden * vocab even with tied embeddings (the matmul runs either way); the
    embedding lookup is a gather and costs nothing here.
    """
    t = cfg.text
    q_width, kv_width = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    attention = 2 * t.hidden_size * q_width + 2 * t.hidden_size * kv_width  # q, o; k, v
    mlp = 3 * t.hidden_size * t.intermediate_size  # gate, up, down
    return float(
        6 * t.num_layers * (attention + mlp) + lm_head_flops_per_token(cfg) + 12 * t.num_layers * seq_len * q_width
    )


def vision_flops_per_patch(cfg: QwenVLConfig, group_size: int) -> float:
    """Training FLOPs per patch of the vision tower for attention groups of `group_size` patches (the
    patches of one frame), as the model's family counts them (`Family.vision_flops_per_patch`)."""
    return cfg.family.vision_flops_per_patch(cfg, group_size)


def step_flops(model_cfg: QwenVLConfig, batch, metrics: dict[str, float]) -> float:
    """Model FLOPs of one step from the step's token and patch counts (decoder per token at the
    batch's length, vision per real patch at its frame-group size). The LM head counts at every
    token, or at the target tokens alone when the step makes logits only there (`loss_positions`)."""
    head = lm_head_flops_per_token(model_cfg)
    rows = metrics["tokens"] if batch.loss_positions is None else metrics["target_tokens"]
    flops = (model_flops_per_token(model_cfg, batch.inputs.input_ids.shape[-1]) - head) * metrics[
        "tokens"
    ] + head * rows
    return flops + vision_flops(model_cfg, batch.inputs, metrics)


def vision_flops(model_cfg: QwenVLConfig, inputs, metrics: dict[str, float]) -> float:
    """Training FLOPs of the vision tower over a step's real patches (`metrics["patches"]`), at the
    frame-group size of its inputs (0 without vision)."""
    if inputs.vision is None:
        return 0.0
    return vision_flops_per_patch(model_cfg, inputs.vision.frames.index.shape[-1]) * metrics["patches"]


def device_peak_flops(device: jax.Device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one chip: `override` when given, else the longest DEVICE_PEAK_FLOPS key in the
    device kind (so "TPU v5 lite" is not read as "TPU v5"), else None (CPU, unknown chips)."""
    if override is not None:
        return override
    kind = device.device_kind.lower()
    key = max((k for k in DEVICE_PEAK_FLOPS if k in kind), key=len, default=None)
    return None if key is None else DEVICE_PEAK_FLOPS[key]


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices together."""
    return flops_per_step / (step_time_s * num_devices * peak)


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN or Infinity: non-finite values are written as null."""
    return x if math.isfinite(x) else None


def drop_steps_after(path: epath.Path, step: int) -> None:
    """Remove the records of steps after `step` (and a line cut short by a kill) from a metrics JSONL:
    a run resumed from checkpoint `step` logs them again, and each step must appear once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


def logging_interval(logging_steps: float, total_steps: int) -> int:
    """Steps between plain lines: `logging_steps` itself, or below 1 that fraction of the run (TRL's meaning)."""
    return max(1, math.ceil(total_steps * logging_steps) if logging_steps < 1 else int(logging_steps))


class Pace:
    """Seconds per step after the first step of an invocation, which compiles: an ETA from the steps that
    train alone (with the compile step, a 5-minute run's first ETA read hours)."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None  # (time, step) at the end of the invocation's first step
        self.last: tuple[float, int] | None = None  # ... of its latest step

    def update(self, step: int) -> None:
        self.last = (time.time(), step)
        self.first = self.first or self.last

    def seconds_per_step(self) -> float | None:
        if self.last is None or self.last[1] <= self.first[1]:
            return None
        return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])

    def eta(self, total: int) -> float | None:
        rate = self.seconds_per_step()
        return None if rate is None else rate * (total - self.last[1])


class _Bar(tqdm):
    """tqdm whose rate and ETA come from `Pace`: the compile step left out."""

    pace: Pace | None = None

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        rate = self.pace.seconds_per_step() if self.pace is not None else None
        # tqdm computes (n - initial) / elapsed when rate is None: 0 prints the ETA as "?"
        return d | ({"rate": 1 / rate} if rate else {"rate": None, "initial": d["n"]})


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


class MetricsLogger:
    """Per-step metrics to out_dir/metrics.jsonl and the `report_to` integrations (stjax.train.reporters),
    and the run's progress: a tqdm bar named after the stage on a terminal, else (a batch job's log) a plain
    line every `logging_steps` steps, and after the first step and the last, with each metric's mean over
    the steps since the previous line. Both give an ETA that leaves out the first (compiling) step.

    `step` is the number of steps done including the one logged, so the bar reads step / total and
    a resumed run passes the steps already done as `start_step`. The bar shows the `loss`, `reward`
    (GRPO) and `tokens_per_s` metrics; `summary` also sums `skipped`. Non-finite values are written to the
    JSONL (and summary.json) as null, which every JSON reader accepts; reporters get them as is.
    The JSONL is appended to, one flushed line per step, so a killed or resumed run keeps its lines;
    a logger starting at `start_step` first drops the lines of later steps (they are logged again).
    Only process 0 logs by default; a disabled logger does nothing. `interactive` (default: whether
    stdout is a terminal) chooses the bar over plain lines; `progress=False` shows neither.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike | None,
        total_steps: int,
        start_step: int = 0,
        enabled: bool | None = None,
        report_to: Sequence[str] = (),
        progress: bool = True,
        logging_steps: float = 10,
        desc: str = "train",
        interactive: bool | None = None,
        config: dict | None = None,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.out_dir = as_path(out_dir) if out_dir is not None else None
        self.start_step = self.last_step = start_step
        self.total_steps, self.desc = total_steps, desc
        self.interval = logging_interval(logging_steps, total_steps)
        self.records: list[dict[str, float]] = []
        self.unprinted: list[dict[str, float]] = []  # steps since the last plain line
        self.started = time.time()
        self.pace = Pace()
        self.jsonl = self.bar = None
        self.reporters: list = []
        self.lines = False
        if not self.enabled:
            return
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            drop_steps_after(self.out_dir / "metrics.jsonl", start_step)
            self.jsonl = AppendLog(self.out_dir / "metrics.jsonl")
            self.reporters = make_reporters(report_to, self.out_dir, config, start_step)
        if progress and (sys.stdout.isatty() if interactive is None else interactive):
            self.bar = _Bar(total=total_steps, initial=start_step, dynamic_ncols=True, desc=desc, smoothing=0)
            self.bar.pace = self.pace
        else:
            self.lines = progress

    def log(self, step: int, metrics: dict[str, float | jax.Array]) -> None:
        if not self.enabled:
            return
        values = {name: float(value) for name, value in metrics.items()}
        self.records.append(values)
        self.last_step = step
        if self.jsonl is not None:
            record = {"step": step, **{k: _finite_or_none(x) for k, x in values.items()}, "time": time.time()}
            self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        for reporter in self.reporters:
            reporter.log(step, values)
        self.pace.update(step)
        if self.lines:
            self.unprinted.append(values)
            if step % self.interval == 0 or step == self.total_steps or len(self.records) == 1:
                print(self.plain_line(step), flush=True)
                self.unprinted = []
        if self.bar is not None:
            postfix = {}
            if "loss" in values:
                postfix["loss"] = f"{values['loss']:.4f}"
            if "reward" in values:
                postfix["reward"] = f"{values['reward']:.3f}"
            if "tokens_per_s" in values:
                postfix["tok/s"] = f"{values['tokens_per_s']:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def plain_line(self, step: int) -> str:
        """`sft step 20/200 loss=0.4123 ... elapsed=0:01:02 eta=0:09:18`: each metric's mean over the steps
        since the previous line (a non-finite value makes its mean non-finite)."""
        columns: dict[str, list[float]] = {}
        for record in self.unprinted:
            for name, value in record.items():
                columns.setdefault(name, []).append(value)
        means = {name: sum(values) / len(values) for name, values in columns.items()}
        metrics = " ".join(f"{n}={v:.4g}" for n, v in means.items())
        return (
            f"{self.desc} step {step}/{self.total_steps} {metrics} elapsed={_clock(time.time() - self.started)} "
            f"eta={_clock(self.pace.eta(self.total_steps))}"
        )

    def summary(self) -> dict:
        """Totals of this invocation, printed, and saved to out_dir/summary.json with the history of
        the run's invocations (`invocations`: each one's totals and the steps it went from and to);
        call it once, at the end.

        `steps` is the last logged step minus `start_step`; the other values cover the logged steps
        (log every step for exact sums) and are None where nothing was logged or not finite.
        """
        if not self.enabled:
            return {}
        column = lambda name: [r[name] for r in self.records if name in r]
        losses, speeds = column("loss"), column("tokens_per_s")
        recent = [x for x in losses[-10:] if math.isfinite(x)]  # skipped steps have no loss
        summary = {
            "steps": self.last_step - self.start_step,
            "skipped_steps": int(sum(column("skipped"))),
            "final_loss": _finite_or_none(losses[-1]) if losses else None,
            "mean_loss_last_10": sum(recent) / len(recent) if recent else None,
            "mean_tokens_per_s": _finite_or_none(sum(speeds) / len(speeds)) if speeds else None,
            "wall_time_s": time.time() - self.started,
        }
        tqdm.write(f"summary: {json.dumps(summary, allow_nan=False)}")
        invocation = {"from_step": self.start_step, "to_step": self.last_step, **summary}
        summary = {**summary, "invocations": self._earlier_invocations() + [invocation]}
        if self.out_dir is not None:
            write_text_atomic(self.out_dir / "summary.json", json.dumps(summary, allow_nan=False) + "\n")
        return summary

    def _earlier_invocations(self) -> list[dict]:
        """The invocations recorded in out_dir/summary.json by earlier runs of the same out_dir."""
        path = self.out_dir / "summary.json" if self.out_dir is not None else None
        if path is None or not path.exists():
            return []
        try:
            earlier = json.loads(path.read_text())
        except ValueError:
            return []
        return earlier.get("invocations", [earlier]) if isinstance(earlier, dict) else []

    def close(self) -> None:
        for handle in (self.bar, *self.reporters, self.jsonl):
            if handle is not None:
                handle.close()
        self.jsonl = self.bar = None
        self.reporters = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
