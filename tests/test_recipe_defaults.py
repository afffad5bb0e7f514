"""The defaults that the release's recipe fixes (../shared/notes/st-r1-recipe.md, qwen-vl-facts.md),
pinned against literal values: changing one must be a visible decision, not a silent drift.

Inference (the seed README): 8 frames, fps 1.0, max_pixels 360*420, up to 512 new tokens, greedy.
Cold-start SFT (the public scripts): 4-bit QLoRA (nf4, double quantization), LoRA r=8, alpha=8,
dropout 0.1 on q,k,v,o; lr 8e-5, cosine, warmup ratio 0.1, max grad norm 0.3; 1 sample per device x 4
accumulation x 4 GPUs; 1 epoch; bf16; gradient checkpointing; loss over every non-pad, non-vision token."""

from pathlib import Path

import pytest
import yaml

from stjax.data.video import MediaConfig
from stjax.eval.extract import RULES
from stjax.eval.mcq import EvalConfig, parse_config, with_training_recipe
from stjax.sampling.sampler import SamplingConfig
from stjax.train import config as train_config
from stjax.train.step import OptimConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE_SFT = ["qwen2-vl-7b-h100x4.yaml", "qwen2.5-vl-7b-h100x4.yaml"]


def test_video_defaults_are_the_seeds_and_qwen_vl_utils():
    m = MediaConfig()
    assert (m.num_frames, m.fps, m.max_pixels) == (8, 1.0, 151200)
    assert 360 * 420 == 151200
    # qwen-vl-utils' constants
    assert (m.min_frames, m.max_frames, m.min_pixels, m.video_max_pixels) == (4, 768, 100352, 602112)
    assert m.total_pixels == 90316800  # int(128000 * 28 * 28 * 0.9)
    assert (m.patch_size, m.merge_size, m.temporal_patch_size) == (14, 2, 2)


def test_evaluator_defaults_are_the_seeds_inference_recipe():
    e = with_training_recipe(EvalConfig())  # no model recording a training recipe: the seed's
    assert (e.num_frames, e.fps, e.max_pixels) == (8, 1.0, 151200)
    assert (e.max_new_tokens, e.temperature, e.top_p, e.top_k) == (512, 0.0, 1.0, 0)  # greedy
    assert e.template == "seed_mcq" and e.mode == "generate"
    assert "seed" in RULES  # the release's extraction rule stays available
    assert parse_config([]) == e  # the command line adds nothing of its own
    s = SamplingConfig()
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.num_samples) == (512, 0.0, 0, 1.0, 1)


def test_shipped_eval_config_is_the_seeds_recipe():
    e = parse_config(["--config", str(CONFIGS / "eval" / "egost-mcq.yaml")])
    assert (e.num_frames, e.fps, e.max_pixels, e.max_new_tokens, e.temperature) == (8, 1.0, 151200, 512, 0.0)
    assert (e.template, e.mode, e.dtype) == ("seed_mcq", "generate", "bfloat16")


def test_optimizer_defaults_are_the_sft_recipe():
    o = OptimConfig()
    assert (o.learning_rate, o.warmup_ratio, o.max_grad_norm) == (8e-5, 0.1, 0.3)
    # transformers' TrainingArguments defaults for what the recipe leaves unsaid
    assert (o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_epsilon) == (0.0, 0.9, 0.999, 1e-8)


def test_training_data_defaults_are_the_recipes_video():
    d = train_config.DataSection()
    assert (d.num_frames, d.fps, d.max_pixels) == (8, 1.0, 151200)
    lora = train_config.LoRASection()
    assert (lora.lora_alpha, lora.target_modules) == (8.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    t = train_config.TrainConfig()
    assert (t.num_train_epochs, t.loss_average) == (1, "token")


@pytest.mark.parametrize("name", RECIPE_SFT)
def test_7b_h100x4_configs_are_the_released_cold_start(name):
    cfg = train_config.load(CONFIGS / "sft" / name)
    raw = yaml.safe_load((CONFIGS / "sft" / name).read_text())
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 8.0, 0.1)
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    # 4-bit base: BitsAndBytesConfig(load_in_4bit, nf4, bnb_4bit_use_double_quant), every linear but lm_head
    assert (cfg.lora.quantize_base, cfg.lora.quantize_targets, cfg.lora.double_quant) == ("nf4", "all", True)
    assert (cfg.optim.learning_rate, cfg.optim.warmup_ratio, cfg.optim.max_grad_norm) == (8e-5, 0.1, 0.3)
    assert raw["optim"] == {"learning_rate": 8e-5, "warmup_ratio": 0.1, "max_grad_norm": 0.3}
    # 1 sample per GPU per micro-batch, 4 accumulated, 4 GPUs; 1 epoch
    assert (cfg.batch_size, cfg.micro_batch, cfg.gradient_accumulation_steps, cfg.mesh, cfg.num_train_epochs) == (
        16,
        4,
        4,
        "fsdp=4",
        1,
    )
    assert (cfg.model.param_dtype, cfg.model.compute_dtype) == ("bfloat16", "bfloat16")
    assert cfg.model.gradient_checkpointing != "none"  # gradient checkpointing
    assert (cfg.data.format, cfg.data.loss_rule) == ("st_r1", "release")
    assert (cfg.data.num_frames, cfg.data.fps, cfg.data.max_pixels) == (8, 1.0, 151200)
