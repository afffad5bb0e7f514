"""GRPO on tiny models: the log-probs the loss uses, the LoRA reference, the rollout's placement,
and the update step.

The update batch is built as the stage builds it (`prompt_inputs` for the sampler, then
`update_batch`: each prompt once, its completions beside it), from loader batches of a small
synthetic set with 8-frame videos, for both architectures. The reference for the log-probs is a
plain forward of each prompt with its completion written after it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stjax.data.formats import read_plain_jsonl
from stjax.data.loader import LoaderConfig, pad_batch
from stjax.data.processor import Processor
from stjax.data.video import MediaConfig
from stjax.models.loading import load_pretrained
from stjax.sampling.sampler import SamplingConfig, generate
from stjax.sharding import make_mesh, parse_mesh, shard_model
from stjax.train import config as train_config
from stjax.train.batch import micro_batch_inputs, step_shapes
from stjax.train.grpo import GRPO
from stjax.train.loop import stage_context
from stjax.train.lora import with_lora
from stjax.train.rl.learner import LossSettings, batch_logps, grpo_update, update_batch
from stjax.train.rl.rollout import Rollout, prompt_inputs
from stjax.train.step import OptimConfig, init_state, split_trainable

G, T = 2, 6  # completions per prompt, completion tokens
MEDIA = MediaConfig(max_pixels=12544)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from stjax.data.synthetic import generate as generate_benchmark
    from stjax.data.tokenizer import tiny_model_dir

    root = tmp_path_factory.mktemp("grpo-assets")
    data = generate_benchmark(root / "data", 1, seed=0, sheet=0)
    models = {
        arch: tiny_model_dir(data / "tokenizer", root / arch, arch, seed=0) for arch in ("qwen2_vl", "qwen2_5_vl")
    }
    return data, models


def prompts(data, model_cfg, count: int = 2) -> tuple[dict, Processor]:
    """A loader batch of `count` GRPO prompts with their videos (right-padded, as the loader gives)."""
    processor = Processor.from_pretrained(
        data / "tokenizer", media=MEDIA, tokens_per_second=(model_cfg.rope_spec().tokens_per_second)
    )
    samples = read_plain_jsonl(data / "plain.jsonl").samples[:count]
    items = [processor(s, "grpo") | {"sample_id": s.id} for s in samples]
    cfg = LoaderConfig(batch_size=count, token_buckets=(256, 512), patch_buckets=(256, 512), image_patch_buckets=(0,))
    return pad_batch(items, cfg, processor.tokenizer.pad_token_id), processor


def without_ids(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "sample_id"}


def rollout(model, batch: dict, processor: Processor, temperature: float = 1.0, key: int = 0):
    """The stage's rollout without the mesh: its left-padded prompts through `generate`."""
    inputs, _ = prompt_inputs(model.config, without_ids(batch))
    eos = tuple(processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    out = generate(
        model,
        inputs,
        inputs.input_ids.shape[1],
        jax.random.key(key),
        SamplingConfig(
            max_new_tokens=T,
            temperature=temperature,
            num_samples=G,
            eos_ids=eos,
            pad_id=processor.tokenizer.pad_token_id,
            suppress_ids=(model.config.image_token_id, model.config.video_token_id),
        ),
    )
    return out, eos


def update_rows(model, batch: dict, out, accumulation: int = 1, shards: int = 1):
    inputs, starts = prompt_inputs(model.config, without_ids(batch))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    mask = np.arange(T) < lengths[:, None]
    advantages = np.linspace(-1, 1, len(mask)).astype(np.float32)
    return update_batch(inputs, starts, tokens, lengths, mask, advantages, G, accumulation, shards)


def full_rows(model, batch: dict, out) -> tuple:
    """The plain layout: each loader row (right-padded) repeated G times with its completion written
    after its prompt, at the positions the sampler gave it (after the prompt's largest), as
    `ModelInputs`; and (rows, T) the column of each completion token."""
    rows = {k: np.repeat(v, G, axis=1 if k == "position_ids" else 0) for k, v in without_ids(batch).items()}
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    n, length = rows["input_ids"].shape
    pad = lambda x, value=0: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, T)], constant_values=value)
    ids, attention, positions = pad(rows["input_ids"]), pad(rows["attention_mask"]), pad(rows["position_ids"], 1)
    prompt = rows["attention_mask"].sum(axis=1)
    for r in range(n):
        first = positions[:, r, : prompt[r]].max() + 1
        for j in range(lengths[r]):
            ids[r, prompt[r] + j], attention[r, prompt[r] + j] = tokens[r, j], 1
            positions[:, r, prompt[r] + j] = first + j
    rows.update(input_ids=ids, attention_mask=attention, position_ids=positions, loss_mask=np.zeros_like(ids))
    _, _, sizes = step_shapes(model.config, [rows])
    inputs, _ = micro_batch_inputs(model.config, rows, length + T, sizes)
    return inputs, prompt[:, None] + np.arange(T)


def token_logps(logits: np.ndarray, input_ids: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(rows, T) the log-softmax of a plain forward's `logits` (NumPy) at each completion token, whose
    column in the rows is `columns`: the logits one column before it."""
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.take_along_axis(input_ids, columns, axis=1)
    return np.take_along_axis(np.take_along_axis(logp, columns[..., None] - 1, axis=1), targets[..., None], -1)[..., 0]


SETTINGS = LossSettings(
    loss_type="grpo",
    beta=0.1,
    epsilon_low=0.2,
    epsilon_high=0.2,
    importance_sampling_level="token",
    max_completion_length=T,
    temperature=1.0,
    chunk=4,
)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_old_logps_equal_a_full_forwards_log_softmax_and_the_samplers(assets, arch):
    """`batch_logps` (each prompt once, its completions after it in a shared KV cache, logits 4
    positions at a time) equals the log-softmax of a plain forward of each prompt + completion row
    at each completion token (fp32, 1e-4), and the sampler's `logp_model` of the same tokens; at
    temperature 0.7, the log-softmax of the logits / 0.7."""
    data, dirs = assets
    model, _ = load_pretrained(dirs[arch])
    batch, processor = prompts(data, model.config)
    out, _ = rollout(model, batch, processor)
    host = update_rows(model, batch, out)
    assert host.inputs.input_ids.shape[1] == 2 and host.completions.shape[1] == 2 * G  # each prompt once
    graphdef, params, frozen = split_trainable(model)
    got = np.asarray(jax.jit(functools.partial(batch_logps, graphdef, settings=SETTINGS))(params, frozen, host))[0]

    inputs, columns = full_rows(model, batch, out)
    logits = np.asarray(jax.jit(lambda m, x: m.forward(x))(model, inputs), np.float64)
    want = token_logps(logits, np.asarray(inputs.input_ids), columns)
    targets = np.take_along_axis(np.asarray(inputs.input_ids), columns, axis=1)
    mask = np.asarray(host.completion_mask[0]) == 1
    assert mask.sum() >= len(mask)  # every completion has tokens
    np.testing.assert_array_equal(targets[mask], np.asarray(out.tokens)[mask])  # the rows hold the completions
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4)
    np.testing.assert_allclose(got[mask], np.asarray(out.logp_model)[mask], atol=1e-4)
    # at temperature 0.7: TRL's log-probs of logits / 0.7
    warm = LossSettings(**{**SETTINGS.__dict__, "temperature": 0.7})
    got = np.asarray(jax.jit(functools.partial(batch_logps, graphdef, settings=warm))(params, frozen, host))[0]
    want = token_logps(logits / 0.7, np.asarray(inputs.input_ids), columns)
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4)


def test_the_lora_reference_is_the_base_and_only_the_adapters_change(assets):
    data, dirs = assets
    base, _ = load_pretrained(dirs["qwen2_vl"])
    batch, processor = prompts(data, base.config)
    out, _ = rollout(base, batch, processor)
    host = update_rows(base, batch, out)
    model = with_lora(base, rank=4, alpha=8.0, seed=1)
    graphdef, params, frozen = split_trainable(model)
    # adapters that change the output, as after some training
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)
    logps = jax.jit(functools.partial(batch_logps, graphdef, settings=SETTINGS))
    off = logps(jax.tree.map(jnp.zeros_like, params), frozen, host)  # the stage's reference: adapters off
    base_graphdef, base_params, base_frozen = split_trainable(base)
    want = jax.jit(functools.partial(batch_logps, base_graphdef, settings=SETTINGS))(base_params, base_frozen, host)
    np.testing.assert_allclose(np.asarray(off), np.asarray(want), atol=1e-6)
    assert np.abs(np.asarray(logps(params, frozen, host)) - np.asarray(want)).max() > 1e-3  # adapters on differ

    optim = OptimConfig(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    state = init_state(params, optim)
    step = jax.jit(functools.partial(grpo_update, graphdef, optim, SETTINGS))
    new, metrics = step(state, frozen, host.replace(ref_logp=off))
    assert int(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))
    ]
    assert min(moved) > 0  # every adapter moved; the frozen base is not part of the state at all
    paths = [
        tuple(getattr(k, "key", k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(new.params))[0]
    ]
    assert paths and all(p[-1] in ("lora_a", "lora_b") for p in paths)


def test_accumulated_micro_batches_give_the_whole_batchs_update(assets):
    """Completions of unequal lengths split into 2 micro-batches (a group each) and 4 (half a group
    each, its prompt copied into both), and over 4 devices: the same loss and gradient norm as one
    batch (1e-5), for the step-wide normalisers (dapo: tokens, grpo: sequences)."""
    data, dirs = assets
    model, _ = load_pretrained(dirs["qwen2_vl"])
    batch, processor = prompts(data, model.config)
    out, _ = rollout(model, batch, processor, key=3)
    out = out.replace(lengths=jnp.array([T, 2, 4, 1]))  # as if EOS came early in three of them
    graphdef, params, frozen = split_trainable(model)
    optim = OptimConfig(learning_rate=1e-3, total_steps=4, warmup_ratio=0.0, max_grad_norm=1e3)
    for loss_type in ("dapo", "grpo"):
        settings = LossSettings(**{**SETTINGS.__dict__, "loss_type": loss_type, "beta": 0.0})
        step = jax.jit(functools.partial(grpo_update, graphdef, optim, settings))
        splits = {(1, 1): 2, (2, 1): 1, (4, 1): 1, (1, 4): 4}  # (accumulation, devices): prompt copies each
        results = []
        for (accumulation, shards), copies in splits.items():
            host = update_rows(model, batch, out, accumulation, shards)
            assert host.inputs.input_ids.shape[:2] == (accumulation, copies)
            results.append(step(init_state(params, optim), frozen, host)[1])
        for result in results[1:]:
            for name in ("loss", "grad_norm"):
                np.testing.assert_allclose(float(result[name]), float(results[0][name]), rtol=1e-5, err_msg=name)


def test_two_rollout_placements_give_the_same_completions(assets, tmp_path):
    """The weights trained under fsdp=8 are resharded (`jax.device_put`) onto a data=2,tensor=4
    rollout mesh each step; both placements sample the same tokens with the same key."""
    data, dirs = assets
    model, _ = load_pretrained(dirs["qwen2_vl"])
    batch, processor = prompts(data, model.config, count=8)
    tokens = {}
    eos = tuple(processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    sampling = SamplingConfig(
        max_new_tokens=T,
        temperature=1.0,
        num_samples=G,
        eos_ids=eos,
        pad_id=processor.tokenizer.pad_token_id,
        suppress_ids=(model.config.image_token_id, model.config.video_token_id),
    )
    for rollout_mesh in ("", "data=2,tensor=4"):
        mesh = make_mesh({"fsdp": 8})
        placed = shard_model(model, mesh)
        graphdef, params, frozen = split_trainable(placed)
        rollout = Rollout(
            placed,
            graphdef,
            frozen,
            sampling,
            SETTINGS,
            mesh,
            make_mesh(parse_mesh(rollout_mesh)) if rollout_mesh else None,
        )
        state = init_state(params, OptimConfig())
        weights = rollout.weights(state.params)
        if rollout_mesh:
            assert jax.tree.leaves(weights)[0].sharding.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4}
        completions = rollout.generate(state, *prompt_inputs(model.config, without_ids(batch)), batch["sample_id"], 0)
        tokens[rollout_mesh] = dataclasses.astuple(completions)
    for a, b in zip(tokens[""], tokens["data=2,tensor=4"]):
        np.testing.assert_array_equal(a, b) if a.dtype.kind == "i" else np.testing.assert_allclose(a, b, atol=1e-4)


def test_every_loss_type_through_the_update_equals_trls_per_micro_batch_loss(assets):
    """`grpo_update` for each loss type at temperature 0.7 with old and reference log-probs (ratios
    outside the clip range), the batch as 2 micro-batches of unequal token counts (and bnpo's, whose
    micro-batches each normalise by their own tokens, also as one): the loss is the sum of TRL's
    per-micro-batch losses (`_compute_loss` in training, transcribed in torch) of the update's
    log-probs, the gradient norm is that of TRL's gradient carried back through them, and the kl, the
    clip ratios and the entropy are the mean of TRL's per micro-batch (1e-5 relative; the entropy 1e-4). One
    compile per case: the loss types share one test."""
    import torch
    from test_grpo_loss import LOSS_TYPES, trl_loss

    data, dirs = assets
    model, _ = load_pretrained(dirs["qwen2_vl"])
    batch, processor = prompts(data, model.config)
    out, _ = rollout(model, batch, processor, key=3)
    out = out.replace(lengths=jnp.array([T, 2, 4, 1]))  # micro-batches of 8 and 5 tokens
    graphdef, params, frozen = split_trainable(model)
    optim = OptimConfig(learning_rate=1e-3, total_steps=4, warmup_ratio=0.0, max_grad_norm=1e3)
    settings = LossSettings(**{**SETTINGS.__dict__, "temperature": 0.7})
    logps = lambda p, host: batch_logps(graphdef, p, frozen, host, settings=settings)
    pullback = jax.jit(lambda p, host, g: jax.vjp(lambda q: logps(q, host), p)[1](g)[0])
    rng = np.random.default_rng(0)
    for accumulation, loss_types in ((2, LOSS_TYPES), (1, ["bnpo"])):
        host = update_rows(model, batch, out, accumulation)
        logp = np.asarray(jax.jit(logps)(params, host))
        old = logp + rng.normal(0, 0.3, logp.shape).astype(np.float32)
        ref = logp + rng.normal(0, 0.5, logp.shape).astype(np.float32)
        host = host.replace(old_logp=jnp.asarray(old), ref_logp=jnp.asarray(ref))
        mask = torch.tensor(np.asarray(host.completion_mask))
        for loss_type in loss_types:
            high = 5.0 if loss_type == "cispo" else 0.28  # CISPO's epsilon_high caps the ratio itself
            loss_settings = LossSettings(**{**settings.__dict__, "loss_type": loss_type, "epsilon_high": high})
            _, metrics = jax.jit(functools.partial(grpo_update, graphdef, optim, loss_settings))(
                init_state(params, optim), frozen, host
            )
            x = torch.tensor(logp, requires_grad=True)
            trl = [
                trl_loss(
                    x[m],
                    torch.tensor(old[m]),
                    torch.tensor(ref[m]),
                    torch.tensor(np.asarray(host.advantages[m])),
                    mask[m],
                    loss_type=loss_type,
                    beta=settings.beta,
                    epsilon_low=settings.epsilon_low,
                    epsilon_high=high,
                    importance_sampling_level="token",
                    max_completion_length=T,
                    accumulation=accumulation,
                    num_items_in_batch=mask.sum(),
                )
                for m in range(accumulation)
            ]
            want = sum(loss for loss, _ in trl)
            want.backward()
            grads = pullback(params, host, jnp.asarray(x.grad.numpy()))
            want_norm = float(jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads))))
            message = f"{loss_type}, accumulation {accumulation}"
            assert int(metrics["skipped"]) == 0 and want_norm > 0, message
            if accumulation == 2:  # the entropy is the same for every loss type
                entropy_metric, micro_masks = float(metrics["entropy"]), np.asarray(host.completion_mask)
            np.testing.assert_allclose(float(metrics["loss"]), want.item(), rtol=1e-5, err_msg=message)
            np.testing.assert_allclose(float(metrics["grad_norm"]), want_norm, rtol=1e-5, err_msg=message)
            for name in trl[0][1]:  # TRL logs each micro-batch's kl and clip ratios; a step logs their mean
                np.testing.assert_allclose(
                    float(metrics[name]),
                    np.mean([m[name].item() for _, m in trl]),
                    rtol=1e-5,
                    atol=1e-7,
                    err_msg=f"{message}: {name}",
                )
    # TRL's entropy: of softmax(logits / temperature) at each completion token (its fused LM head; here torch's
    # Categorical on a plain forward's logits), each micro-batch's masked mean, a step the mean of those (1e-4)
    inputs, columns = full_rows(model, batch, out)
    logits = torch.tensor(np.asarray(jax.jit(lambda m, x: m.forward(x))(model, inputs), np.float64))
    predicting = torch.take_along_dim(logits, torch.tensor(columns - 1)[..., None], dim=1) / settings.temperature
    entropy = np.split(torch.distributions.Categorical(logits=predicting).entropy().numpy(), 2)
    mask = np.split(micro_masks.reshape(len(columns), T), 2)  # the micro-batches hold consecutive rows
    assert [m.sum() for m in mask] == [8, 5]
    trl_entropy = np.mean([(e * m).sum() / m.sum() for e, m in zip(entropy, mask)])
    np.testing.assert_allclose(entropy_metric, trl_entropy, rtol=1e-4)


def test_the_stages_step_hands_the_update_what_the_options_ask(assets, tmp_path, monkeypatch):
    """Two steps of the stage on the same two prompts (full fine-tuning, beta 0.1, num_iterations 2,
    temperature 0.7, top_k 20, top_p 0.9, rewards weighted [2, 0.5, 0], accuracy_rule default), the
    update and the sampler watched:
    - old log-probs are the policy's before the step, reference ones the loaded model's (they differ
      at step 2, and the update's KL is > 0);
    - the completion mask covers each completion up to its EOS, not the token after (three of the
      sampler's rows made to end early);
    - the advantages are TRL's group advantages of 2 x distinct_characters + 0.5 x format, both
      scored here from the decoded completions (1e-5), and not all zero;
    - the sampler gets top_k, top_p and the temperature, and new keys at the second step."""
    import torch
    from test_grpo_loss import trl_advantages
    from test_grpo_rewards import distinct_characters

    from stjax.train.rewards import format_reward
    from stjax.train.rl import rollout as rollout_lib

    data, dirs = assets
    model, _ = load_pretrained(dirs["qwen2_vl"])
    batch, processor = prompts(data, model.config)
    cfg = train_config.load(
        None,
        [
            "grpo.num_generations=2",
            "grpo.max_completion_length=6",
            "batch_size=4",
            "grpo.beta=0.1",
            "grpo.num_iterations=2",
            "grpo.temperature=0.7",
            "grpo.top_k=20",
            "grpo.top_p=0.9",
            "grpo.reward_funcs=[test_grpo_rewards.distinct_characters, format, accuracy]",
            "grpo.reward_weights=[2.0, 0.5, 0.0]",
            "grpo.accuracy_rule=default",
            "optim.learning_rate=1e-2",
        ],
        stage="grpo",
    )
    mesh = make_mesh({"fsdp": 2}, jax.devices()[:2])
    placed = shard_model(model, mesh)
    graphdef, params, frozen = split_trainable(placed)
    optim = OptimConfig(learning_rate=1e-2, total_steps=4, warmup_ratio=0.0)
    samples = read_plain_jsonl(data / "plain.jsonl").samples
    context, state = stage_context(cfg, mesh, placed, processor, samples, tmp_path, optim)
    stage = GRPO(context, placed, state)
    # accuracy_rule: default, from the config: the evaluator's extractor credits what the release's rule does not
    assert stage.reward_funcs[2](
        completions=["<answer>the answer is (B)</answer>"], answer=["B"], options=[["A. x", "B. y"]]
    ) == [1.0]

    seen, sampled = [], []
    update_fn, sample_fn = stage.learner.update_fn, rollout_lib.sample
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # the update donates the state
    stage.learner.update_fn = lambda state, frozen, batch: (
        seen.append((copy(state.params), batch)),
        update_fn(state, frozen, batch),
    )[1]
    eos = processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    def sample(graphdef, cfg, weights, inputs, last, start, keys):
        """The sampler, watched; three of its four rows end early with EOS (a random model rarely does)."""
        sampled.append((cfg, np.asarray(jax.random.key_data(keys))))
        out = sample_fn(graphdef, cfg, weights, inputs, last, start, keys)
        lengths = jnp.array([6, 2, 4, 1])
        tokens = jnp.where(jnp.arange(6) < lengths[:, None], out.tokens, cfg.pad_id)
        tokens = tokens.at[jnp.arange(1, 4), lengths[1:] - 1].set(eos[0])
        return out.replace(tokens=tokens, lengths=lengths)

    monkeypatch.setattr(rollout_lib, "sample", sample)
    logps = jax.jit(functools.partial(batch_logps, graphdef, settings=LossSettings.of(cfg)))
    initial = copy(params)
    for step in range(2):
        state, metrics = stage.step(state, iter([dict(batch)]), step)
    assert metrics["kl"] > 0 and metrics["skipped"] == 0

    (before_2, batch_2) = seen[2]  # step 2's first update
    np.testing.assert_allclose(np.asarray(batch_2.old_logp), np.asarray(logps(before_2, frozen, batch_2)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(batch_2.ref_logp), np.asarray(logps(initial, frozen, batch_2)), atol=1e-5)
    mask = np.asarray(batch_2.completion_mask[0]) == 1
    assert np.abs(np.asarray(batch_2.old_logp - batch_2.ref_logp)[0][mask]).max() > 1e-3

    tokens, lengths = np.asarray(batch_2.completions[0]), np.asarray(batch_2.lengths[0])
    np.testing.assert_array_equal(mask, np.arange(tokens.shape[1]) < lengths[:, None])
    assert lengths.tolist() == [6, 2, 4, 1]
    for row, n in zip(tokens, lengths):  # an ended completion's last counted token is its EOS
        assert n == tokens.shape[1] or row[n - 1] in eos
    texts = [processor.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens, lengths)]
    total = 2.0 * np.asarray(distinct_characters(texts)) + 0.5 * np.asarray(format_reward(texts))
    want = trl_advantages(torch.tensor(total, dtype=torch.float32), 2, "group").numpy()
    np.testing.assert_allclose(np.asarray(batch_2.advantages[0]), want, atol=1e-5)
    assert np.abs(want).max() > 0.5

    (cfg_1, keys_1), (cfg_2, keys_2) = sampled
    assert (cfg_1.top_k, cfg_1.top_p, cfg_1.temperature) == (20, 0.9, 0.7)
    assert not np.any(np.all(keys_1 == keys_2, axis=-1))  # the same prompts, other keys at the next step
