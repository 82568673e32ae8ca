"""A LLaMA-style decoder in Flax NNX that returns hidden states, not logits.

The output-head weight is exposed through `Llama.unembedding()` so the loss owns the
head matmul (the fused loss computes `hidden @ unembedding` tile by tile and never holds
[tokens, vocab]). `Llama.logits()` is the plain, memory-hungry version for evals/tests.

Every parameter carries logical axis names in its `out_sharding` metadata (read by
`nnx.get_partition_spec` and by `mile.sharding`). They are created with
`eager_sharding=False`: the names are logical, not mesh axes, so the model builds the same
with or without a mesh; `mile.sharding` maps names to mesh axes and places the arrays.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mile.attention import IMPLEMENTATIONS, causal_attention, xla_attention
from mile.dense import dense
from mile.flops import param_counts

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model fields of the run config, validated and frozen (hashable, static under jit)."""

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.01
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "xla"  # "xla" | "cudnn" | "splash" (mile.attention)

    @classmethod
    def from_cfg(cls, cfg) -> "ModelConfig":
        """Accepts a ConfigDict, a dataclass or any object with the fields as attributes."""
        if isinstance(cfg, cls):
            return cfg
        kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        return cls(**kwargs)

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if self.remat not in ("none", "full"):
            raise ValueError(f"model.remat={self.remat!r}; expected 'none' or 'full'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(
                f"model.attention={self.attention!r}; expected one of {', '.join(IMPLEMENTATIONS)}"
            )
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(
                "model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN flash attention is 16-bit)"
            )

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]


def param_count(cfg) -> int:
    """Closed-form number of parameters (untied embedding and head, no biases; mile.flops by part)."""
    return param_counts(ModelConfig.from_cfg(cfg))["total"]


def _normal_param(rngs: nnx.Rngs, shape, names, c: ModelConfig) -> nnx.Param:
    value = c.init_std * jax.random.normal(rngs.params(), shape, _DTYPES[c.param_dtype])
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and returned in the compute dtype."""

    def __init__(self, c: ModelConfig):
        self.eps = c.norm_eps
        self.dtype = c.compute_dtype
        self.scale = nnx.Param(
            jnp.ones((c.embed_dim,), _DTYPES[c.param_dtype]), out_sharding=("embed",), eager_sharding=False
        )

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions, head_dim: int, base: float):
    """cos/sin [..., T, head_dim // 2] in float32 for int positions [..., T].

    An int n means positions 0..n-1, one table for every row: the training forward passes its
    length, and the arange is built here directly in float32 (exact up to 2**24), so the training
    step carries no int-to-float convert. Decoding passes [B, T], each row at its own offset. One
    formula for both, so a position gets bit-identical angles on either path.
    """
    inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if isinstance(positions, int):
        positions = jnp.arange(positions, dtype=jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + d/2]) by angle pos * base^(-2i/d) ("rotate-half" layout).

    x: [B, T, heads, head_dim]; cos/sin: [T, head_dim // 2] or [B, T, head_dim // 2].
    """
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    # One angle for every head: [T, half] -> [1, T, 1, half], [B, T, half] -> [B, T, 1, half].
    axes = (-2,) if cos.ndim == 3 else (0, -2)
    cos, sin = jnp.expand_dims(cos, axes), jnp.expand_dims(sin, axes)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def _write_rows(cache, new, start_pos):
    """cache [B, M, ...] with new [B, T, ...] written at slot start_pos[b] of each row."""

    def write(row, update, start):
        return jax.lax.dynamic_update_slice_in_dim(row, update.astype(row.dtype), start, axis=0)

    return jax.vmap(write)(cache, new, start_pos)


class CacheView(NamedTuple):
    """The kv cache during `Llama.decode`, with what every layer needs to write and read it.

    k, v: [B, M, kv_heads, head_dim] inside a block; [num_layers, B, M, ...] around the blocks.
    """

    k: jax.Array
    v: jax.Array
    start_pos: jax.Array  # [B] int32: the slot of each row's first new token
    visible: jax.Array  # [B, T, M] bool: new token t of row b may read slot m (m <= its position)

    def write(self, k, v) -> "CacheView":
        """The new tokens' keys/values k, v [B, T, kv_heads, head_dim] stored at their slots."""
        start = self.start_pos
        return self._replace(k=_write_rows(self.k, k, start), v=_write_rows(self.v, v, start))


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; scores and softmax in float32."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = c.compute_dtype
        self.implementation = c.attention
        d, h, kv, hd = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
        self.q = _normal_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), c)
        self.k = _normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), c)
        self.v = _normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), c)
        self.o = _normal_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), c)

    def __call__(self, x, cos, sin, cache: CacheView | None = None):
        """x [B, T, D] at the positions cos/sin were built for -> (out [B, T, D], cache).

        This is where `model.attention` plugs in. No cache (training): x attends causally to
        itself with the configured kernel. With a cache (decoding): x's keys/values are written
        into it first, then x reads the slots `cache.visible` allows, so stale slots past a row's
        length are never read. That path is XLA whatever `model.attention` says: the fused
        kernels take only the square causal mask, not T queries at per-row offsets into M slots.
        """
        dt = self.dtype
        q, k, v = (dense(x, w[...].astype(dt)) for w in (self.q, self.k, self.v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = causal_attention(q, k, v, self.implementation)
        else:
            cache = cache.write(k, v)
            out = xla_attention(q, cache.k.astype(dt), cache.v.astype(dt), mask=cache.visible)
        return dense(out, self.o[...].astype(dt), contract=2), cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = c.compute_dtype
        self.gate = _normal_param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c)
        self.up = _normal_param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c)
        self.down = _normal_param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c)

    def __call__(self, x):
        dt = self.dtype
        hidden = jax.nn.silu(dense(x, self.gate[...].astype(dt))) * dense(x, self.up[...].astype(dt))
        return dense(hidden, self.down[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(c)
        self.attn = Attention(c, rngs=rngs)
        self.mlp_norm = RMSNorm(c)
        self.mlp = SwiGLU(c, rngs=rngs)

    def __call__(self, x, cos, sin, cache: CacheView | None = None):
        """-> (x, cache); `cache` as in `Attention`."""
        attn, cache = self.attn(self.attn_norm(x), cos, sin, cache)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), cache


def _apply_block(graphdef, state, x, cos, sin, cache):
    """Pure block application, so it can go under jax.checkpoint and jax.lax.scan."""
    return nnx.merge(graphdef, state)(x, cos, sin, cache)


class Llama(nnx.Module):
    """Decoder-only LLaMA. `model(tokens [B, S] int32) -> hidden [B, S, embed_dim]`."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = ModelConfig.from_cfg(cfg)
        self.config = c
        self.embedding = _normal_param(rngs, (c.vocab_size, c.embed_dim), ("vocab", "embed"), c)
        if c.scan_layers:
            # One Block whose every parameter has a leading 'layers' axis of size num_layers.
            @nnx.split_rngs(splits=c.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked_blocks(rngs):
                return Block(c, rngs=rngs)

            self.layers = stacked_blocks(rngs)
        else:
            self.layers = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
        self.final_norm = RMSNorm(c)
        self.head = _normal_param(rngs, (c.embed_dim, c.vocab_size), ("embed", "vocab"), c)

    def unembedding(self) -> jax.Array:
        """The output-head weight [embed_dim, vocab_size] in the compute dtype."""
        return self.head[...].astype(self.config.compute_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        seq = tokens.shape[-1]
        if seq > c.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={c.max_seq_len}")
        hidden, _ = self._forward(tokens, seq)
        return hidden

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Zeroed kv cache {"k", "v"}: [num_layers, batch, max_len, num_kv_heads, head_dim].

        One stacked layout for both `scan_layers` settings. It holds no positions: the caller
        passes `start_pos` to `decode` and keeps track of each row's length.
        """
        c = self.config
        if max_len > c.max_seq_len:
            raise ValueError(
                f"cache max_len={max_len} exceeds model.max_seq_len={c.max_seq_len}; lower max_len"
            )
        dtype = c.compute_dtype if dtype is None else dtype
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def decode(self, tokens: jax.Array, cache: dict, start_pos: jax.Array):
        """Run tokens [B, T] at positions start_pos[b]..start_pos[b]+T-1 against `cache`.

        Returns (hidden [B, T, D] after the final norm, new cache). Row b attends to cache
        slots 0..start_pos[b]+t, so slots 0..start_pos[b]-1 must already hold that row's
        prefix. Prefill is decode with start_pos = 0 and T = the prompt length. Positions
        must stay below the cache's max_len (writes past it are clamped, not checked).
        """
        seq = tokens.shape[-1]
        start_pos = jnp.asarray(start_pos, jnp.int32)
        positions = start_pos[:, None] + jnp.arange(seq, dtype=jnp.int32)
        slots = jnp.arange(cache["k"].shape[2], dtype=jnp.int32)
        visible = slots[None, None, :] <= positions[:, :, None]
        view = CacheView(cache["k"], cache["v"], start_pos, visible)
        hidden, view = self._forward(tokens, positions, view)
        return hidden, {"k": view.k, "v": view.v}

    def _forward(self, tokens, positions, cache: CacheView | None = None):
        """tokens [B, T] at `positions` (as in `rope_tables`) -> (hidden, cache).

        The one path under `__call__` (an int T, no cache) and `decode` ([B, T] and a cache);
        `cache` as in `Attention`, with a leading [num_layers] axis on its k and v.
        """
        c = self.config
        cos, sin = rope_tables(positions, c.head_dim, c.rope_base)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(c.compute_dtype)
        x, cache = self._blocks(x, cos, sin, cache)
        return self.final_norm(x), cache

    def _blocks(self, x, cos, sin, cache: CacheView | None):
        """Every block in turn; the cache's k, v go in one layer's slice at a time."""
        c = self.config
        # remat="full": keep only each block's input; recompute its insides in the backward pass
        # (decoding has no backward pass, so there it changes nothing).
        block_fn = _apply_block
        if c.remat == "full":
            block_fn = jax.checkpoint(_apply_block, static_argnums=(0,))
        kv = None if cache is None else (cache.k, cache.v)

        def run(graphdef, state, x, layer_kv):
            view = None if cache is None else cache._replace(k=layer_kv[0], v=layer_kv[1])
            x, view = block_fn(graphdef, state, x, cos, sin, view)
            return x, None if view is None else (view.k, view.v)

        if c.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, layer):
                state, layer_kv = layer
                return run(graphdef, state, x, layer_kv)

            x, kv = jax.lax.scan(body, x, (stacked, kv))
        else:
            new_kv = []
            for i, block in enumerate(self.layers):
                x, layer_kv = run(*nnx.split(block), x, jax.tree.map(lambda a: a[i], kv))
                new_kv.append(layer_kv)
            kv = jax.tree.map(lambda *layers: jnp.stack(layers), *new_kv)
        return x, None if cache is None else cache._replace(k=kv[0], v=kv[1])

    def logits(self, tokens: jax.Array) -> jax.Array:
        """hidden @ unembedding in float32: [B, S, vocab]. For evaluation and tests."""
        hidden = self(tokens).astype(jnp.float32)
        return hidden @ self.head[...].astype(jnp.float32)
