"""A jitted sampler: prefill (vision tower included) and a `lax.while_loop` decode in one compiled
program over a preallocated KV cache.

    out = generate(model, inputs, prompt_length, jax.random.key(0), SamplingConfig(max_new_tokens=64))

`inputs` is a `ModelInputs` whose prompts are left-padded to `prompt_length` (the bucket padding
that `prepare_inputs` adds on the right is skipped over). `num_samples` completions per prompt share
one prefill: the cache is broadcast, not recomputed. Generated token k of a row takes M-RoPE
position `max(prompt positions) + 1 + k` on all three streams, the original Qwen rule.
Weights are an argument of the compiled program, so new weights never recompile it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from stjax.models.inputs import ModelInputs, cast_floats
from stjax.models.text import KVCache
from stjax.sharding import constrain_batch


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no nucleus cut
    num_samples: int = 1  # completions per prompt (GRPO's G)
    eos_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()  # never sampled (e.g. the image / video pad tokens)
    pad_id: int = 0  # written after a row's end; `lengths` says where each row ends


@struct.dataclass
class SampleOutput:
    tokens: jax.Array  # (B * num_samples, max_new_tokens); rows of a prompt are consecutive
    lengths: jax.Array  # (B * num_samples,) generated tokens, the EOS included
    logp_sampling: jax.Array  # log-prob of each token under the sampling distribution (0 for greedy)
    logp_model: jax.Array  # log-prob of each token under the raw model (log_softmax of the logits)


def sampling_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Logits of the sampling distribution: temperature, then top-k, then top-p (nucleus)."""
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < cfg.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def choose(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next tokens (B,) drawn with one key per row, and their log-probs under the sampling
    distribution and the raw model."""
    model_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if cfg.suppress_ids:
        logits = logits.at[:, jnp.asarray(cfg.suppress_ids)].set(-jnp.inf)
    if cfg.temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
        sampling_logp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        scaled = sampling_logits(logits, cfg)
        tokens = jax.vmap(jax.random.categorical)(keys, scaled)
        sampling_logp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, sampling_logp, jnp.take_along_axis(model_logp, tokens[:, None], axis=-1)[:, 0]


@struct.dataclass
class _Loop:
    step: jax.Array
    cache: KVCache
    logits: jax.Array  # (B, V) for the next token
    next_position: jax.Array  # (B,) M-RoPE position of the next token
    finished: jax.Array
    out: SampleOutput


def next_positions(attention_mask: np.ndarray, position_ids: np.ndarray, prompt_length: int) -> np.ndarray:
    """(B,) M-RoPE position of each left-padded prompt's first generated token: its largest position + 1."""
    real = np.asarray(attention_mask)[:, :prompt_length] == 1
    positions = np.where(real[None], np.asarray(position_ids)[:, :, :prompt_length], -1)
    return (positions.max(axis=(0, 2)) + 1).astype(np.int32)


def generate(model, inputs: ModelInputs, prompt_length: int, key: jax.Array, cfg: SamplingConfig) -> SampleOutput:
    """Sample up to `cfg.max_new_tokens` tokens after each left-padded prompt (see module doc)."""
    next_position = next_positions(inputs.attention_mask, inputs.position_ids, prompt_length)
    graphdef, state = nnx.split(model)
    return sample(graphdef, cfg, state, inputs, jnp.int32(prompt_length - 1), jnp.asarray(next_position), key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def sample(
    graphdef: nnx.GraphDef,
    cfg: SamplingConfig,
    state: nnx.State,
    inputs: ModelInputs,
    last: jax.Array,
    next_position: jax.Array,
    key: jax.Array,
) -> SampleOutput:
    """`generate` on arrays already placed (global arrays in multi-process runs): the model's state
    as an argument, `last` the prompts' last column, `next_position` from `next_positions`.

    `key` is one key, or one per completion row (B * num_samples,): row r's token k is drawn with
    fold_in(key_r, k), so what a row samples depends on its own key alone, not on its neighbours.
    """
    model = nnx.merge(graphdef, state)
    inputs = cast_floats(inputs, model.config.compute_dtype)
    text = model.model
    batch, length = inputs.input_ids.shape
    slots = length + cfg.max_new_tokens
    cache = KVCache.zeros(model.config.text, batch, slots, jnp.dtype(model.config.compute_dtype))
    hidden, cache = model.prefill(inputs, cache, offset=0)
    logits = model.logits(jax.lax.dynamic_slice_in_dim(hidden, last, 1, axis=1))[:, 0]

    n = cfg.num_samples
    if n > 1:  # share the prefill: every array with a batch axis is repeated, rows of a prompt adjacent
        cache = cache.replace(
            k=constrain_batch(jnp.repeat(cache.k, n, axis=1), 1),
            v=constrain_batch(jnp.repeat(cache.v, n, axis=1), 1),
            segments=jnp.repeat(cache.segments, n, axis=0),
        )
        logits, next_position = jnp.repeat(logits, n, axis=0), jnp.repeat(next_position, n, axis=0)
    rows = batch * n
    keys = jax.random.split(key, rows) if key.ndim == 0 else key
    empty = jnp.zeros((rows, cfg.max_new_tokens), jnp.float32)
    state0 = _Loop(
        step=jnp.int32(0),
        cache=cache,
        logits=logits,
        next_position=next_position.astype(jnp.int32),
        finished=jnp.zeros((rows,), bool),
        out=SampleOutput(
            tokens=jnp.full((rows, cfg.max_new_tokens), cfg.pad_id, jnp.int32),
            lengths=jnp.zeros((rows,), jnp.int32),
            logp_sampling=empty,
            logp_model=empty,
        ),
    )
    eos = jnp.asarray(cfg.eos_ids if cfg.eos_ids else (-1,), jnp.int32)

    def cond(s: _Loop) -> jax.Array:
        return (s.step < cfg.max_new_tokens) & ~jnp.all(s.finished)

    def body(s: _Loop) -> _Loop:
        token, logp_s, logp_m = choose(s.logits, jax.vmap(jax.random.fold_in, (0, None))(keys, s.step), cfg)
        token = jnp.where(s.finished, cfg.pad_id, token).astype(jnp.int32)
        live = ~s.finished
        out = s.out.replace(
            tokens=s.out.tokens.at[:, s.step].set(token),
            lengths=s.out.lengths + live,
            logp_sampling=s.out.logp_sampling.at[:, s.step].set(jnp.where(live, logp_s, 0.0)),
            logp_model=s.out.logp_model.at[:, s.step].set(jnp.where(live, logp_m, 0.0)),
        )
        finished = s.finished | jnp.isin(token, eos)
        position = jnp.broadcast_to((s.next_position + s.step)[None, :, None], (3, rows, 1))
        hidden, cache = text.extend(text.embed(token[:, None]), position, jnp.ones((rows, 1), jnp.int32), s.cache)
        return _Loop(
            step=s.step + 1,
            cache=cache,
            logits=model.logits(hidden)[:, 0],
            next_position=s.next_position,
            finished=finished,
            out=out,
        )

    return jax.lax.while_loop(cond, body, state0).out
