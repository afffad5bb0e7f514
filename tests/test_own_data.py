"""The README's own-data example, run as written with a tiny model and a few steps: its JSONL rows (task names
Ego-ST does not have, a field of their own that the README's reward by file reads), its SFT -> GRPO -> evaluation
commands with stdout piped as in a batch job (plain metric lines), the export's training recipe used by the
evaluator, and the export read by transformers' own loaders and model (AutoProcessor's files; transformers' forward
on stjax's processed batch equals stjax's logits)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from reference import sample_inputs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
pytestmark = pytest.mark.slow  # two short training runs and an evaluation (about 3 minutes on 2 cores)


def readme_block(after: str, language: str) -> str:
    """The first ```language block after the text `after` in the README."""
    start = README.index(after)
    return re.search(rf"```{language}\n(.*?)```", README[start:], re.S).group(1)


def tiny_config(source: str, out: Path, **changes) -> Path:
    """A shipped tiny config with a few steps, so the README's commands run in a test."""
    values = yaml.safe_load((ROOT / source).read_text()) | changes
    out.write_text(yaml.safe_dump(values))
    return out


@pytest.fixture(scope="module")
def own_run(synthetic_assets, tmp_path_factory):
    """The README's block run in a folder holding its my_data/ (its rows; synthetic videos under their names)."""
    data, models = synthetic_assets
    root = tmp_path_factory.mktemp("own-data")
    rows = [json.loads(line) for line in readme_block("**Plain JSONL**", "json").splitlines() if line.strip()]
    for row, walk in zip(rows, sorted((data / "synth").glob("*.mp4"))):
        (root / "my_data" / row["video"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(walk, root / "my_data" / row["video"])
    for name in ("train.jsonl", "test.jsonl"):
        (root / "my_data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "my_rewards.py").write_text(readme_block("here `my_rewards.py`", "python"))
    sft = tiny_config(
        "configs/sft/tiny-cpu.yaml", root / "sft.yaml", max_steps=2, logging_steps=1, checkpoint={"save_steps": 0}
    )
    grpo = tiny_config(
        "configs/grpo/tiny-cpu.yaml",
        root / "grpo.yaml",
        max_steps=1,
        batch_size=8,
        grpo={
            "num_generations": 4,
            "max_completion_length": 8,
            "log_completions_steps": 1,
            "num_completions_to_print": 8,
        },
        checkpoint={"save_steps": 0},
    )
    block = readme_block("SFT, then GRPO with that reward, then evaluation on your data", "bash")
    assignments = {"MODEL": models["qwen2_5_vl"], "SFT": sft, "GRPO": grpo}
    lines = block.splitlines()
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0]
        if name in assignments:
            lines[i] = f"{name}={assignments[name]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    (root / "stdout.txt").write_text(result.stdout)
    return root, result.stdout, rows


def test_the_readme_own_data_example_trains_and_evaluates_with_its_own_tasks(own_run):
    root, _, rows = own_run
    accuracy = json.loads((root / "runs/my-eval/accuracy.json").read_text())
    assert {task: t["n"] for task, t in accuracy["by_task"].items()} == {"motion": 1, "counting": 1}
    assert accuracy["by_direction"] == {} and accuracy["skipped_records"] == {"test.jsonl": {}}
    predictions = [json.loads(line) for line in (root / "runs/my-eval/predictions.jsonl").read_text().splitlines()]
    assert sorted(p["gold"] for p in predictions) == sorted(r["solution"][-10] for r in rows)  # <answer>X</answer>
    assert not any("error" in p for p in predictions)


def test_a_piped_run_prints_plain_metric_lines_named_by_stage(own_run):
    _, stdout, _ = own_run
    assert re.search(r"^sft step 1/2 .*\bloss=\S+ .*eta=\?$", stdout, re.M)
    assert re.search(r"^sft step 2/2 .*\bloss=\S+ .*eta=0:00:00$", stdout, re.M)
    assert re.search(r"^grpo step 1/1 .*\breward=\S+", stdout, re.M)
    assert "\r" not in stdout  # no progress bar redrawn into the log


def test_the_readme_reward_reads_a_field_of_the_users_rows(own_run):
    """The README's reward by file reads `difficulty`, a field of the rows no reader knows: each completion of
    the GRPO step (both rows, 4 each) is scored as the function's formula gives for its row's difficulty (to
    1e-9), and the scores are nonzero and differ."""
    root, _, rows = own_run
    logged = [json.loads(line) for line in (root / "runs/my-grpo/completions.jsonl").read_text().splitlines()]
    difficulty = {f"train:{i}": row["difficulty"] for i, row in enumerate(rows, start=1)}
    assert len(logged) == 8 and {c["prompt_id"] for c in logged} == set(difficulty)
    got = [c["rewards"]["my_rewards.py:thinks_enough"] for c in logged]
    expected = [min(1.0, len(c["completion"].split()) / (10 * difficulty[c["prompt_id"]])) for c in logged]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert len(set(got)) > 1 and max(got) > 0


def test_the_evaluator_uses_the_exports_training_recipe(own_run):
    """The GRPO export records the tiny config's prompt template (problem) and 112 x 112 frames; the evaluator
    takes them unless told otherwise, and says so."""
    from stjax.eval.mcq import parse_config

    root, stdout, _ = own_run
    recipe = json.loads((root / "runs/my-grpo/hf/stjax_training.json").read_text())
    assert recipe == {
        "stage": "grpo",
        "template": "problem",
        "num_frames": 8,
        "fps": 1.0,
        "max_pixels": 12544,
        "second_per_grid": "seed",
    }
    assert json.loads((root / "runs/my-sft/hf/stjax_training.json").read_text())["template"] == "problem"  # sft's
    assert (
        "evaluating with the model's training recipe (stjax_training.json, grpo stage): template='problem', "
        "num_frames=8, fps=1.0, max_pixels=12544, second_per_grid='seed'"
    ) in stdout
    settings = json.loads((root / "runs/my-eval/run.json").read_text())
    assert (settings["template"], settings["max_pixels"]) == ("problem", 12544)
    told = parse_config(["--model", str(root / "runs/my-grpo/hf"), "--template", "seed_mcq", "--max-pixels", "50176"])
    assert (told.template, told.max_pixels, told.num_frames) == ("seed_mcq", 50176, 8)


def test_transformers_loads_the_exports_processor_files(own_run):
    """transformers' own loaders read each file of the export's processor. AutoProcessor as a whole also needs
    torchvision for Qwen-VL's video processor (transformers 5), which this project does not install: there the
    full load is checked too."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor

    export = own_run[0] / "runs/my-sft/hf"
    image = AutoImageProcessor.from_pretrained(export)
    assert type(image).__name__.startswith("Qwen2VLImageProcessor")
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (14, 2, 2)
    np.testing.assert_allclose(image.image_mean, [0.48145466, 0.4578275, 0.40821073])
    video, _ = BaseVideoProcessor.get_video_processor_dict(str(export))
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and video["merge_size"] == 2
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert (export / "chat_template.jinja").read_text() == tokenizer.chat_template
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(export)
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False
    ) == tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)


def test_transformers_forward_on_stjax_processed_batch_equals_stjax(own_run):
    """The export loaded by transformers and fed the batch stjax's Processor made (every array its forward
    takes) gives stjax's logits (float32 both, different op order: 1e-4). Left to build the positions itself
    from mm_token_type_ids, transformers agrees through the video; after a video whose time positions outrun
    its height and width (here 4 temporal patches 2 s apart: time positions 0-12 on a 4 x 4 merged grid)
    transformers 5 moves on by the grid's size, the original Qwen rule (stjax's, transformers 4.49) past the
    largest position, so there the text's positions differ."""
    import inspect

    import torch
    from transformers import AutoModelForImageTextToText

    from stjax.data.formats import read_plain_jsonl
    from stjax.data.processor import Processor
    from stjax.data.video import MediaConfig
    from stjax.models.loading import load_pretrained
    from stjax.models.qwen_vl import compiled_forward

    root = own_run[0]
    export = root / "runs/my-sft/hf"
    model, config = load_pretrained(export)
    processor = Processor.from_pretrained(
        export, media=MediaConfig(max_pixels=12544), tokens_per_second=config.rope_spec().tokens_per_second
    )
    sample = read_plain_jsonl(root / "my_data/test.jsonl").samples[0]
    arrays = processor(sample, "problem")
    inputs = sample_inputs(config, arrays)
    ours = np.asarray(compiled_forward(model, inputs))[0, : len(arrays["input_ids"])]

    reference = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32).eval()
    accepted = inspect.signature(reference.forward).parameters
    batch_axis = {"input_ids": 0, "attention_mask": 0, "mm_token_type_ids": 0, "position_ids": 1}
    batch = {
        k: torch.from_numpy(np.expand_dims(v, batch_axis[k]) if k in batch_axis else v)
        for k, v in arrays.items()
        if k in accepted and np.size(v)
    }
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "position_ids",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    }

    def logits(**kwargs) -> np.ndarray:
        reference.model.rope_deltas = None
        with torch.no_grad():
            return reference(**kwargs).logits[0].numpy()

    np.testing.assert_allclose(ours, logits(**batch), rtol=1e-4, atol=1e-4)
    batch.pop("position_ids")
    through_video = np.flatnonzero(arrays["input_ids"] == config.video_token_id)[-1] + 1
    np.testing.assert_allclose(ours[:through_video], logits(**batch)[:through_video], rtol=1e-4, atol=1e-4)
