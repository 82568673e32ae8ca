"""Per-token statistics of a model (one jit, shared with multiple choice) and perplexity by bucket.

``bucket_perplexity`` reports per bucket (and "overall") the token count, mean CE in nats,
perplexity exp(mean CE) and mean predictive entropy, bucketed by each position's *target*
(buckets from ``mile.token_frequency.assign_buckets``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from mile.fused import fused_token_statistics
from mile.token_frequency import BUCKET_NAMES


def make_stats_fn(model, *, chunk_size: int | None = None):
    """(inputs int[B,S], targets int[B,S]) -> {"nll", "entropy"} float32 [B,S], jit-compiled."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, inputs, targets):
        m = nnx.merge(graphdef, state)
        return fused_token_statistics(m(inputs), m.unembedding(), targets, chunk_size=chunk_size)

    def run(inputs, targets):
        out = stats(state, np.asarray(inputs, np.int32), np.asarray(targets, np.int32))
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    return run


def _summarise(tokens: float, nll: float, entropy: float) -> dict[str, Any]:
    if tokens == 0:
        return {"tokens": 0, "ce": None, "perplexity": None, "entropy": None}
    ce = nll / tokens
    return {
        "tokens": int(tokens),
        "ce": ce,
        "perplexity": math.exp(min(ce, 700.0)),
        "entropy": entropy / tokens,
    }


def _check_bucketing(targets: np.ndarray, bucket_of_type: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The bucket of every target, flattened, or a ValueError naming what does not fit."""
    if targets.max() >= len(bucket_of_type):
        raise ValueError(
            f"target id {targets.max()} is beyond the {len(bucket_of_type)} bucketed types; count tokens with this tokenizer."
        )
    b = np.asarray(bucket_of_type)[targets].reshape(-1)
    if b.max() >= len(names):
        raise ValueError(
            f"bucket id {b.max()} has no name in names={tuple(names)}; pass one name per bucket."
        )
    return b


def bucket_perplexities(
    model,
    batches: Iterable[Mapping[str, np.ndarray]],
    bucket_maps: Mapping[str, np.ndarray],
    names: Sequence[str] = BUCKET_NAMES,
    *,
    stats_fn=None,
) -> dict[str, dict]:
    """``bucket_perplexity`` for several bucketings at once, from one pass over ``batches``."""
    stats_fn = stats_fn or make_stats_fn(model)
    k = len(names)
    sums = {key: np.zeros((3, k)) for key in bucket_maps}  # rows: tokens, nll, entropy
    total = np.zeros(3)
    for batch in batches:
        targets = np.asarray(batch["targets"])
        mask = np.asarray(batch.get("mask", np.ones(targets.shape)), np.float64)
        out = stats_fn(batch["inputs"], targets)
        total += [mask.sum(), (mask * out["nll"]).sum(), (mask * out["entropy"]).sum()]
        m = mask.reshape(-1)
        rows = (m, m * out["nll"].reshape(-1), m * out["entropy"].reshape(-1))
        for key, bucket_of_type in bucket_maps.items():
            b = _check_bucketing(targets, bucket_of_type, names)
            for row, values in enumerate(rows):
                sums[key][row] += np.bincount(b, weights=values, minlength=k)
    results = {}
    for key in bucket_maps:
        res = {name: _summarise(*sums[key][:, i]) for i, name in enumerate(names)}
        res["overall"] = _summarise(*total)
        results[key] = res
    return results


def bucket_perplexity(
    model,
    batches: Iterable[Mapping[str, np.ndarray]],
    bucket_of_type: np.ndarray,
    names: Sequence[str] = BUCKET_NAMES,
    *,
    stats_fn=None,
) -> dict[str, dict]:
    """Per bucket of the target type and "overall": tokens, mean CE (nats), perplexity, entropy.

    ``batches`` yield ``{"inputs", "targets", "mask"}`` (as ``mile.data.eval_iterator``); sums
    are accumulated in float64 on the host.
    """
    return bucket_perplexities(model, batches, {"b": bucket_of_type}, names, stats_fn=stats_fn)["b"]


def format_perplexity_table(results: Mapping[str, Mapping[str, dict]]) -> str:
    lines = [f"{'mode':<11}{'bucket':<11}{'tokens':>10}{'ce':>9}{'ppl':>11}{'entropy':>9}"]
    for mode, res in results.items():
        for name, r in res.items():
            if r["tokens"]:
                lines.append(
                    f"{mode:<11}{name:<11}{r['tokens']:>10}{r['ce']:>9.4f}"
                    f"{r['perplexity']:>11.3f}{r['entropy']:>9.4f}"
                )
            else:
                lines.append(f"{mode:<11}{name:<11}{0:>10}{'-':>9}{'-':>11}{'-':>9}")
    return "\n".join(lines)
