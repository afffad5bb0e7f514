"""The references stjax is checked against: transformers' PyTorch models and an independent NumPy
statement of the original Qwen M-RoPE rule (written from the rule, not from stjax's code)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from stjax.models.config import QwenVLConfig
from stjax.models.families import family


def tiny_config(model_type: str, **changes) -> QwenVLConfig:
    return QwenVLConfig.from_file(family(model_type).tiny_preset).replace(**changes)


def hf_model(cfg: QwenVLConfig, seed: int = 0, dtype=torch.float32):
    """A transformers model of this config with random weights (eager attention)."""
    return hf_model_from_dict(cfg.to_hf_dict(), seed, dtype)


def hf_model_from_dict(config: dict, seed: int = 0, dtype=torch.float32):
    """A transformers model of this config.json, read by transformers, with random weights (eager attention)."""
    classes = {
        "qwen2_vl": (transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration),
    }
    config_cls, model_cls = classes[config["model_type"]]
    hf_cfg = config_cls.from_dict(config)
    torch.manual_seed(seed)
    model = model_cls._from_config(hf_cfg, attn_implementation="eager", dtype=dtype)
    if config["model_type"] == "qwen3_vl":  # norms start at 1 and 0, biases at 0: random ones tell a misplaced
        with torch.no_grad():  # norm or a missing bias apart
            for name, param in model.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    param.copy_(torch.randn_like(param) * 0.2 + (name.endswith("weight")))
    return model.eval()


def hf_logits(model, batch: dict) -> np.ndarray:
    """Logits of the transformers model; position ids are passed explicitly (see rope_index)."""
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if v is not None}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in kwargs:
            kwargs[k] = kwargs[k].to(model.dtype)
    kwargs.pop("second_per_grid_ts", None)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts, cfg: QwenVLConfig):
    """The original Qwen rule (transformers 4.49), restated: returns (3, B, L) positions and deltas."""
    image_grid_thw = [] if image_grid_thw is None else list(np.asarray(image_grid_thw))
    video_grid_thw = [] if video_grid_thw is None else list(np.asarray(video_grid_thw))
    merge = cfg.vision.spatial_merge_size
    B, L = input_ids.shape
    out = np.ones((3, B, L), np.int64)
    deltas = []
    img_k = vid_k = 0
    for b in range(B):
        ids = list(input_ids[b][attention_mask[b] == 1])
        pos_list = []
        st = 0
        n_img = sum(
            1 for i, x in enumerate(ids[:-1]) if x == cfg.vision_start_token_id and ids[i + 1] == cfg.image_token_id
        )
        n_vid = sum(
            1 for i, x in enumerate(ids[:-1]) if x == cfg.vision_start_token_id and ids[i + 1] == cfg.video_token_id
        )
        for _ in range(n_img + n_vid):
            ed_img = ids.index(cfg.image_token_id, st) if cfg.image_token_id in ids[st:] else len(ids) + 1
            ed_vid = ids.index(cfg.video_token_id, st) if cfg.video_token_id in ids[st:] else len(ids) + 1
            if ed_img < ed_vid:
                t, h, w = image_grid_thw[img_k]
                img_k += 1
                ed, spg = ed_img, 0.0
            else:
                t, h, w = video_grid_thw[vid_k]
                spg = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[vid_k])
                vid_k += 1
                ed = ed_vid
            gt, gh, gw = int(t), int(h) // merge, int(w) // merge
            text_len = ed - st
            st_idx = max(p.max() for p in pos_list) + 1 if pos_list else 0
            pos_list.append(np.tile(np.arange(text_len), (3, 1)) + st_idx)
            if cfg.model_type == "qwen2_vl":
                t_index = np.repeat(np.arange(gt), gh * gw)
            else:
                scale = np.float32(spg) * np.float32(cfg.vision.tokens_per_second)
                t_index = (np.repeat(np.arange(gt, dtype=np.float32), gh * gw) * scale).astype(np.int64)
            h_index = np.tile(np.repeat(np.arange(gh), gw), gt)
            w_index = np.tile(np.arange(gw), gt * gh)
            pos_list.append(np.stack([t_index, h_index, w_index]) + text_len + st_idx)
            st = ed + gt * gh * gw
        if st < len(ids):
            st_idx = max(p.max() for p in pos_list) + 1 if pos_list else 0
            pos_list.append(np.tile(np.arange(len(ids) - st), (3, 1)) + st_idx)
        positions = np.concatenate(pos_list, axis=1)
        out[:, b, attention_mask[b] == 1] = positions
        deltas.append(positions.max() + 1 - L)
    return out, np.asarray(deltas)


def make_prompt(cfg: QwenVLConfig, rng: np.random.Generator, parts: list, vocab_hi: int | None = None) -> list[int]:
    """Token ids for a prompt made of text lengths (int) and vision blocks (("image"|"video", t, h, w))."""
    hi = vocab_hi or min(cfg.image_token_id, cfg.bos_token_id) - 1
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += rng.integers(0, hi, part).tolist()
        else:
            kind, t, h, w = part
            pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
            ids += [cfg.vision_start_token_id] + [pad] * (t * h * w // 4) + [cfg.vision_end_token_id]
    return ids


def make_batch(
    cfg: QwenVLConfig, prompts: list[list], seed: int = 0, fps: float = 1.0, padding_side: str = "left"
) -> dict:
    """A padded batch (left by default, as for generation) with random pixels for every vision
    block, in transformers' argument names."""
    rng = np.random.default_rng(seed)
    rows = [make_prompt(cfg, rng, p) for p in prompts]
    L = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), L), np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for b, r in enumerate(rows):
        real = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        input_ids[b, real] = r
        mask[b, real] = 1
    blocks = [part for p in prompts for part in p if not isinstance(part, int)]
    images = [b[1:] for b in blocks if b[0] == "image"]
    videos = [b[1:] for b in blocks if b[0] == "video"]
    dim = cfg.vision.patch_dim
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if images:
        batch["pixel_values"] = rng.normal(size=(sum(np.prod(g) for g in images), dim)).astype(np.float32)
        batch["image_grid_thw"] = np.asarray(images, np.int64)
    if videos:
        batch["pixel_values_videos"] = rng.normal(size=(sum(np.prod(g) for g in videos), dim)).astype(np.float32)
        batch["video_grid_thw"] = np.asarray(videos, np.int64)
        batch["second_per_grid_ts"] = np.full((len(videos),), cfg.vision.temporal_patch_size / fps, np.float32)
    positions, _ = rope_index(
        input_ids, mask, batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch.get("second_per_grid_ts"), cfg
    )
    batch["position_ids"] = positions
    return batch


def sample_inputs(cfg: QwenVLConfig, arrays: dict):
    """`prepare_inputs` for one processed video sample (stjax's `Processor` output), its position ids as made."""
    from stjax.models.inputs import prepare_inputs

    return prepare_inputs(
        cfg,
        arrays["input_ids"][None],
        None,
        None,
        None,
        arrays["pixel_values_videos"],
        arrays["video_grid_thw"],
        arrays.get("second_per_grid_ts"),
        arrays["position_ids"][:, None],
    )
