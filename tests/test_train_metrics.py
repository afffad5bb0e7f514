"""Metrics: FLOP formulas against parameter counts of the real model, device peaks, MFU, and the
logger's JSONL, TensorBoard and summary outputs read back from disk."""

import dataclasses
import json
import math
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from stjax.models.config import QwenVLConfig
from stjax.models.qwen_vl import abstract_model
from stjax.train.metrics import MetricsLogger, device_peak_flops, mfu, model_flops_per_token, vision_flops_per_patch

# ----------------------------------------------------------------------------- FLOPs


def kernel_sizes(cfg: QwenVLConfig) -> dict[str, int]:
    """Sizes of the `kernel` parameters of the real model (shapes only), by top-level part;
    with tied embeddings the LM head is the embedding table."""
    sizes = {"decoder": 0, "lm_head": 0, "vision": 0, "merger": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(abstract_model(cfg))):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        size = math.prod(leaf.shape)
        if names == ["model", "embed_tokens"] and cfg.text.tie_word_embeddings:
            sizes["lm_head"] += size
        if names[-1] != "kernel":
            continue
        if names[0] == "lm_head":
            sizes["lm_head"] += size
        elif names[0] == "model":
            sizes["decoder"] += size
        else:
            assert names[0] == "visual"
            sizes["merger" if names[1] == "merger" else "vision"] += size
    return sizes


def made_up_config() -> QwenVLConfig:
    """Bigger than the tiny presets, with GQA, tied embeddings and window attention."""
    cfg = QwenVLConfig.from_file("tiny-qwen2.5-vl")
    text = dataclasses.replace(
        cfg.text,
        vocab_size=3000,
        hidden_size=384,
        intermediate_size=1024,
        num_layers=3,
        num_heads=6,
        num_kv_heads=2,
        mrope_section=(8, 12, 12),
        tie_word_embeddings=True,
    )
    vision = dataclasses.replace(
        cfg.vision,
        depth=5,
        hidden_size=96,
        num_heads=3,
        intermediate_size=256,
        out_hidden_size=384,
        fullatt_block_indexes=(2, 4),
    )
    return cfg.replace(text=text, vision=vision)


CONFIGS = {
    "tiny-qwen2-vl": lambda: QwenVLConfig.from_file("tiny-qwen2-vl"),
    "tiny-qwen2.5-vl": lambda: QwenVLConfig.from_file("tiny-qwen2.5-vl"),
    "made-up": made_up_config,
    "qwen2-vl-7b": lambda: QwenVLConfig.from_file("qwen2-vl-7b"),
    "qwen2.5-vl-7b": lambda: QwenVLConfig.from_file("qwen2.5-vl-7b"),
}

# (config, patches per frame, attention keys summed over the vision blocks), by hand: Qwen2-VL
# attends within frames in every block; Qwen2.5-VL's windows hold (112 / 14)^2 = 64 patches, and
# only its full-attention blocks (tiny: 1, 3; made-up: 2, 4; 7B: 7, 15, 23, 31) see the frame.
VISION_CASES = [
    ("tiny-qwen2-vl", 16, 2 * 16),
    ("tiny-qwen2.5-vl", 256, 64 + 256 + 64 + 256),
    ("tiny-qwen2.5-vl", 16, 4 * 16),  # a frame smaller than a window
    ("made-up", 1024, 3 * 64 + 2 * 1024),
    ("qwen2-vl-7b", 1024, 32 * 1024),
    ("qwen2.5-vl-7b", 1024, 28 * 64 + 4 * 1024),
]


@pytest.mark.parametrize("name", CONFIGS)
def test_decoder_flops_match_the_models_kernels(name):
    cfg = CONFIGS[name]()
    sizes = kernel_sizes(cfg)
    t = cfg.text
    for seq_len in (1, 4096):
        attention = 6 * 2 * t.num_layers * seq_len * t.hidden_size
        assert model_flops_per_token(cfg, seq_len) == 6 * (sizes["decoder"] + sizes["lm_head"]) + attention


def test_decoder_flops_by_hand():
    # tiny-qwen2-vl per layer: q, o 64x64; k, v 64x32; gate, up, down 64x128 -> 36864; head 64x512.
    params = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 512
    assert params == 106496
    assert model_flops_per_token(QwenVLConfig.from_file("tiny-qwen2-vl"), 100) == 6 * params + 12 * 2 * 100 * 64


@pytest.mark.parametrize("name, group_size, keys", VISION_CASES)
def test_vision_flops_match_the_models_kernels(name, group_size, keys):
    cfg = CONFIGS[name]()
    sizes = kernel_sizes(cfg)
    assert sizes["merger"] % 4 == 0
    params = sizes["vision"] + sizes["merger"] // 4  # one merger row per 2x2 patches
    expected = 6 * params + 6 * 2 * keys * cfg.vision.hidden_size
    assert vision_flops_per_patch(cfg, group_size) == expected


# ----------------------------------------------------------------------------- peaks and MFU


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_peak_flops(kind, peak):
    assert device_peak_flops(SimpleNamespace(device_kind=kind)) == peak


def test_device_peak_flops_override_and_cpu():
    cpu = jax.devices("cpu")[0]
    assert device_peak_flops(cpu) is None
    assert device_peak_flops(cpu, override=123e12) == 123e12
    assert device_peak_flops(SimpleNamespace(device_kind="TPU v4"), override=1e12) == 1e12


def test_mfu():
    # 6e15 FLOPs in 2 s on 4 chips of 1e15 FLOP/s: 3e15 / 4e15.
    assert mfu(6e15, 2.0, 4, 1e15) == pytest.approx(0.75)
    assert mfu(989e12 * 8 * 0.4, 1.0, 8, 989e12) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- the logger


def strict_json(line: str) -> dict:
    """json.loads that rejects the non-standard NaN / Infinity tokens."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def read_events(directory: Path) -> list[Event]:
    """Every record of the TFRecord event files: u64 length, u32 crc, data, u32 crc."""
    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            body = data[offset + 12 : offset + 12 + length]
            (body_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
            event = Event()
            event.ParseFromString(body)
            events.append(event)
            offset += 16 + length
    return events


def scalars(events: list[Event]) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events if e.HasField("summary") for v in e.summary.value}


STEPS = [
    {"loss": jnp.float32(2.5), "grad_norm": np.float32(0.75), "tokens_per_s": 1000.0, "skipped": jnp.int32(0)},
    {"loss": 2.0, "grad_norm": 0.5, "tokens_per_s": 3000.0, "skipped": 0},
    {"loss": jnp.float32(jnp.nan), "grad_norm": float("inf"), "tokens_per_s": 2000.0, "skipped": jnp.int32(1)},
]


def test_jsonl_has_one_valid_line_per_step(tmp_path):
    before = time.time()
    with MetricsLogger(tmp_path, total_steps=3, progress=False) as logger:
        for step, metrics in enumerate(STEPS, start=1):
            logger.log(step, metrics)
            # Flushed at once: a killed run keeps every line written so far.
            assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == 2.5 and rows[0]["grad_norm"] == 0.75 and rows[0]["skipped"] == 0
    assert rows[1]["tokens_per_s"] == 3000.0
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None and rows[2]["skipped"] == 1
    assert all(before <= r["time"] <= time.time() for r in rows)
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, progress=False, report_to=["tensorboard"]) as logger:
        for step, metrics in enumerate(STEPS, start=1):
            logger.log(step, metrics)
    values = scalars(read_events(tmp_path / "tensorboard"))
    assert values[("loss", 1)] == 2.5 and values[("loss", 2)] == 2.0 and math.isnan(values[("loss", 3)])
    assert values[("grad_norm", 1)] == 0.75 and values[("grad_norm", 3)] == math.inf
    assert values[("tokens_per_s", 2)] == 3000.0 and values[("skipped", 3)] == 1.0
    assert len(values) == 4 * 3


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with MetricsLogger(out, total_steps=3, enabled=False) as logger:
        logger.log(1, STEPS[0])
        assert logger.summary() == {}
    assert not out.exists()
    assert capsys.readouterr() == ("", "")
    assert MetricsLogger(None, total_steps=3, progress=False).enabled  # process 0 logs by default


def test_summary(tmp_path, capsys):
    losses = [5.0, 4.0, 3.0, 2.9, 2.8, 2.7, 2.6, float("nan"), 2.5, 2.4, 2.3, 2.0]
    with MetricsLogger(tmp_path, total_steps=12, progress=False) as logger:
        for step, loss in enumerate(losses, start=1):
            logger.log(step, {"loss": loss, "tokens_per_s": 100.0 * step, "skipped": float(math.isnan(loss))})
        summary = logger.summary()
    assert summary["steps"] == 12
    assert summary["skipped_steps"] == 1
    assert summary["final_loss"] == 2.0
    # The last 10 steps are losses[2:]; the NaN (skipped) one is left out of the mean.
    assert summary["mean_loss_last_10"] == pytest.approx((3.0 + 2.9 + 2.8 + 2.7 + 2.6 + 2.5 + 2.4 + 2.3 + 2.0) / 9)
    assert summary["mean_tokens_per_s"] == pytest.approx(650.0)  # 100 * mean(1..12)
    assert 0 < summary["wall_time_s"] < 60
    assert strict_json((tmp_path / "summary.json").read_text()) == summary
    printed = capsys.readouterr().out
    assert printed.count("summary") == 1 and '"skipped_steps": 1' in printed


def test_resumed_run_appends_and_starts_the_bar_at_start_step(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, progress=False) as logger:
        for step in (1, 2):
            logger.log(step, {"loss": 1.0})
    with MetricsLogger(tmp_path, total_steps=10, start_step=2, interactive=True) as logger:
        assert logger.bar.n == 2 and logger.bar.total == 10
        for step in (3, 4, 5):
            logger.log(step, {"loss": 0.5, "tokens_per_s": 1234.0})
        assert logger.bar.n == 5
        assert logger.bar.postfix == "loss=0.5000, tok/s=1,234"
        assert logger.summary()["steps"] == 3
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_step_flops_count_the_lm_head_where_logits_are_made():
    """With loss positions the LM head runs at the target tokens only: the step's FLOPs drop by
    6 x hidden x vocab per token that is not a target, and by nothing else."""
    from types import SimpleNamespace

    from stjax.train.metrics import step_flops

    cfg = QwenVLConfig.from_file("tiny-qwen2-vl")
    inputs = SimpleNamespace(input_ids=np.zeros((1, 2, 100), np.int32), vision=None)
    metrics = {"tokens": 180.0, "target_tokens": 30.0}
    everywhere = step_flops(cfg, SimpleNamespace(inputs=inputs, loss_positions=None), metrics)
    targets_only = step_flops(cfg, SimpleNamespace(inputs=inputs, loss_positions=np.zeros((1, 2, 64))), metrics)
    assert everywhere == model_flops_per_token(cfg, 100) * 180
    assert everywhere - targets_only == 6 * 64 * 512 * (180 - 30)  # tiny-qwen2-vl: hidden 64, vocab 512
