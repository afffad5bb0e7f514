"""Qwen3-VL through the training stages: the SFT loss and gradients of a loader batch (per-sample vision
layout, a text-only row beside video and image rows) against transformers' loss and autograd, and GRPO on
the tiny model with LoRA over an nf4 base (prompts from the Qwen3-VL processor layout).

Tolerances: SFT loss 1e-5 relative, gradient norm 1e-4 relative, every gradient tensor 1e-3 of its
largest entry (fp32); GRPO log-probs 1e-4 absolute against a plain forward's log-softmax.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from reference import sample_inputs
from test_qwen3_vl import hf_positions, make_batch

from stjax.data.loader import LoaderConfig, pad_batch
from stjax.models.loading import load_pretrained, quantize_model
from stjax.models.weights import canonical_name, hf_tensors
from stjax.train.batch import host_batch
from stjax.train.step import loss_fn, split_trainable

PROMPTS = [[3, ("video", 2, 8, 8), 9], [2, ("image", 1, 4, 4), ("video", 3, 4, 8), 5], [11]]
LOADER = LoaderConfig(
    batch_size=3,
    token_buckets=(64, 128),
    patch_buckets=(0, 512),
    image_patch_buckets=(0, 64),
    videos_per_sample=1,
    images_per_sample=1,
)


def loader_items(cfg, ref):
    """Per-sample processor-style dicts, positions from transformers' get_rope_index, targets the last 6."""
    items = []
    for k, prompt in enumerate(PROMPTS):
        one = make_batch(cfg, [prompt], seed=k)
        one["position_ids"] = hf_positions(ref, cfg, one)
        empty = np.zeros((0, cfg.vision.patch_dim), np.float32)
        loss_mask = np.zeros_like(one["input_ids"][0])
        loss_mask[-6:] = 1
        items.append(
            {
                "input_ids": one["input_ids"][0],
                "attention_mask": one["attention_mask"][0],
                "loss_mask": loss_mask,
                "position_ids": one["position_ids"][:, 0],
                "pixel_values_videos": one.get("pixel_values_videos", empty),
                "video_grid_thw": one.get("video_grid_thw", np.zeros((0, 3), np.int64)),
                "second_per_grid_ts": np.zeros((len(one.get("video_grid_thw", ())),), np.float32),
                "pixel_values": one.get("pixel_values", empty),
                "image_grid_thw": one.get("image_grid_thw", np.zeros((0, 3), np.int64)),
            }
        )
    return items


@pytest.mark.parametrize("variant", ["preset", "tied_mqa_one_deepstack"])
def test_sft_loss_and_gradients_equal_transformers(hf_dirs, variant, tmp_path):
    """The tiny preset, and a variant with a tied output head (its gradient sums the embedding's and the head's)."""
    if variant == "preset":
        path, ref = hf_dirs("qwen3_vl")
    else:
        from reference import hf_model_from_dict
        from test_qwen3_vl_configs import VARIANTS, variant_config

        path, ref = tmp_path, hf_model_from_dict(variant_config(**VARIANTS[variant]), seed=1)
        ref.save_pretrained(path)
    model, cfg = load_pretrained(path)
    items = loader_items(cfg, ref)
    loader = pad_batch(items, LOADER, pad_id=0)
    inputs = jax.tree.map(lambda x: x[0], host_batch(cfg, [loader]).inputs)
    assert inputs.vision.patches.ndim == 3  # per-sample layout: (B, rows, patch_dim)

    cat = lambda key: np.concatenate([it[key] for it in items])
    kwargs = {
        "input_ids": loader["input_ids"].astype(np.int64),
        "attention_mask": loader["attention_mask"],
        "position_ids": loader["position_ids"],
        "pixel_values": cat("pixel_values"),
        "image_grid_thw": cat("image_grid_thw"),
        "pixel_values_videos": cat("pixel_values_videos"),
        "video_grid_thw": cat("video_grid_thw"),
        "labels": np.where(loader["loss_mask"] == 1, loader["input_ids"], -100).astype(np.int64),
    }
    ref.zero_grad()
    ref_loss = ref(**{k: torch.from_numpy(np.asarray(v)) for k, v in kwargs.items()}).loss
    ref_loss.backward()
    ref_grads = {canonical_name(n): p.grad.numpy() for n, p in ref.named_parameters()}

    graphdef, params, frozen = split_trainable(model)
    loss, grads = jax.value_and_grad(loss_fn, argnums=1)(
        graphdef, params, frozen, inputs, jax.numpy.asarray(loader["loss_mask"]), "token"
    )
    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(grads)).items()}
    ours = dict(hf_tensors(cfg, flat))
    assert ours.keys() == ref_grads.keys()
    norm = lambda g: float(np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g.values())))
    assert abs(norm(ours) - norm(ref_grads)) <= 1e-4 * norm(ref_grads)
    for name, g in ref_grads.items():
        assert np.abs(ours[name] - g).max() <= 1e-3 * max(np.abs(g).max(), 1e-12), name
    assert np.abs(ref_grads["visual.deepstack_merger_list.0.linear_fc2.weight"]).max() > 0  # DeepStack learns


@pytest.fixture(scope="module")
def grpo_assets(tmp_path_factory):
    from stjax.data.synthetic import generate as generate_benchmark
    from stjax.data.tokenizer import tiny_model_dir

    root = tmp_path_factory.mktemp("qwen3-grpo")
    data = generate_benchmark(root / "data", 1, seed=0, sheet=0)
    return data, tiny_model_dir(data / "tokenizer", root / "qwen3_vl", "qwen3_vl", seed=0)


def test_one_grpo_step_with_lora_over_nf4(grpo_assets):
    """Prompts from the Qwen3-VL processor layout; the sampler's completions; `batch_logps` (prompt once in a
    KV cache with DeepStack, completions after it) equals a plain forward's log-softmax; one update moves
    every adapter and nothing else."""
    import test_grpo as g

    from stjax.data import qwen3_vl
    from stjax.data.formats import read_plain_jsonl
    from stjax.data.processor import Processor
    from stjax.train.lora import with_lora
    from stjax.train.rl.learner import batch_logps, grpo_update
    from stjax.train.step import OptimConfig, init_state

    data, model_dir = grpo_assets
    base, cfg = load_pretrained(model_dir)
    model = with_lora(quantize_model(base, quantize_base="nf4"), rank=4, alpha=8.0, seed=1)
    assert model.config.quantize_base == "nf4"
    processor = Processor.from_pretrained(
        data / "tokenizer",
        media=qwen3_vl.media_config(num_frames=8, min_pixels=32 * 32 * 16, max_pixels=32 * 32 * 16),
        model_type="qwen3_vl",
    )
    samples = read_plain_jsonl(data / "plain.jsonl").samples[:2]
    items = [processor(s, "grpo") | {"sample_id": s.id} for s in samples]
    assert all(b"seconds>" in processor.tokenizer.decode(it["input_ids"]).encode() for it in items)
    batch = pad_batch(
        items,
        LoaderConfig(batch_size=2, token_buckets=(256, 512), patch_buckets=(256, 512, 1024), image_patch_buckets=(0,)),
        processor.tokenizer.pad_token_id,
    )
    out, _ = g.rollout(model, batch, processor)
    host = g.update_rows(model, batch, out)
    graphdef, params, frozen = split_trainable(model)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    logps = np.asarray(jax.jit(functools.partial(batch_logps, graphdef, settings=g.SETTINGS))(params, frozen, host))

    merged = nnx.merge(graphdef, params, frozen)
    inputs, columns = g.full_rows(merged, batch, out)
    logits = np.asarray(jax.jit(lambda m, x: m.forward(x))(merged, inputs), np.float64)
    want = g.token_logps(logits, np.asarray(inputs.input_ids), columns)
    mask = np.asarray(host.completion_mask[0]) == 1
    assert mask.any()
    np.testing.assert_allclose(logps[0][mask], want[mask], atol=1e-4)

    optim = OptimConfig(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    state = init_state(params, optim)
    step = jax.jit(functools.partial(grpo_update, graphdef, optim, g.SETTINGS))
    new, metrics = step(state, frozen, host.replace(ref_logp=jax.numpy.asarray(logps)))
    assert int(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))
    ]
    assert min(moved) > 0


def test_the_evaluator_runs_qwen3_vl_with_its_own_inputs(grpo_assets, tmp_path):
    """`evaluate` in logits mode on the tiny Qwen3-VL: each record's letter logits are those of a plain forward
    of the Qwen3-VL layout's arrays (timestamped frames, patches of 16) at the prompt's last position."""
    from stjax.eval.mcq import EvalConfig, evaluate, load_records, load_samples, make_runner
    from stjax.models.qwen_vl import compiled_forward

    data, model_dir = grpo_assets
    cfg = EvalConfig(
        model=str(model_dir),
        data=[str(data / "plain.jsonl")],
        out=str(tmp_path),
        mode="logits",
        batch_size=2,
        limit=3,
        text_only=False,
    )
    evaluate(cfg)
    records = {r["id"]: r for r in load_records(tmp_path / "predictions.jsonl")}
    assert len(records) == 3
    processor = make_runner(cfg).processor
    assert processor.model_type == "qwen3_vl" and processor.media.patch_size == 16
    model, config = load_pretrained(model_dir)
    letters = {k: processor.tokenizer.convert_tokens_to_ids(k) for k in "ABCD"}
    for _, sample in load_samples(cfg)[0]:
        arrays = processor(sample, "seed_mcq")
        assert "seconds>" in processor.tokenizer.decode(arrays["input_ids"])
        inputs = sample_inputs(config, arrays)
        logits = np.asarray(compiled_forward(model, inputs))[0, len(arrays["input_ids"]) - 1]
        scores = {k: logits[letters[k]] for k in "ABCD"[: len(sample.options)]}
        np.testing.assert_allclose(
            [records[sample.id]["logits"][k] for k in scores], list(scores.values()), rtol=1e-4, atol=1e-4
        )


RESUME_STEPS = 4


def interrupted_and_resumed(out, assets, stop_at: int | None, stage: str, **changes) -> dict[str, dict[int, float]]:
    """A Qwen3-VL run in this process on a 2 x 2 x 2 (data, fsdp, tensor) mesh, stopped by SIGTERM after step `stop_at`
    (None: not stopped) and then rerun to its end; its per-step metrics."""
    import signal

    from test_grpo_run import GRPO
    from test_train_run import losses, settings

    from stjax.train import config as train_config
    from stjax.train import loop, stages

    data, models = assets
    values = {
        **(GRPO if stage == "grpo" else {}),
        "max_steps": RESUME_STEPS,
        "checkpoint.save_steps": 3,
        "mesh": "data=2,fsdp=2,tensor=2",
        "batch_size": 4,
        "data.patch_buckets": "[1024]",  # Qwen3-VL's media rules give these clips 784 patches
        "stage": stage,
        **changes,
    }
    cfg = train_config.load(None, settings(out, (data, models["qwen3_vl"]), **values))
    if stop_at is not None:
        log = loop.MetricsLogger.log

        def log_then_stop(logger, step, metrics):
            log(logger, step, metrics)
            if step == stop_at:
                signal.raise_signal(signal.SIGTERM)  # the loop's handler: save, then exit

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(loop.MetricsLogger, "log", log_then_stop)
            with pytest.raises(SystemExit) as stopped:
                stages.train(cfg)
        assert stopped.value.code == loop.PREEMPTED_EXIT_CODE
        assert sorted(losses(out)) == list(range(1, stop_at + 1))
    stages.train(cfg)
    names = ("loss", "grad_norm") + (("reward", "completions/mean_length") if stage == "grpo" else ())
    return {name: losses(out, name) for name in names}


@pytest.mark.parametrize(
    "stage, changes",
    [
        ("sft", {}),
        (
            "grpo",
            {
                "lora.r": 4,
                "lora.lora_alpha": 8.0,
                "grpo.reward_funcs": "[test_grpo_rewards.distinct_characters]",
                "mesh": "fsdp=2,tensor=4",  # whole groups per fsdp shard
            },
        ),
    ],
    ids=["sft", "grpo_lora"],
)
def test_a_stopped_sharded_run_resumes_to_the_uninterrupted_runs_metrics_bit_for_bit(
    synthetic_assets, tmp_path, stage, changes
):
    """SIGTERM after step 2 (before the periodic save at 3): the rerun restores the checkpoint SIGTERM wrote, and
    steps 3, 4 repeat the uninterrupted run's losses and gradient norms (GRPO: rewards, completion lengths) bit for
    bit. Three runs in this process (~35 s each, mostly compiling): the Qwen2-VL equivalents run as subprocesses
    (tests/test_train_run.py, tests/test_grpo_run.py)."""
    whole = interrupted_and_resumed(tmp_path / "whole", synthetic_assets, None, stage, **changes)
    resumed = interrupted_and_resumed(tmp_path / "resumed", synthetic_assets, 2, stage, **changes)
    assert sorted(whole["loss"]) == list(range(1, RESUME_STEPS + 1))
    assert resumed == whole
    if stage == "grpo":
        assert min(whole["reward"].values()) > 0  # the rewards tell completions apart: the policy term is not 0
