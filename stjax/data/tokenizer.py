"""A small byte-level BPE tokenizer with the Qwen special tokens and chat template, built offline.

No Qwen tokenizer can be downloaded here, and a 151k vocabulary would dwarf a tiny test model. This
builds a few-thousand-token tokenizer from local text, adds the Qwen special tokens after the learned
vocabulary (the same arrangement as Qwen, where they follow the 151,643 regular tokens) and saves it in
Hugging Face format, so `transformers.AutoTokenizer.from_pretrained(dir)` loads it offline.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from stjax.models.tiny import save_tiny_model

# In Qwen's order; <|endoftext|> is the pad token and <|im_end|> the end of a turn.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Atomic but ordinary text (not stripped by skip_special_tokens), so answers stay readable.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# The Qwen2-VL chat template's output, written as Jinja: a default system turn when the first message
# is not a system message, vision placeholders in place of image/video parts, and the assistant header
# when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 3000) -> Path:
    """Train byte-level BPE on `texts`, add the special tokens and save tokenizer.json + config to out_dir.

    Training is deterministic for the same texts, so the saved files are byte-identical.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in TAG_TOKENS])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids a model config needs, keyed like the Qwen config fields.

    Works on any loaded tokenizer with the Qwen special tokens (ours or a real Qwen one).
    """
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": ids["<|endoftext|>"],
        "bos_token_id": ids["<|endoftext|>"],  # Qwen configs name <|endoftext|> as bos too
        "eos_token_id": ids["<|im_end|>"],
        "im_start_token_id": ids["<|im_start|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
    }


def tiny_model_dir(tokenizer_dir: Path, out: Path, arch: str, seed: int) -> Path:
    """A random tiny model of family `arch` whose vocabulary and special ids match the tokenizer, as a HF
    directory with the tokenizer's files beside it."""
    ids = special_token_ids(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True))
    return save_tiny_model(out, arch, seed, ids, side_files=tokenizer_dir)
