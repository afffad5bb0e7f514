"""Model families are plug-ins: a family registered by its `model_type` is what shared code asks."""

import numpy as np
import pytest

from stjax.models import families
from stjax.models.config import ConfigError, QwenVLConfig
from stjax.models.inputs import prepare_inputs
from stjax.models.qwen2_vl import Qwen2VL


class ToyVL(Qwen2VL):
    """Qwen2-VL but for one rule: video time positions advance 5 per second of video."""

    model_type = "toy_vl"

    def video_tokens_per_second(self, v) -> float:
        return 5.0


@pytest.fixture
def toy(monkeypatch):
    families.model_types()  # the built-in families registered (on first use) before the copy
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))  # forget the toy afterwards
    return families.register(ToyVL())


def video_time_steps(cfg: QwenVLConfig) -> list[int]:
    """The distinct time positions of a 3-frame-pair video's tokens, from its first."""
    merge = cfg.vision.spatial_merge_size
    pads = 3 * 4 * 4 // merge**2
    ids = np.array([1, cfg.vision_start_token_id] + [cfg.video_token_id] * pads + [cfg.vision_end_token_id, 2])
    inputs = prepare_inputs(
        cfg,
        ids,
        pixel_values_videos=np.zeros((3 * 4 * 4, cfg.vision.patch_dim), np.float32),
        video_grid_thw=np.array([[3, 4, 4]]),
        second_per_grid_ts=np.array([1.0]),
    )
    time = inputs.position_ids[0, 0][ids == cfg.video_token_id]
    return sorted(set((time - time[0]).tolist()))


def test_registered_family_is_picked_by_model_type(toy):
    d = QwenVLConfig.from_file("tiny-qwen2-vl").to_hf_dict()
    cfg = QwenVLConfig.from_hf_dict(dict(d, model_type="toy_vl"))
    assert cfg.family is toy and cfg.to_hf_dict()["model_type"] == "toy_vl"
    # The rule (time = floor(t * tokens_per_second * second_per_grid_t)): Qwen2-VL's frame-pair index
    # 0, 1, 2; the toy's 0, 5, 10 at one second per frame pair.
    assert video_time_steps(QwenVLConfig.from_hf_dict(d)) == [0, 1, 2]
    assert video_time_steps(cfg) == [0, 5, 10]
    assert "toy_vl" in families.model_types()


def test_unknown_model_type_is_one_line_naming_the_known_ones(toy):
    with pytest.raises(ConfigError) as e:
        QwenVLConfig.from_hf_dict({"model_type": "llava"})
    assert str(e.value) == "unknown model_type 'llava'; supported: qwen2_vl, qwen2_5_vl, qwen3_vl, toy_vl"
