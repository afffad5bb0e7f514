"""The grain input pipeline: shuffle, shard per JAX process, decode + preprocess in worker processes,
skip bad samples, and pad batches into a few fixed shapes.

    samples -> shuffle(seed) -> repeat(epochs) -> [process k of n] -> encode (workers) -> pad + batch

Every batch is padded to the smallest configured bucket that fits its longest sequence and its
largest patch count, so a jitted step compiles once per (token bucket, patch bucket) pair. A sample
that fails (SampleError: missing or broken video, too long, ...; or any other error while it is
encoded) is dropped and recorded with its reason in `iterator.skipped`; the run goes on. Iterator state
(`get_state` / `set_state`) restores the exact position, so a resumed run yields the same batches it
would have without the interruption.

Batch layout (leading axis = batch, unlike Hugging Face's flat patch list, so batches shard over data
parallel devices): input_ids / attention_mask / loss_mask (B, L), position_ids (3, B, L),
pixel_values_videos (B, P, 1176), video_grid_thw (B, V, 3), second_per_grid_ts (B, V), pixel_values
(B, Pi, 1176), image_grid_thw (B, I, 3), sample_id (B,) the records' ids. Padded tokens have attention 0,
loss 0, position 1; padded patches are zeros after the sample's sum(t*h*w) patches; padded grid rows are (0, 0, 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grain
import numpy as np

from stjax.data.formats import Sample
from stjax.data.processor import Processor, Template
from stjax.data.video import SampleError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 1
    seed: int = 0
    num_epochs: int = 1
    shuffle: bool = True
    num_workers: int = 0  # worker processes; 0 decodes in the calling process
    # Threads per process (decord, PIL and NumPy release the GIL) and samples read ahead per process.
    # grain's defaults (16, 500) would hold ~5 GB of 8-frame samples in memory.
    num_threads: int = 2
    prefetch: int = 8
    template: Template = "sft"
    token_buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    patch_buckets: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)  # video patches per sample
    image_patch_buckets: tuple[int, ...] = (0, 1024, 4096, 16384)  # image patches per sample
    videos_per_sample: int = 1
    images_per_sample: int = 0
    drop_remainder: bool = True  # a short last batch would be one more shape to compile
    shard_index: int | None = None  # default: jax.process_index()
    shard_count: int | None = None  # default: jax.process_count()


def _bucket(size: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in sorted(buckets) if b >= size), None)


class _Encode:
    """Sample -> processor arrays, or {"skipped": message} for a SampleError (runs in the workers)."""

    def __init__(self, processor: Processor, cfg: LoaderConfig):
        self.processor = processor
        self.cfg = cfg

    def __call__(self, sample: Sample) -> dict:
        try:
            out = self.processor(sample, self.cfg.template)
            checks = [
                (len(out["input_ids"]), self.cfg.token_buckets, "tokens"),
                (len(out["pixel_values_videos"]), self.cfg.patch_buckets, "video patches"),
                (len(out["pixel_values"]), self.cfg.image_patch_buckets, "image patches"),
            ]
            for size, buckets, what in checks:
                if _bucket(size, buckets) is None:
                    raise SampleError(f"{size} {what} exceed the largest bucket {max(buckets)}", sample_id=sample.id)
            if len(out["video_grid_thw"]) > self.cfg.videos_per_sample:
                raise SampleError("more videos than videos_per_sample", sample_id=sample.id)
            if len(out["image_grid_thw"]) > self.cfg.images_per_sample:
                raise SampleError("more images than images_per_sample", sample_id=sample.id)
            return out | {"sample_id": sample.id}
        except SampleError as e:
            return {"skipped": str(e), "id": sample.id}
        except Exception as e:  # any other failure of one sample (resizing, tokenising) skips it too
            return {"skipped": str(SampleError(f"{type(e).__name__}: {e}", sample_id=sample.id)), "id": sample.id}


def _pad_to(x: np.ndarray, length: int, axis: int, value) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def pad_batch(items: list[dict], cfg: LoaderConfig, pad_id: int) -> dict[str, np.ndarray]:
    """Stack processor outputs into one batch padded to the buckets (see the module docstring)."""
    length = _bucket(max(len(x["input_ids"]) for x in items), cfg.token_buckets)
    patches = _bucket(max(len(x["pixel_values_videos"]) for x in items), cfg.patch_buckets)
    image_patches = _bucket(max(len(x["pixel_values"]) for x in items), cfg.image_patch_buckets)
    v, i = cfg.videos_per_sample, cfg.images_per_sample

    def stack(key: str, size: int, axis: int, value, dtype) -> np.ndarray:
        return np.stack([_pad_to(x[key], size, axis, value) for x in items]).astype(dtype)

    return {
        "input_ids": stack("input_ids", length, 0, pad_id, np.int32),
        "attention_mask": stack("attention_mask", length, 0, 0, np.int32),
        "loss_mask": stack("loss_mask", length, 0, 0, np.int32),
        "position_ids": stack("position_ids", length, 1, 1, np.int32).transpose(1, 0, 2),
        "pixel_values_videos": stack("pixel_values_videos", patches, 0, 0.0, np.float32),
        "video_grid_thw": stack("video_grid_thw", v, 0, 0, np.int32),
        "second_per_grid_ts": stack("second_per_grid_ts", v, 0, 0.0, np.float32),
        "pixel_values": stack("pixel_values", image_patches, 0, 0.0, np.float32),
        "image_grid_thw": stack("image_grid_thw", i, 0, 0, np.int32),
        "sample_id": np.array([x.get("sample_id", "") for x in items]),  # which record each row is (GRPO scores by it)
    }


class _BatchIterator(grain.DatasetIterator):
    """Pulls encoded samples, records skipped ones, and pads every `batch_size` good ones into a batch.

    Batches are formed whole within one `__next__`, so the state between batches is just the parent's
    state plus the skip record.
    """

    def __init__(self, parent: grain.DatasetIterator, cfg: LoaderConfig, pad_id: int):
        super().__init__(parent)
        self.cfg = cfg
        self.pad_id = pad_id
        self.skipped: list[tuple[str, str]] = []  # (sample id, message)

    def __next__(self) -> dict[str, np.ndarray]:
        items = []
        while len(items) < self.cfg.batch_size:
            try:
                item = next(self._parent)
            except StopIteration:
                if items and not self.cfg.drop_remainder:
                    break
                raise
            if "skipped" in item:
                log.warning("skipping %s", item["skipped"])
                self.skipped.append((item["id"], item["skipped"]))
            else:
                items.append(item)
        return pad_batch(items, self.cfg, self.pad_id)

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": [list(s) for s in self.skipped]}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = [tuple(s) for s in state["skipped"]]


class _Batch(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, cfg: LoaderConfig, pad_id: int):
        super().__init__(parent)
        self.cfg = cfg
        self.pad_id = pad_id

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), self.cfg, self.pad_id)


def make_loader(samples: list[Sample], processor: Processor, cfg: LoaderConfig = LoaderConfig()) -> grain.IterDataset:
    """The pipeline as a grain IterDataset; `iter()` it for batches (the iterator has `.skipped`)."""
    if cfg.shard_index is None or cfg.shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    else:
        shard_index, shard_count = cfg.shard_index, cfg.shard_count
    ds = grain.MapDataset.source(samples)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # grain reshuffles every epoch (seed + epoch)
    # Slice after repeat: every position of the global stream belongs to exactly one process.
    ds = ds.repeat(cfg.num_epochs)[shard_index::shard_count]
    read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    ds = ds.map(_Encode(processor, cfg)).to_iter_dataset(read)
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app nobody parses them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=2))
    return _Batch(ds, cfg, processor.tokenizer.pad_token_id)
