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

import jax
import jax.numpy as jnp
from flax import nnx

from mile.attention import IMPLEMENTATIONS, causal_attention

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
    """Closed-form number of parameters (untied embedding and head, no biases)."""
    c = ModelConfig.from_cfg(cfg)
    attention = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)  # q, o, k, v
    mlp = 3 * c.embed_dim * c.mlp_dim  # gate, up, down
    norms = 2 * c.embed_dim
    embed_and_head = 2 * c.vocab_size * c.embed_dim
    return embed_and_head + c.num_layers * (attention + mlp + norms) + c.embed_dim  # + final norm


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

    An int n means positions 0..n-1, the arange built here in float32: the training forward's one
    table for every row (its compiled step is the same as when this was a separate function).
    Decoding passes [B, T], each row at its own offset. One formula for both, so a position gets
    bit-identical angles on either path.
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


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; scores and softmax in float32."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.num_kv_heads = c.num_kv_heads
        self.dtype = c.compute_dtype
        self.implementation = c.attention
        d, h, kv, hd = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
        self.q = _normal_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), c)
        self.k = _normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), c)
        self.v = _normal_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), c)
        self.o = _normal_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), c)

    def __call__(self, x, cos, sin):
        dt = self.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.q[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.k[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.v[...].astype(dt))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, self.implementation)
        return jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(dt))

    def decode(self, x, cos, sin, k_cache, v_cache, start_pos):
        """x [B, T, D] at positions start_pos..start_pos+T-1; caches [B, M, kv, hd].

        Writes the new keys/values into the caches, then attends over every slot at or before
        each query's position, so stale slots past a row's length are never read.
        """
        dt = self.dtype
        batch, seq, _ = x.shape
        q = jnp.einsum("bsd,dhk->bshk", x, self.q[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.k[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.v[...].astype(dt))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache = _write_rows(k_cache, k, start_pos)
        v_cache = _write_rows(v_cache, v, start_pos)
        keys, values = k_cache.astype(dt), v_cache.astype(dt)
        head_dim = q.shape[-1]
        q = q.reshape(batch, seq, self.num_kv_heads, -1, head_dim)
        scores = jnp.einsum("bskgd,btkd->bkgst", q, keys, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(head_dim))
        query_pos = start_pos[:, None] + jnp.arange(seq, dtype=jnp.int32)  # [B, T]
        slots = jnp.arange(k_cache.shape[1], dtype=jnp.int32)
        visible = slots[None, None, :] <= query_pos[:, :, None]  # [B, T, M]
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, values).reshape(batch, seq, -1, head_dim)
        return jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(dt)), k_cache, v_cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = c.compute_dtype
        self.gate = _normal_param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c)
        self.up = _normal_param(rngs, (c.embed_dim, c.mlp_dim), ("embed", "mlp"), c)
        self.down = _normal_param(rngs, (c.mlp_dim, c.embed_dim), ("mlp", "embed"), c)

    def __call__(self, x):
        dt = self.dtype
        hidden = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return hidden @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, c: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(c)
        self.attn = Attention(c, rngs=rngs)
        self.mlp_norm = RMSNorm(c)
        self.mlp = SwiGLU(c, rngs=rngs)

    def __call__(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x, cos, sin, k_cache, v_cache, start_pos):
        """`__call__` for new tokens against a kv cache; returns (x, k_cache, v_cache)."""
        attn, k_cache, v_cache = self.attn.decode(self.attn_norm(x), cos, sin, k_cache, v_cache, start_pos)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x)), k_cache, v_cache


def _apply_block(graphdef, state, x, cos, sin):
    """Pure block application, so it can go under jax.checkpoint and jax.lax.scan."""
    return nnx.merge(graphdef, state)(x, cos, sin)


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
        cos, sin = rope_tables(seq, c.head_dim, c.rope_base)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(c.compute_dtype)
        # remat="full": keep only each block's input; recompute its insides in the backward pass.
        block_fn = _apply_block
        if c.remat == "full":
            block_fn = jax.checkpoint(_apply_block, static_argnums=(0,))
        if c.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(carry, layer_state):
                return block_fn(graphdef, layer_state, carry, cos, sin), None

            x, _ = jax.lax.scan(body, x, stacked)
        else:
            for block in self.layers:
                graphdef, state = nnx.split(block)
                x = block_fn(graphdef, state, x, cos, sin)
        return self.final_norm(x)

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
        c = self.config
        seq = tokens.shape[-1]
        start_pos = jnp.asarray(start_pos, jnp.int32)
        positions = start_pos[:, None] + jnp.arange(seq, dtype=jnp.int32)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_base)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(c.compute_dtype)
        if c.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(carry, layer):
                state, k_cache, v_cache = layer
                carry, k_cache, v_cache = nnx.merge(graphdef, state).decode(
                    carry, cos, sin, k_cache, v_cache, start_pos
                )
                return carry, (k_cache, v_cache)

            x, (ks, vs) = jax.lax.scan(body, x, (stacked, cache["k"], cache["v"]))
        else:
            ks, vs = [], []
            for i, block in enumerate(self.layers):
                x, k_cache, v_cache = block.decode(x, cos, sin, cache["k"][i], cache["v"][i], start_pos)
                ks.append(k_cache)
                vs.append(v_cache)
            ks, vs = jnp.stack(ks), jnp.stack(vs)
        return self.final_norm(x), {"k": ks, "v": vs}

    def logits(self, tokens: jax.Array) -> jax.Array:
        """hidden @ unembedding in float32: [B, S, vocab]. For evaluation and tests."""
        hidden = self(tokens).astype(jnp.float32)
        return hidden @ self.head[...].astype(jnp.float32)
