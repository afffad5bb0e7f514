"""stjax: ST-R1 (ST-Think) in JAX; Qwen2-VL / Qwen2.5-VL in Flax NNX."""

from stjax.models.config import QwenVLConfig
from stjax.models.loading import load_pretrained
from stjax.models.qwen_vl import QwenVLForConditionalGeneration

__all__ = ["QwenVLConfig", "QwenVLForConditionalGeneration", "load_pretrained"]
