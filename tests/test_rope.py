"""Host-side indices against references stjax did not write: the NumPy restatement of the original
M-RoPE rule (reference.rope_index) and transformers' own vision position / window functions."""

import numpy as np
import pytest
import torch
from reference import make_batch, rope_index, tiny_config
from transformers import vision_utils

from stjax.models.inputs import bucket, make_groups
from stjax.models.rope import get_rope_index, vision_rotary_positions, window_order

PROMPTS = {
    "text": [[7]],
    "image": [[3, ("image", 1, 6, 8), 4]],
    # 6 time steps over a 2 x 2 merged grid: time runs past the spatial size
    "long_video_small_frames": [[2, ("video", 6, 4, 4), 5]],
    "video_then_image": [[1, ("video", 3, 8, 4), 2, ("image", 1, 4, 4), 3]],
    "two_videos": [[2, ("video", 2, 4, 8), 1, ("video", 4, 4, 4), 2]],
    "padded_batch": [[3, ("video", 5, 4, 4), 2], [9, ("image", 1, 8, 8), 1], [4]],
}


@pytest.mark.parametrize("fps", [1.0, 0.75, 24.0])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_match_the_original_rule(arch, prompt, fps):
    cfg = tiny_config(arch)
    batch = make_batch(cfg, PROMPTS[prompt], fps=fps)
    args = (
        batch["input_ids"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch.get("second_per_grid_ts"),
    )
    ours, ours_delta = get_rope_index(args[0], cfg.rope_spec(), *args[1:], batch["attention_mask"])
    ref, ref_delta = rope_index(batch["input_ids"], batch["attention_mask"], *args[1:], cfg)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours_delta, ref_delta)


def test_text_after_long_video_starts_past_its_last_time_position():
    """The original rule (not transformers 5.x's cur + max(h, w)): text resumes at max + 1."""
    cfg = tiny_config("qwen2_vl")
    batch = make_batch(cfg, PROMPTS["long_video_small_frames"])
    pos, _ = get_rope_index(batch["input_ids"], cfg.rope_spec(), video_grid_thw=batch["video_grid_thw"])
    # 2 text + vision_start = 3 tokens; the 24 video pads start at 3 and their time ids reach
    # 3 + 5 = 8 while rows and columns stop at 4, so the vision_end token (index 27) sits at 9.
    assert pos[:, 0, 3 + 24].tolist() == [9, 9, 9]


@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(2, 8, 8), (3, 4, 12)], [(1, 16, 20)]])
def test_vision_rotary_positions_match_transformers(grids):
    ref = vision_utils.get_vision_position_ids(torch.tensor(grids), 2).numpy()
    np.testing.assert_array_equal(vision_rotary_positions(np.asarray(grids), 2), ref)


@pytest.mark.parametrize("grids", [[(1, 16, 16)], [(2, 10, 14)], [(3, 8, 24), (1, 20, 6)], [(1, 2, 2)]])
def test_window_order_matches_transformers(grids):
    ref_index, ref_cu = vision_utils.get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    order, lengths = window_order(np.asarray(grids), merge=2, window=4)
    np.testing.assert_array_equal(order, ref_index.numpy())
    ref_lengths = np.diff(torch.unique_consecutive(ref_cu).numpy()) // 4  # in merged tokens
    np.testing.assert_array_equal(lengths, ref_lengths)


def test_buckets_pad_by_at_most_an_eighth():
    for n in range(1, 5000):
        b = bucket(n)
        assert b >= n and (n < 8 or b <= 1.125 * n + 1)
    # 8-frame 336x336 videos: 2304 patches in frames of 576 fit exactly
    assert [bucket(n) for n in (576, 642, 2304, 2305)] == [576, 704, 2304, 2560]


def test_groups_gather_and_return_every_row():
    lengths = np.array([5, 3, 8])
    g = make_groups(lengths, size=8, count=4, rows=20)
    rows = np.arange(20)
    flat = np.concatenate([rows[g.index].reshape(-1), [-1]])
    back = flat[g.inverse]
    np.testing.assert_array_equal(back[:16], rows[:16])  # every real row comes back to itself
    assert (back[16:] == -1).all()  # bucket padding reads the appended row
    for k, n in enumerate(lengths):  # each group holds one consecutive segment
        start = lengths[:k].sum()
        np.testing.assert_array_equal(g.index[k, :n], np.arange(start, start + n))
