"""Causal self-attention kernels, chosen by `model.attention`.

All take q [B, S, H, hd] and k, v [B, S, KV, hd] (RoPE applied, H a multiple of KV: query head h
reads kv head h // (H / KV)) and return [B, S, H, hd] in q's dtype. Scores and softmax are float32.

  "xla"    einsums + softmax, written out; runs anywhere and holds the [S, S] scores per head
           (on CPU in query blocks that skip the keys above the diagonal).
  "cudnn"  `jax.nn.dot_product_attention` with cuDNN's fused flash attention (NVIDIA GPU, bf16).
  "splash" Pallas TPU splash attention: blockwise, never holds the scores, skips the blocks above
           the causal diagonal. Under a mesh it runs per shard (batch over data x fsdp, heads over
           tensor) inside `shard_map`, since GSPMD cannot partition a Pallas kernel.

Decoding against a kv cache (mile.model) uses `xla_attention` with an explicit mask: T new
queries against the cache's M slots, each row at its own offset. The fused kernels take only the
square causal mask, so they serve the training forward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mile.sharding import BATCH_AXES

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
HEAD_AXIS = "tensor"  # attention heads are split over this mesh axis; rows over BATCH_AXES
CPU_QUERY_BLOCKS = 8  # causal "xla" attention on CPU: query row blocks (`_causal_in_query_blocks`)
CPU_MIN_BLOCK_ROWS = 32  # shorter sequences compute the whole matrix: tiny blocks cost more than they save


def xla_attention(q, k, v, mask=None):
    """q [B, S, H, hd] against k, v [B, T, KV, hd]; `mask` is bool [S, T] or [B, S, T], True where
    query s may read key t. None is the causal mask over S == T positions (the training forward);
    on CPU that is computed in query blocks (`_causal_in_query_blocks`), elsewhere whole."""
    if mask is None:
        # The block count is read here, not inside the branch: traced branches are cached.
        blocked = functools.partial(
            _causal_in_query_blocks, blocks=CPU_QUERY_BLOCKS, min_rows=CPU_MIN_BLOCK_ROWS
        )
        return jax.lax.platform_dependent(q, k, v, cpu=blocked, default=_causal_whole)
    return _masked_attention(q, k, v, mask)


def _causal_whole(q, k, v):
    seq = q.shape[1]
    return _masked_attention(q, k, v, jnp.tril(jnp.ones((seq, seq), dtype=bool)))


def _causal_in_query_blocks(q, k, v, *, blocks: int = CPU_QUERY_BLOCKS, min_rows: int = CPU_MIN_BLOCK_ROWS):
    """Causal attention with the queries split into `blocks` row blocks, each reading only
    the keys up to its own last position: 9/16 of the score matmuls and softmax at 8 blocks. The
    keys it skips are the ones the causal mask zeroes, so only summation order changes. Measured
    on XLA:CPU at the configs/cpu.py shape (interleaved runs of the train step): 1.54-1.61 s per
    step whole, 1.53 s at 4 blocks, 1.46-1.51 s at 8, 1.71 s at 16 (too many small matmuls)."""
    seq = q.shape[1]
    if seq % blocks or seq // blocks < min_rows:
        return _causal_whole(q, k, v)
    size = seq // blocks
    outs = []
    for i in range(blocks):
        start, stop = i * size, (i + 1) * size
        mask = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        outs.append(_masked_attention(q[:, start:stop], k[:, :stop], v[:, :stop], mask))
    return jnp.concatenate(outs, axis=1)


def _masked_attention(q, k, v, mask):
    """`xla_attention` with an explicit mask ([S, T] or [B, S, T])."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    # Group query heads by the kv head they share: [B, S, kv, group, hd].
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    if mask.ndim == 3:
        mask = mask[:, None, None]  # per row, shared by every head: [B, 1, 1, S, T]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, seq, heads, head_dim)


def jax_nn_attention(q, k, v, *, implementation: str | None):
    """`jax.nn.dot_product_attention`, causal; implementation "cudnn", "xla" or None (auto)."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on {jax.default_backend()}; "
            "use model.attention='xla' (or 'splash' on TPU)"
        )
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _splash_block(seq: int) -> int:
    """Sequence tile of the kernel: the largest of 512, 256, 128 that divides seq (its lanes are 128)."""
    for block in (512, 256, 128):
        if seq % block == 0:
            return block
    raise ValueError(
        f"model.attention='splash' needs a sequence length that is a multiple of 128, got {seq}; "
        "change data.seq_len or use model.attention='xla'"
    )


def _splash_kernel(heads: int, seq: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
    block = _splash_block(seq)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, *, interpret: bool | None):
    """Splash on one device's arrays: [B, S, H, hd] -> [B, H, S, hd] layout, vmapped over B."""
    seq, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    q = q * np.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # the kernel does not scale
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))

    def run(q, k, v, interpret):
        return jax.vmap(_splash_kernel(heads, seq, interpret))(q, k, v)

    if interpret is None:  # decided when lowering: the TPU kernel on TPU, its interpreter on CPU
        out = jax.lax.platform_dependent(
            q,
            k,
            v,
            cpu=functools.partial(run, interpret=True),
            default=functools.partial(run, interpret=False),
        )
    else:
        out = run(q, k, v, interpret)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _axes_dividing(mesh, axes, size):
    """The longest prefix of `axes` (present in `mesh`) whose total size divides `size`."""
    axes = [a for a in axes if a in mesh.axis_names]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes)


def splash_attention(q, k, v, *, interpret: bool | None = None):
    """Splash attention; per shard under the ambient mesh (`jax.set_mesh`), if there is one.

    The kernel is TPU code. On CPU (tests, debugging) it runs in the Pallas interpreter: the same
    numbers, slowly. `interpret` forces one or the other."""
    _splash_block(q.shape[1])  # fail early, outside shard_map, on a length it cannot tile
    local = functools.partial(_splash_local, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v)
    batch_axes = _axes_dividing(mesh, BATCH_AXES, q.shape[0])
    head_axes = _axes_dividing(mesh, (HEAD_AXIS,), math.gcd(q.shape[2], k.shape[2]))
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, head_axes or None, None)
    # check_vma=False: the Pallas kernel declares no varying-axes types for its outputs.
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return sharded(q, k, v)


def causal_attention(q, k, v, implementation: str = "xla"):
    """Causal attention with the named implementation (see the module docstring)."""
    if implementation == "xla":
        return xla_attention(q, k, v)
    if implementation == "cudnn":
        return jax_nn_attention(q, k, v, implementation="cudnn")
    if implementation == "splash":
        return splash_attention(q, k, v)
    raise ValueError(f"model.attention={implementation!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
