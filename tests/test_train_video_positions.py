"""Qwen2.5-VL through the training run (`stjax.train.stages.train`, as `python -m stjax.train`): the M-RoPE
positions of a training batch's video tokens equal transformers' `get_rope_index` on the same videos.

With `data.second_per_grid: kept_frames` (what the Qwen2.5-VL training configs set), the reference's
time step is what transformers' processor derives from a video's metadata:
second_per_grid_t = temporal_patch_size / VideoMetadata.sampled_fps, the rate of the frames the clip
keeps (the recipe's 8, spread over the whole video) - not the rate of the frames decoded before the
8-frame rule. Positions after a video follow the original Qwen rule (text resumes at max + 1;
transformers 5.x resumes at cur + max(h, w)), checked against the NumPy restatement in reference.py.
"""

import av
import numpy as np
import torch
import transformers
from reference import rope_index
from transformers.video_utils import VideoMetadata

from stjax.data.formats import read_plain_jsonl
from stjax.models.config import QwenVLConfig
from stjax.train import config as train_config
from stjax.train import sft, stages

ROWS = 8  # one micro-batch over the 8 simulated devices


def recipe_frames(total: int, video_fps: float, fps: float = 1.0, keep: int = 8) -> list[int]:
    """The recipe's frames (st-r1-recipe.md, qwen-vl-facts.md): qwen-vl-utils samples n frames at
    `fps` (n clamped to [4, total], floored to even), then `keep` of them are taken."""
    n = min(max(total / video_fps * fps, 4), total)
    n = int(n // 2 * 2)
    sampled = np.round(np.linspace(0, total - 1, n)).astype(int)
    return sampled[np.linspace(0, n - 1, keep).astype(int)].tolist()


def test_qwen2_5_vl_training_batch_positions_equal_transformers(synthetic_assets, tmp_path, monkeypatch):
    data, models = synthetic_assets
    batches = []
    host_batch = sft.host_batch
    monkeypatch.setattr(sft, "host_batch", lambda cfg, micro: batches.append(micro) or host_batch(cfg, micro))
    cfg = train_config.load(
        None,
        [
            f"output_dir={tmp_path}",
            "max_steps=1",
            f"batch_size={ROWS}",
            "mesh=fsdp=-1",
            f"model.model_name_or_path={models['qwen2_5_vl']}",
            f"data.path={data}",
            "data.shuffle=false",
            "data.second_per_grid=kept_frames",
            "data.max_pixels=12544",
            "data.token_buckets=[512, 1024]",
            "data.patch_buckets=[1024, 2048]",
            "checkpoint.export_hf=false",
        ],
    )
    stages.train(cfg)
    batch = batches[0][0]
    samples = read_plain_jsonl(data / "plain.jsonl").samples[:ROWS]  # unshuffled: row b is sample b

    model_cfg = QwenVLConfig.from_file(models["qwen2_5_vl"])
    seconds = []
    for sample in samples:
        with av.open(sample.video) as container:
            stream = container.streams.video[0]
            total, video_fps = stream.frames, float(stream.average_rate)
        meta = VideoMetadata(total_num_frames=total, fps=video_fps, frames_indices=recipe_frames(total, video_fps))
        seconds.append(model_cfg.vision.temporal_patch_size / meta.sampled_fps)
    seconds = np.asarray(seconds, np.float32)
    assert (seconds > 2.0).all()  # the 8 kept frames are further apart than the 1 fps sampling

    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    grids = batch["video_grid_thw"][:, 0].astype(np.int64)  # one video per sample
    np.testing.assert_allclose(batch["second_per_grid_ts"][:, 0], seconds, rtol=1e-6)

    reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(models["qwen2_5_vl"]).model
    types = np.where(ids == model_cfg.video_token_id, 2, 0)
    theirs, _ = reference.get_rope_index(
        torch.from_numpy(ids),
        torch.from_numpy(types),
        None,
        torch.from_numpy(grids),
        torch.from_numpy(seconds),
        torch.from_numpy(mask),
    )
    theirs = theirs.numpy()
    ours = batch["position_ids"]
    for b in range(ROWS):
        video = np.flatnonzero(ids[b] == model_cfg.video_token_id)
        through_video = slice(0, video[-1] + 1)
        np.testing.assert_array_equal(ours[:, b, through_video], theirs[:, b, through_video])
        assert ours[0, b, video].max() - ours[0, b, video].min() >= 2 * seconds[b]  # time really advances
    original, _ = rope_index(ids, mask, None, grids, seconds, model_cfg)
    real = mask.astype(bool)
    np.testing.assert_array_equal(ours.transpose(1, 2, 0)[real], original.transpose(1, 2, 0)[real])
