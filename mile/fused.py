"""Fused LM-head loss: `hidden @ unembedding` and any loss of `mile.losses`, in token tiles.

The [tokens, vocab] logits are never held: a `lax.scan` walks over tiles of `chunk_size` tokens,
and each tile's logits live only inside one step.

Why a custom VJP, and why it is exact: every loss here is L = sum_i a_i nll_i / N with a_i = m_i w_i
and N stop-gradient constants. Hence dL/dz_i = (a_i / N)(p_i - e_{y_i}): the per-token factor a_i is
known inside the tile, and the only thing the tile does not know is the common scalar 1/N (times
the upstream cotangent). So the forward pass, while it has each tile's softmax in hand, also
accumulates the *unscaled* gradients
    dhidden_i   = a_i (p_i - e_{y_i}) W^T          (per token)
    dunembed    = sum_i a_i h_i (p_i - e_{y_i})^T  (summed over tiles)
and the backward pass is one scalar multiply. The logits matmul is done once, not recomputed:
three matmuls in all, the same as the materialised loss. When no gradient is taken (evaluation),
the plain primal runs and computes statistics only.

Public API (`__all__`): fused_loss (-> (loss, aux), like `mile.losses.mile_loss` and friends),
fused_loss_terms (the additive terms, for micro-batch accumulation), fused_token_statistics
(per-position nll and entropy for evaluation, no gradient) and default_chunk_size.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mile import losses as L

__all__ = ["fused_loss", "fused_loss_terms", "fused_token_statistics", "default_chunk_size"]

# A tile of logits is chunk_size x V float32; ~4M elements (16 MiB) keeps a few tiles
# cache-friendly on CPU and small next to activations on accelerators.
_TILE_ELEMENTS = 1 << 22


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
    """Largest power of two with chunk x V <= 4M elements (>= 8), capped at the token count."""
    chunk = 1 << max(3, int(np.floor(np.log2(max(1, _TILE_ELEMENTS // vocab_size)))))
    return int(min(chunk, max(1, num_tokens)))


def _tile_statistics(spec: L.LossSpec, paper: bool, vocab_axis, h, w_mat, labels, mask):
    """Per-token statistics of one tile, plus what the gradient needs (shifted logits, one-hot).

    One tile: h [T, D], w_mat [D, V] (or [D, V/shards]), labels [T] int32, mask [T] float32;
    every per-token output is [T].

    One pass for the max, then one pass for every sum (sum e^s, sum e^s s, s at the label), so
    the entropy costs no extra sweep over the tile: MiLe runs at CE's speed.

    With `vocab_axis`, w_mat is this device's slice of the vocabulary: the local sums are merged
    across the axis (one pmax, one psum) into the statistics of the full softmax.
    """
    z = jnp.dot(h, w_mat, preferred_element_type=jnp.float32)  # [T, V or V/shards]
    local_max = jnp.max(z, axis=-1)
    s = z - local_max[:, None]
    e = jnp.exp(s)
    local_labels = labels
    if vocab_axis is not None:  # global ids -> ids within this device's vocabulary slice
        local_labels = labels - lax.axis_index(vocab_axis) * w_mat.shape[1]
    is_label = lax.broadcasted_iota(jnp.int32, s.shape, 1) == local_labels[:, None]
    # One variadic reduction: a single sweep whatever the loss needs of the three sums.
    sum_e, sum_es, s_label = lax.reduce(
        (e, e * s, jnp.where(is_label, s, 0.0)),
        (np.float32(0), np.float32(0), np.float32(0)),
        lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]),
        (1,),
    )
    shift = jnp.zeros_like(local_max)  # local max - global max: 0 unless the vocabulary is split
    if vocab_axis is not None:
        has_label = (local_labels >= 0) & (local_labels < w_mat.shape[1])
        sum_e, sum_es, s_label, shift = _merge_vocab_shards(
            vocab_axis, local_max, sum_e, sum_es, s_label, has_label
        )
    log_norm = jnp.log(sum_e)  # logsumexp - max, in [0, log V]
    nll = log_norm - s_label
    # H = -sum p (s - log_norm) = log_norm - sum(e s)/sum(e); both parts are O(log V).
    entropy = jnp.maximum(log_norm - sum_es / sum_e, 0.0)
    # log p of the local logits: s - log_p_offset (the global max and normaliser folded in).
    log_p_offset = log_norm - shift
    clamped = None
    if paper:  # a second sweep: which entries fall below the floor depends on the global normaliser
        clamped = L.paper_clamped_entropy(s - log_p_offset[:, None])
        if vocab_axis is not None:  # needs the global normaliser first: a second psum
            clamped = lax.psum(clamped, vocab_axis)
    weight, norm_weight = L.weights_from_statistics(spec, nll, entropy, mask, clamped)
    stats = {"nll": nll, "entropy": entropy, "weight": weight, "norm_weight": norm_weight}
    return stats, (s, log_p_offset, is_label)


def _merge_vocab_shards(vocab_axis, local_max, sum_e, sum_es, s_label, has_label):
    """Per-token softmax sums of the whole vocabulary from each shard's sums over its slice.

    Shard k has its max m_k and, over s = z - m_k, S_k = sum e^s, U_k = sum e^s s. With
    m = max_k m_k and d_k = m_k - m <= 0, the sums relative to the global max are
        S = sum_k e^d_k S_k,   U = sum_k e^d_k (U_k + d_k S_k),
    and the label's s is d_k + s_label on the one shard that holds the label. Returns
    (S, U, s_label, d_k): everything after this is identical on every shard of the axis.
    """
    d = local_max - lax.pmax(local_max, vocab_axis)
    scale = jnp.exp(d)
    label_part = jnp.where(has_label, s_label + d, 0.0)
    sum_e, sum_es, s_label = lax.psum((scale * sum_e, scale * (sum_es + d * sum_e), label_part), vocab_axis)
    return sum_e, sum_es, s_label, d


def _varying_axes(x) -> frozenset:
    """Mesh axes x varies over inside shard_map (empty outside it)."""
    return jax.typeof(x).manual_axis_type.varying


def _varying_like(x, *refs):
    """x marked varying over the refs' axes: a scan carry must keep one type through the loop."""
    axes = tuple(sorted(frozenset().union(*map(_varying_axes, refs)) - _varying_axes(x)))
    return lax.pcast(x, axes, to="varying") if axes else x


# The scans below walk over token tiles (see `_tiles`):
#   hidden_tiles [chunks, chunk, D], label_tiles [chunks, chunk] int32, mask_tiles [chunks, chunk] f32.
# Each step sees one tile, [chunk, D] / [chunk] / [chunk]; per-token outputs stack to [chunks, chunk].


def _scan_statistics(spec, paper, vocab_axis, hidden_tiles, w_mat, label_tiles, mask_tiles):
    def body(carry, tile):
        h, y, m = tile  # [chunk, D], [chunk], [chunk]
        stats, _ = _tile_statistics(spec, paper, vocab_axis, h, w_mat, y, m)
        return carry, (jnp.sum(m * stats["weight"] * stats["nll"]), stats)

    _, (numerators, stats) = lax.scan(body, None, (hidden_tiles, label_tiles, mask_tiles))
    return jnp.sum(numerators), stats


def _scan_statistics_and_gradients(spec, paper, vocab_axis, hidden_tiles, w_mat, label_tiles, mask_tiles):
    compute_dtype = jnp.result_type(hidden_tiles.dtype, w_mat.dtype)
    contract_vocab = (((1,), (1,)), ((), ()))  # [T,V] x [D,V] -> [T,D]
    contract_tokens = (((0,), (0,)), ((), ()))  # [T,D] x [T,V] -> [D,V]

    def body(d_unembed, tile):
        h, y, m = tile  # [chunk, D], [chunk], [chunk]
        stats, (s, log_p_offset, is_label) = _tile_statistics(spec, paper, vocab_axis, h, w_mat, y, m)
        coeff = (m * stats["weight"])[:, None]
        p = jnp.exp(s - log_p_offset[:, None])
        g = (coeff * p - jnp.where(is_label, coeff, 0.0)).astype(compute_dtype)  # unscaled dL/dz
        d_hidden = lax.dot_general(g, w_mat, contract_vocab, preferred_element_type=jnp.float32)
        d_unembed = d_unembed + lax.dot_general(h, g, contract_tokens, preferred_element_type=jnp.float32)
        numerator = jnp.sum(coeff[:, 0] * stats["nll"])
        return d_unembed, (numerator, stats, d_hidden.astype(hidden_tiles.dtype))

    d_unembed0 = _varying_like(jnp.zeros(w_mat.shape, jnp.float32), hidden_tiles, w_mat)
    tiles = (hidden_tiles, label_tiles, mask_tiles)
    d_unembed, (numerators, stats, d_hidden) = lax.scan(body, d_unembed0, tiles)
    # d_hidden [chunks, chunk, D] (like hidden_tiles), d_unembed [D, V]: both still unscaled by 1/N.
    return (jnp.sum(numerators), stats), (d_hidden, d_unembed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_numerator(spec, paper, vocab_axis, hidden_tiles, w_mat, label_tiles, mask_tiles):
    return _scan_statistics(spec, paper, vocab_axis, hidden_tiles, w_mat, label_tiles, mask_tiles)


def _fused_numerator_fwd(spec, paper, vocab_axis, hidden_tiles, w_mat, label_tiles, mask_tiles):
    out, grads = _scan_statistics_and_gradients(
        spec, paper, vocab_axis, hidden_tiles, w_mat, label_tiles, mask_tiles
    )
    return out, (grads, w_mat)


def _fused_numerator_bwd(spec, paper, vocab_axis, residuals, cotangents):
    del spec, paper
    (d_hidden, d_unembed), w_mat = residuals
    ct_numerator = cotangents[0]  # the statistics are returned stop-gradient: no cotangent
    d_h = ct_numerator * d_hidden.astype(jnp.float32)
    if vocab_axis is not None:  # each vocabulary slice gave its part of dhidden = g W^T
        d_h = lax.psum(d_h, vocab_axis)
    d_h = d_h.astype(d_hidden.dtype)
    d_w = ct_numerator * d_unembed
    # Under shard_map a replicated unembedding gets the sum of every shard's gradient.
    shard_axes = tuple(sorted(_varying_axes(d_w) - _varying_axes(w_mat)))
    if shard_axes:
        d_w = lax.psum(d_w, shard_axes)
    d_w = d_w.astype(w_mat.dtype)
    return d_h, d_w, None, None


_fused_numerator.defvjp(_fused_numerator_fwd, _fused_numerator_bwd)


def _tiles(hidden, labels, mask, vocab: int, chunk_size: int | None):
    """[..., D], [...], [...] -> [chunks, chunk, D], [chunks, chunk], [chunks, chunk].

    A ragged token count is padded with masked positions; callers cut the per-token outputs
    back to the real count, so padding never reaches a sum."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    num_tokens = int(np.prod(labels.shape))
    dim = hidden.shape[-1]
    chunk = min(chunk_size or default_chunk_size(num_tokens, vocab), max(num_tokens, 1))
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    # Flatten to one token axis, pad it to whole tiles, then split it into [chunks, chunk].
    hidden_nd = jnp.pad(hidden.reshape(num_tokens, dim), ((0, pad), (0, 0)))  # [N, D]
    labels_n = jnp.pad(labels.reshape(num_tokens).astype(jnp.int32), (0, pad))  # [N]
    mask_n = jnp.pad(mask.reshape(num_tokens).astype(jnp.float32), (0, pad))  # [N], 0 on padding
    return (
        hidden_nd.reshape(num_chunks, chunk, dim),
        labels_n.reshape(num_chunks, chunk),
        mask_n.reshape(num_chunks, chunk),
    )


def fused_loss_terms(
    spec: L.LossSpec,
    hidden: jax.Array,
    unembedding: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_size: int | None = None,
    batch_axes: tuple[str, ...] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    vocab_axis: str | None = None,
) -> dict[str, jax.Array]:
    """The additive terms (see `mile.losses.reduce_terms`) of `spec` on hidden @ unembedding.

    `batch_axes`: mesh axes the leading (batch) dimension is sharded over, e.g. ("data", "fsdp").
    With them, each device tiles only its own rows, on `mesh` (default: the one set with
    `jax.set_mesh`); without, the computation is written for one device and GSPMD partitions it
    as it can (which gathers the rows of a batch-sharded input to every device).

    `vocab_axis`: a mesh axis (e.g. "tensor") to split the vocabulary over. Each device then
    holds only its [D, V / shards] slice of the unembedding, computes its slice of every logit
    row, and the shards merge their per-token softmax sums; the unembedding is never gathered
    and its gradient stays sharded the same way. V must divide by the axis size.
    """
    hidden = L.check_float("hidden", hidden)
    unembedding = L.check_float("unembedding", unembedding, min_ndim=2)
    if unembedding.ndim != 2:
        raise ValueError(f"unembedding must be [D, V], got shape {unembedding.shape}")
    if hidden.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            f"hidden has D={hidden.shape[-1]} but unembedding is {unembedding.shape} ([D, V] expected); "
            "pass the output-head weight with the hidden size first (transpose it if it is [V, D])"
        )
    labels = L.check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    mask = L.prepare_mask(mask, labels)
    if not batch_axes and vocab_axis is None:
        return _local_terms(spec, hidden, unembedding, labels, mask, chunk_size)
    return _sharded_terms(
        spec, hidden, unembedding, labels, mask, chunk_size, tuple(batch_axes or ()), vocab_axis, mesh
    )


def _local_terms(spec, hidden, unembedding, labels, mask, chunk_size, vocab_axis=None):
    hidden_tiles, label_tiles, mask_tiles = _tiles(
        hidden, L.safe_labels(labels, mask), mask, unembedding.shape[1], chunk_size
    )
    paper = spec.paper_reweighted  # only the reference's reweighted losses need the clamped entropy
    numerator, stats = _fused_numerator(
        spec, paper, vocab_axis, hidden_tiles, unembedding, label_tiles, mask_tiles
    )
    # Per-token stats come back [chunks, chunk]: flatten and drop the padding tokens.
    num_tokens = int(np.prod(labels.shape))
    stats = {k: lax.stop_gradient(v.reshape(-1)[:num_tokens]) for k, v in stats.items()}
    terms = L.reduce_terms(
        stats["nll"], stats["entropy"], mask.reshape(-1), stats["weight"], stats["norm_weight"]
    )
    terms["numerator"] = numerator
    return terms


def _check_mesh_axes(mesh, batch_axes, vocab_axis):
    wanted = batch_axes + ((vocab_axis,) if vocab_axis is not None else ())
    missing = [a for a in wanted if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"batch_axes {batch_axes} / vocab_axis {vocab_axis!r} are not all axes of the current mesh "
            f"{mesh.axis_names or '(none)'}; pass mesh=..., call under `with jax.set_mesh(mesh)`, "
            "or pass batch_axes=None, vocab_axis=None"
        )
    if vocab_axis in batch_axes:
        raise ValueError(
            f"vocab_axis {vocab_axis!r} is also a batch axis {batch_axes}; split the vocabulary over "
            "an axis the batch is not split over (e.g. 'tensor')"
        )


def _sharded_terms(spec, hidden, unembedding, labels, mask, chunk_size, batch_axes, vocab_axis, mesh):
    """Each device tiles only its own rows; the terms are summed across the batch axes once.

    Left to GSPMD, a scan over token tiles of a batch-sharded array gathers every row to every
    device. Here each shard runs the local scan and one psum per term (plus one for the
    unembedding gradient, inserted by autodiff) is all the communication.

    With a vocab axis, each tile also merges its softmax sums across that axis (one pmax and one
    psum of [tile] vectors; paper normalisation adds one psum for the clamped entropy), and the
    backward pass psums dhidden over it. The terms are then identical on every vocabulary shard,
    so they are summed over the batch axes only: summing over the vocab axis too would count
    every token once per shard.
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    _check_mesh_axes(mesh, batch_axes, vocab_axis)
    if vocab_axis is not None and mesh.shape[vocab_axis] == 1:
        vocab_axis = None  # one shard holds the whole vocabulary: nothing to merge
    if vocab_axis is not None and unembedding.shape[1] % mesh.shape[vocab_axis]:
        raise ValueError(
            f"vocabulary {unembedding.shape[1]} does not divide over the {mesh.shape[vocab_axis]} shards "
            f"of vocab_axis {vocab_axis!r}; pad the vocabulary to a multiple of {mesh.shape[vocab_axis]} "
            "or pass vocab_axis=None"
        )
    P = jax.sharding.PartitionSpec
    rows = P(batch_axes or None)
    reducers = {"weight_min": lax.pmin, "weight_max": lax.pmax}

    def per_shard(h, w, y, m):
        terms = _local_terms(spec, h, w, y, m, chunk_size, vocab_axis)
        if not batch_axes:
            return terms
        return {k: reducers.get(k, lax.psum)(v, batch_axes) for k, v in terms.items()}

    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(rows, P(None, vocab_axis), rows, rows),
        out_specs=P(),
    )(hidden, unembedding, labels, mask)


def fused_loss(
    hidden: jax.Array,
    unembedding: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    *,
    loss: str | L.LossSpec,
    chunk_size: int | None = None,
    batch_axes: tuple[str, ...] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    vocab_axis: str | None = None,
    **hparams: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The named loss of `hidden @ unembedding` without materialising the logits.

    hidden [..., D], unembedding [D, V], labels [...], mask [...] or None. `loss` is required
    ("ce", "focal", "mile" or a LossSpec): there is no default loss to get by accident. `hparams`
    are the loss's own (gamma, sigma, normalization). Same value and gradients (w.r.t. hidden and
    unembedding) as `mile.losses.<loss>_loss(hidden @ unembedding, labels, mask, ...)`.
    """
    spec = L.resolve_loss(loss, **hparams)
    terms = fused_loss_terms(
        spec,
        hidden,
        unembedding,
        labels,
        mask,
        chunk_size=chunk_size,
        batch_axes=batch_axes,
        mesh=mesh,
        vocab_axis=vocab_axis,
    )
    return L.finalize_terms(terms)


def fused_token_statistics(hidden, unembedding, labels, *, chunk_size: int | None = None):
    """Per-position nll and entropy (float32, labels.shape) of hidden @ unembedding, tile by
    tile, never holding the logits. For evaluation: no gradient flows."""
    hidden = L.check_float("hidden", hidden)
    labels = L.check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    mask = jnp.ones(labels.shape, jnp.float32)
    hidden_tiles, label_tiles, mask_tiles = _tiles(hidden, labels, mask, unembedding.shape[1], chunk_size)
    _, stats = _scan_statistics(
        L.get_loss("ce"), False, None, hidden_tiles, unembedding, label_tiles, mask_tiles
    )
    num_tokens = int(np.prod(labels.shape))
    return {
        k: lax.stop_gradient(stats[k].reshape(-1)[:num_tokens].reshape(labels.shape))
        for k in ("nll", "entropy")
    }
