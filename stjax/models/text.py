"""The Qwen2 decoder with grouped-query attention and multimodal rotary embeddings (M-RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from stjax.models.attention import attend
from stjax.models.config import QwenVLConfig, TextConfig
from stjax.models.layers import ACTIVATIONS, Linear, RMSNorm, apply_rotary, scan_layers, stack_layers
from stjax.sharding import constrain_batch


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, L, head_dim) from (3, B, L) positions.

    Frequency slot i of the head_dim/2 rotary frequencies takes its position from the T, H or W
    stream in consecutive chunks of `mrope_section` (Qwen3-VL, `mrope_interleaved`: H at slots 1, 4, ...
    below 3 * sections[1], W at slots 2, 5, ... below 3 * sections[2], T elsewhere), then the angles are
    doubled like ordinary rotary embeddings.
    """
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    stream = np.repeat(np.arange(3), cfg.mrope_section)  # static: which stream feeds each frequency
    if cfg.mrope_interleaved:
        slot = np.arange(cfg.head_dim // 2)
        stream = np.zeros_like(slot)
        for s in (1, 2):
            stream[(slot % 3 == s) & (slot < 3 * cfg.mrope_section[s])] = s
    positions = jnp.asarray(position_ids, jnp.float32)[stream]  # (head_dim / 2, B, L)
    angles = jnp.moveaxis(positions, 0, -1) * inv_freq  # (B, L, half)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def add_deepstack(x: jax.Array, deepstack: jax.Array | None, layer: jax.Array) -> jax.Array:
    """x plus the DeepStack features of this layer, if it is one of the first K (else x unchanged)."""
    if deepstack is None:
        return x
    count = deepstack.shape[0]
    return jnp.where(layer < count, x + deepstack[jnp.minimum(layer, count - 1)].astype(x.dtype), x)


@struct.dataclass
class KVCache:
    """Keys and values of every layer for a fixed number of slots, filled left to right.

    segments (B, S) is 1 at slots holding a real token (0 for left padding and unwritten slots);
    `index` is the next slot to write. Decoding updates the arrays in place inside the loop.
    """

    k: jax.Array  # (layers, B, kv_heads, S, head_dim): heads-major, the layout of a decoding step's matmuls
    v: jax.Array
    segments: jax.Array  # (B, S) int32
    index: jax.Array  # () int32

    @classmethod
    def zeros(cls, cfg: TextConfig, batch: int, slots: int, dtype) -> KVCache:
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segments=jnp.zeros((batch, slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
        kv = t.num_kv_heads * t.head_dim

        def linear(name: str, din: int, dout: int, axes: tuple[str, str], bias: bool) -> Linear:
            lora = (
                dict(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
                if name in cfg.lora_targets
                else {}
            )
            return Linear(
                din,
                dout,
                axes,
                bias=bias,
                **cfg.linear_init(rngs),
                **lora,
                quantize=cfg.quantization(("model", "layers", name)),
                double_quant=cfg.double_quant,
            )

        self.input_layernorm = RMSNorm(t.hidden_size, "embed", eps=t.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, "embed", eps=t.rms_norm_eps, **kw)
        bias = t.attention_bias
        self.q_proj = linear("q_proj", t.hidden_size, t.num_heads * t.head_dim, ("embed", "heads"), bias)
        self.k_proj = linear("k_proj", t.hidden_size, kv, ("embed", "kv_heads"), bias)
        self.v_proj = linear("v_proj", t.hidden_size, kv, ("embed", "kv_heads"), bias)
        self.o_proj = linear("o_proj", t.num_heads * t.head_dim, t.hidden_size, ("heads", "embed"), t.o_proj_bias)
        # Qwen3: RMSNorm over each head's q and k before the rotary embedding.
        self.q_norm = RMSNorm(t.head_dim, "head_dim", eps=t.rms_norm_eps, **kw) if t.qk_norm else None
        self.k_norm = RMSNorm(t.head_dim, "head_dim", eps=t.rms_norm_eps, **kw) if t.qk_norm else None
        self.gate_proj = linear("gate_proj", t.hidden_size, t.intermediate_size, ("embed", "mlp"), False)
        self.up_proj = linear("up_proj", t.hidden_size, t.intermediate_size, ("embed", "mlp"), False)
        self.down_proj = linear("down_proj", t.intermediate_size, t.hidden_size, ("mlp", "embed"), False)
        self.act = ACTIVATIONS[t.hidden_act]
        self.heads, self.kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.backend = cfg.attention

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segments: jax.Array,
        cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
        dropout_key: jax.Array | None = None,
        right_padded: bool = False,
        offset: int | None = None,
    ):
        """Without a cache: x (B, L, hidden) -> x. With `cache = (k, v, layer, segments, index)`,
        k and v every layer's (the stacked `KVCache` arrays), the new tokens' keys and values are
        written at this layer's slots from `index` and attention sees the cached slots plus them;
        (x, (k, v)) is returned. Writing into the stack and reading this layer's slab from it (rather
        than passing a slab in and back), heads-major, lets XLA update the cache in place and
        multiply by it as it lies: no copy or transpose of a slab per layer and decoding step.
        `dropout_key` turns on LoRA dropout; `right_padded` (static) says every row's padding comes
        after its real tokens; `offset` is the cache's index when it is known statically."""
        b, l, _ = x.shape
        x = constrain_batch(x)  # the residual stream stays split by rows (FSDP gathers weights instead)
        keys = [None] * 7 if dropout_key is None else list(jax.random.split(dropout_key, 7))
        h = self.input_layernorm(x)
        q = self.q_proj(h, keys[0]).reshape(b, l, self.heads, self.head_dim)
        k = self.k_proj(h, keys[1]).reshape(b, l, self.kv_heads, self.head_dim)
        v = self.v_proj(h, keys[2]).reshape(b, l, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            attn = attend(q, k, v, segments, segments, True, self.backend, right_padded=right_padded)
        else:
            stack_k, stack_v, layer, cache_segments, index = cache
            at = (layer, 0, 0, index, 0)
            stack_k = jax.lax.dynamic_update_slice(stack_k, k.swapaxes(1, 2).astype(stack_k.dtype)[None], at)
            stack_v = jax.lax.dynamic_update_slice(stack_v, v.swapaxes(1, 2).astype(stack_v.dtype)[None], at)
            stack_k, stack_v = constrain_batch(stack_k, 1), constrain_batch(stack_v, 1)
            attn = attend(
                q,
                stack_k[layer].swapaxes(1, 2),
                stack_v[layer].swapaxes(1, 2),
                segments,
                cache_segments,
                True,
                self.backend,
                q_offset=index if offset is None else offset,
            )
        x = x + self.o_proj(attn.reshape(b, l, -1), keys[3])
        h = self.post_attention_layernorm(x)
        x = x + self.down_proj(self.act(self.gate_proj(h, keys[4])) * self.up_proj(h, keys[5]), keys[6])
        x = constrain_batch(x)
        return x if cache is None else (x, (stack_k, stack_v))


class TextModel(nnx.Module):
    """Embeddings, the stacked decoder layers (run with a scan) and the final norm."""

    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        t = cfg.text
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(
            init(rngs.params(), (t.vocab_size, t.hidden_size), cfg.param_dtype), axes=("vocab", "embed")
        )
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, r), t.num_layers, rngs)
        self.norm = RMSNorm(
            t.hidden_size, "embed", eps=t.rms_norm_eps, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype
        )
        self.cfg = t
        self.remat = cfg.remat
        self.compute_dtype = cfg.compute_dtype

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...][input_ids].astype(self.compute_dtype)

    def __call__(
        self,
        x: jax.Array,
        position_ids: jax.Array,
        attention_mask: jax.Array,
        dropout_key: jax.Array | None = None,
        right_padded: bool = False,
        deepstack: jax.Array | None = None,
    ) -> jax.Array:
        """`deepstack` (K, B, L, hidden), zero outside the vision slots: added to the outputs of the first
        K layers (Qwen3-VL's DeepStack)."""
        cos, sin = mrope_cos_sin(position_ids, self.cfg)

        def step(layer: DecoderLayer, x: jax.Array, xs):
            i, key = xs
            x = layer(x, cos, sin, attention_mask, dropout_key=key, right_padded=right_padded)
            return add_deepstack(x, deepstack, i)

        keys = None if dropout_key is None else jax.random.split(dropout_key, self.cfg.num_layers)
        x = scan_layers(self.layers, x, step, xs=(jnp.arange(self.cfg.num_layers), keys), remat=self.remat)
        return constrain_batch(self.norm(x))

    def extend(
        self,
        x: jax.Array,
        position_ids: jax.Array,
        segments: jax.Array,
        cache: KVCache,
        dropout_key: jax.Array | None = None,
        offset: int | None = None,
        deepstack: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Run new tokens x (B, T, hidden) after the cache's `index` slots (a prefill when the cache
        is empty, one decoding step when T = 1, a whole completion after a shared prompt in GRPO);
        returns their hidden states and the cache. `dropout_key` turns on LoRA dropout. `offset`: the
        cache's index when the caller knows it (0 for a prefill into an empty cache), a static value
        that lets the Pallas kernel serve the attention (a traced index falls back to `xla` there).
        `deepstack`: as in `__call__` (a prefill's)."""
        cos, sin = mrope_cos_sin(position_ids, self.cfg)
        cache = cache.replace(segments=jax.lax.dynamic_update_slice(cache.segments, segments, (0, cache.index)))

        def step(layer: DecoderLayer, carry, xs):
            (x, k, v), (i, key) = carry, xs
            x, (k, v) = layer(x, cos, sin, segments, (k, v, i, cache.segments, cache.index), key, offset=offset)
            return add_deepstack(x, deepstack, i), k, v

        keys = None if dropout_key is None else jax.random.split(dropout_key, self.cfg.num_layers)
        layers = (jnp.arange(self.cfg.num_layers), keys)
        x, k, v = scan_layers(self.layers, (x, cache.k, cache.v), step, xs=layers, remat=self.remat)
        cache = cache.replace(k=k, v=v, index=cache.index + x.shape[1])
        return constrain_batch(self.norm(x)), cache
