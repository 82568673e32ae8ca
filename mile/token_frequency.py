"""Token-type counts over the training split, their cache, and frequency buckets.

``token_counts`` counts every token type over the *training* split, tokenised as the trainer
does (each document's ids followed by EOS), and caches the counts in the data cache under a key
of (tokenizer fingerprint, prepared data key, number of documents).

``assign_buckets`` ranks types by count, descending, ties broken by the smaller id first, and
gives each type the bucket in which its span *starts*:

* ``mode="cumulative"`` (default, the paper's reading): ``start = occurrences of all types ranked
  before it / all occurrences``; bucket 0 (easy) if ``start < cut[0]``, 1 (medium) if
  ``start < cut[1]``, else 2 (difficult). So easy covers at least 80% of occurrences: the type
  straddling the 80% line is easy. Never-seen types start at 1.0 -> difficult.
* ``mode="rank"``: ``start = rank / number of seen types`` (rank 0-based), same comparisons; so
  the first ceil(0.80 * n_seen) seen types are easy. Never-seen types -> difficult.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from mile import paths

BUCKET_NAMES = ("easy", "medium", "difficult")


def counts_cache_path(prepared, source_len: int) -> str:
    """Where the counts of this (tokenizer, training split) pair are cached."""
    key = "|".join([prepared.tokenizer.fingerprint, prepared.key, str(source_len)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return paths.join(prepared.cache_dir, "token_counts", f"{digest}.npy")


def token_counts(prepared, *, batch_docs: int = 1024) -> np.ndarray:
    """int64[tokenizer vocab] occurrences of each type in the training split (docs + EOS each)."""
    source = prepared.open("train")
    path = counts_cache_path(prepared, len(source))
    if paths.isfile(path):
        with paths.open(path, "rb") as f:
            return np.load(f)
    tokenizer = prepared.tokenizer
    vocab = tokenizer.vocab_size
    counts = np.zeros(vocab, np.int64)
    for start in range(0, len(source), batch_docs):
        docs = source.__getitems__(list(range(start, min(start + batch_docs, len(source)))))
        if docs and isinstance(docs[0], str):
            docs = tokenizer.encode_batch(docs)  # the ids DocumentIds gives, one call per batch
        flat = np.concatenate([np.asarray(doc, np.int64) for doc in docs] + [np.zeros(0, np.int64)])
        counts += np.bincount(flat, minlength=vocab)[:vocab]
    counts[tokenizer.eos_id] += len(source)  # the separator after every document
    with paths.replacing(path) as tmp:  # a present cache file is always complete
        np.save(tmp, counts)
    return counts


def check_cut_points(cut_points: Sequence[float]) -> tuple[float, ...]:
    """The cut points as floats, or a ValueError unless they are increasing fractions in (0, 1)."""
    cuts = tuple(float(c) for c in cut_points)
    if not cuts or any(not 0.0 < c < 1.0 for c in cuts) or list(cuts) != sorted(set(cuts)):
        raise ValueError(f"cut_points={cut_points} must be increasing fractions in (0, 1); e.g. 0.8,0.95.")
    return cuts


def assign_buckets(
    counts: np.ndarray, cut_points: Sequence[float] = (0.80, 0.95), mode: str = "cumulative"
) -> np.ndarray:
    """int32[V] bucket of every type: 0 = easy (frequent) ... len(cut_points) = difficult (rare)."""
    cuts = check_cut_points(cut_points)
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"counts must be a 1-D array of non-negative integers, got shape {counts.shape}.")
    order = np.lexsort((np.arange(len(counts)), -counts))  # count descending, then id ascending
    ranked = counts[order]
    if mode == "cumulative":
        total = ranked.sum()
        if total == 0:
            raise ValueError("counts are all zero; count tokens over a non-empty training split.")
        start = (np.cumsum(ranked) - ranked) / total
    elif mode == "rank":
        seen = int((ranked > 0).sum())
        if seen == 0:
            raise ValueError("counts are all zero; count tokens over a non-empty training split.")
        start = np.arange(len(ranked)) / seen
    else:
        raise ValueError(f"mode={mode!r} is not 'cumulative' or 'rank'.")
    ranked_bucket = np.searchsorted(np.asarray(cuts), start, side="right").astype(np.int32)
    ranked_bucket[ranked == 0] = len(cuts)  # never seen -> the rarest bucket
    buckets = np.empty(len(counts), np.int32)
    buckets[order] = ranked_bucket
    return buckets
