"""grain pipeline: buckets, resume, process shards, worker processes, skipping bad samples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from stjax.data.formats import Sample, read_plain_jsonl
from stjax.data.loader import LoaderConfig, make_loader
from stjax.data.processor import Processor
from stjax.data.synthetic import generate
from stjax.data.video import MediaConfig

SMALL = MediaConfig(min_pixels=0, max_pixels=56 * 56)  # 56x56 frames: 64 patches per video
BUCKETS = dict(token_buckets=(256, 512, 1024), patch_buckets=(64, 128))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[Sample], Processor, Path]:
    out = generate(tmp_path_factory.mktemp("synth"), n=2, seed=3, sheet=0)
    return read_plain_jsonl(out / "plain.jsonl").samples, Processor.from_pretrained(out / "tokenizer", media=SMALL), out


def run(loader, state=None) -> tuple[list[dict], object]:
    it = iter(loader)
    if state is not None:
        it.set_state(state)
    batches = list(it)
    it.close()
    return batches, it


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_are_padded_to_buckets(data):
    samples, processor, _ = data
    cfg = LoaderConfig(batch_size=3, shard_index=0, shard_count=1, **BUCKETS)
    batches, _ = run(make_loader(samples, processor, cfg))
    assert len(batches) == len(samples) // 3
    for b in batches:
        length = b["input_ids"].shape[1]
        assert length in cfg.token_buckets and b["pixel_values_videos"].shape == (3, 64, 1176)
        assert b["position_ids"].shape == (3, 3, length) and b["video_grid_thw"].tolist() == [[[4, 4, 4]]] * 3
        real = b["attention_mask"].sum(1)
        for row, n in enumerate(real):
            assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
            assert (b["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
            assert not b["loss_mask"][row, n:].any() and (b["position_ids"][:, row, n:] == 1).all()


def test_resume_and_worker_processes_give_the_same_batches(data):
    samples, processor, _ = data
    cfg = LoaderConfig(batch_size=2, seed=5, num_epochs=2, shard_index=0, shard_count=1, **BUCKETS)
    full, _ = run(make_loader(samples, processor, cfg))
    assert len(full) == len(samples)  # 2 epochs of 12 in batches of 2
    # In process, then with two worker processes: same batches, and a state taken after 3 batches
    # resumes with exactly the rest.
    for setting in (cfg, dataclasses.replace(cfg, num_workers=2)):
        it = iter(make_loader(samples, processor, setting))
        head = [next(it) for _ in range(3)]
        state = it.get_state()
        it.close()
        tail, _ = run(make_loader(samples, processor, setting), state)
        assert same(head + tail, full)


class _IdProcessor:
    """Stands in for Processor: encodes only the sample's index, so shard contents are easy to read."""

    class tokenizer:  # noqa: N801 - mimics the attribute the loader reads
        pad_token_id = 0

    def __call__(self, sample: Sample, template: str) -> dict:
        n = int(sample.id)
        empty = np.zeros((0, 1176), np.float32)
        return {
            "input_ids": np.array([n]),
            "attention_mask": np.ones(1, np.int32),
            "loss_mask": np.ones(1, np.int32),
            "position_ids": np.zeros((3, 1), np.int64),
            "pixel_values_videos": empty,
            "video_grid_thw": np.zeros((0, 3), np.int64),
            "second_per_grid_ts": np.zeros(0, np.float32),
            "pixel_values": empty,
            "image_grid_thw": np.zeros((0, 3), np.int64),
        }


def test_process_shards_are_disjoint_and_cover_each_epoch():
    samples = [Sample(str(i), "v.mp4", "q", ["A. a"], "A", "direction", "forward") for i in range(1, 24)]
    seen = []
    for index in range(2):
        cfg = LoaderConfig(
            batch_size=1,
            shard_index=index,
            shard_count=2,
            num_epochs=2,
            drop_remainder=False,
            token_buckets=(8,),
            patch_buckets=(0,),
        )
        batches, _ = run(make_loader(samples, _IdProcessor(), cfg))
        seen.append([int(b["input_ids"][0, 0]) for b in batches])
    assert sorted(seen[0] + seen[1]) == sorted(list(range(1, 24)) * 2)
    # Within each epoch the shards split the 23 samples without overlap (interleaved positions).
    shuffled = [None] * 46
    shuffled[0::2], shuffled[1::2] = seen[0], seen[1]
    assert sorted(shuffled[:23]) == list(range(1, 24)) and sorted(shuffled[23:]) == list(range(1, 24))
    assert shuffled[:23] != shuffled[23:]  # reshuffled each epoch
    assert shuffled[:23] != list(range(1, 24))


def test_bad_samples_are_skipped_counted_and_reported(data, tmp_path):
    samples, processor, out = data
    video = Path(samples[0].video).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(video[: len(video) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    bad = [
        dataclasses.replace(samples[0], id="missing", video=str(tmp_path / "nope.mp4")),
        dataclasses.replace(samples[1], id="cut", video=str(tmp_path / "cut.mp4")),
        dataclasses.replace(samples[2], id="empty", video=str(tmp_path / "empty.mp4")),
        dataclasses.replace(samples[3], id="long", solution="word " * 2000),
    ]
    cfg = LoaderConfig(batch_size=2, shard_index=0, shard_count=1, **BUCKETS)
    batches, it = run(make_loader(samples[4:] + bad, processor, cfg))
    assert len(batches) == len(samples[4:]) // 2
    reasons = dict(it.skipped)
    assert set(reasons) == {"missing", "cut", "empty", "long"}
    assert "nope.mp4" in reasons["missing"] and "not found" in reasons["missing"]
    assert "cut.mp4" in reasons["cut"] and "empty.mp4" in reasons["empty"]
    assert "exceed the largest bucket" in reasons["long"]
