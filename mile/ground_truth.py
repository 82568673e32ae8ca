"""Evaluation against the truth on the synthetic language (``data.source="synthetic"``).

    python -m mile.ground_truth --workdir W [--step N] [--eval-batches N] [--out FILE] [--overwrite]

At every held-out position (context ``c`` = the previous token, target ``y``) the true
distribution ``p(. | c)`` is known (``mile.data.synthetic``), so besides the model's CE we get:

* ``true_nll``: ``-log p(y | c)``, what a perfect model would pay; its mean is the irreducible loss;
* ``excess``: model CE minus ``true_nll`` (nats). Its mean over positions drawn from the
  language is an unbiased estimate of the mean KL, so it is >= 0 overall and per kind of context
  up to sampling noise. Per *target-frequency* bucket it need not be: a model that puts too
  much mass on rare types pays less than the truth at rare targets and more at frequent ones;
* ``kl``: ``KL(p(. | c) || q(. | c))`` computed exactly over the whole vocabulary (>= 0 at every
  position, and free of the target's sampling noise).

Positions are grouped two ways: by the training-frequency bucket of the target (the 80/15/5
cumulative buckets of ``mile.token_frequency``) and by the kind of context (deterministic /
multi-label / flat, whose true entropies do not overlap; see ``mile.data.synthetic``).
Each group reports tokens, CE, perplexity, true entropy, true nll, excess, KL and the model's
mean predictive entropy.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mile.data.synthetic import KINDS, Language, load_language
from mile import paths
from mile.jsonl import write_json
from mile.token_frequency import assign_buckets, token_counts

FREQUENCY_BUCKETS = ("easy", "medium", "difficult")
_FIELDS = ("tokens", "nll", "true_nll", "true_entropy", "kl", "entropy")


@functools.partial(jax.jit, static_argnums=0)
def _position_stats(graphdef, state, inputs, targets, true_logp):
    """Per position: model nll and entropy, true nll and entropy, and KL(truth || model)."""
    model = nnx.merge(graphdef, state)
    logits = (model(inputs) @ model.unembedding()).astype(jnp.float32)
    logq = jax.nn.log_softmax(logits, axis=-1)
    logp = true_logp[inputs]  # [B, S, V]
    p = jnp.exp(logp)
    possible = p > 0
    take = lambda x: jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    return {
        "nll": -take(logq),
        "entropy": -jnp.sum(jnp.exp(logq) * logq, axis=-1),
        "true_nll": -take(logp),
        "true_entropy": -jnp.sum(jnp.where(possible, p * logp, 0.0), axis=-1),
        "kl": jnp.sum(jnp.where(possible, p * (logp - logq), 0.0), axis=-1),
    }


def make_truth_stats_fn(model, language: Language):
    """(inputs int[B,S], targets int[B,S]) -> per-position float64 statistics (see module doc)."""
    graphdef, state = nnx.split(model)
    true_logp = jnp.asarray(language.log_probs(), jnp.float32)

    def run(inputs, targets):
        out = _position_stats(
            graphdef, state, np.asarray(inputs, np.int32), np.asarray(targets, np.int32), true_logp
        )
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    return run


def _summarise(sums: np.ndarray) -> dict[str, Any]:
    tokens = sums[0]
    if tokens == 0:
        return {"tokens": 0}
    mean = {name: sums[i] / tokens for i, name in enumerate(_FIELDS) if i}
    return {
        "tokens": int(tokens),
        "ce": mean["nll"],
        "perplexity": math.exp(min(mean["nll"], 700.0)),
        "true_nll": mean["true_nll"],
        "true_entropy": mean["true_entropy"],
        "excess": mean["nll"] - mean["true_nll"],
        "kl": mean["kl"],
        "entropy": mean["entropy"],
    }


def ground_truth_stats(
    stats_fn,
    batches: Iterable[Mapping[str, np.ndarray]],
    frequency_bucket: np.ndarray,
    context_kind: np.ndarray,
) -> dict[str, dict[str, dict]]:
    """{"frequency": {easy, medium, difficult, overall}, "context": {deterministic, multi-label,
    flat, overall}}, each a ``_summarise`` dict; sums are float64 on the host."""
    groupings = {"frequency": (frequency_bucket, FREQUENCY_BUCKETS), "context": (context_kind, KINDS)}
    sums = {g: np.zeros((len(names), len(_FIELDS))) for g, (_, names) in groupings.items()}
    total = np.zeros(len(_FIELDS))
    for batch in batches:
        inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
        mask = np.asarray(batch.get("mask", np.ones(targets.shape)), np.float64).reshape(-1)
        out = stats_fn(inputs, targets)
        columns = [mask] + [mask * out[f].reshape(-1) for f in _FIELDS[1:]]
        total += [c.sum() for c in columns]
        for g, (of_type, names) in groupings.items():
            ids = (targets if g == "frequency" else inputs).reshape(-1)
            group = np.asarray(of_type)[ids]
            for j, c in enumerate(columns):
                sums[g][:, j] += np.bincount(group, weights=c, minlength=len(names))[: len(names)]
    result = {}
    for g, (_, names) in groupings.items():
        result[g] = {name: _summarise(sums[g][i]) for i, name in enumerate(names)}
        result[g]["overall"] = _summarise(total)
    return result


def format_table(result: Mapping[str, Mapping[str, dict]]) -> str:
    head = f"{'grouping':<10}{'bucket':<14}{'tokens':>8}{'ce':>8}{'true H':>8}{'excess':>9}{'kl':>8}{'ppl':>10}"
    lines = [head]
    for g, res in result.items():
        for name, r in res.items():
            if not r["tokens"]:
                lines.append(f"{g:<10}{name:<14}{0:>8}")
                continue
            lines.append(
                f"{g:<10}{name:<14}{r['tokens']:>8}{r['ce']:>8.4f}{r['true_entropy']:>8.4f}"
                f"{r['excess']:>9.4f}{r['kl']:>8.4f}{r['perplexity']:>10.3f}"
            )
    return "\n".join(lines)


def evaluate_workdir(
    workdir: str,
    *,
    step: int | None = None,
    eval_batches: int | None = None,
    cut_points: Sequence[float] = (0.8, 0.95),
    check_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Restores a synthetic-language run and evaluates it on the whole held-out split (or
    ``eval_batches`` batches). ``check_step(step)`` runs right after the restore, before the slow
    part (the CLI refuses an existing output file there)."""
    from mile import data as mdata
    from mile.restore import load_trained_model, trained_data

    model, cfg, step = load_trained_model(workdir, step=step)
    if check_step is not None:
        check_step(step)
    if cfg.data.source != "synthetic":
        raise ValueError(
            f"{workdir} was trained on data.source={cfg.data.source!r}; ground truth exists only for 'synthetic'."
        )
    prepared = trained_data(cfg)
    language, _ = load_language(prepared.tokenizer_path)
    counts = token_counts(prepared)
    buckets = assign_buckets(counts, cut_points)
    batches = mdata.eval_iterator(cfg.data, prepared, num_batches=eval_batches)
    stats = ground_truth_stats(make_truth_stats_fn(model, language), batches, buckets, language.kind)
    return {
        "workdir": str(paths.path(workdir)),
        "step": int(step),
        "cut_points": list(cut_points),
        "bucket_types": np.bincount(buckets, minlength=len(FREQUENCY_BUCKETS)).tolist(),
        **stats,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mile.ground_truth", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a run trained with data.source=synthetic")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--eval-batches", type=int, default=None, help="held-out batches (default: one pass)")
    p.add_argument("--out", default=None, help="JSON output (default: <workdir>/eval/ground_truth_<N>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        if not paths.isdir(args.workdir):
            raise ValueError(f"workdir {args.workdir} does not exist; pass a trained --workdir.")
        def out_path(step: int) -> str:
            out = args.out or paths.join(args.workdir, "eval", f"ground_truth_{step}.json")
            if paths.exists(out) and not args.overwrite:
                raise ValueError(f"{out} exists; pass --overwrite or choose another --out.")
            return out

        result = evaluate_workdir(
            args.workdir, step=args.step, eval_batches=args.eval_batches, check_step=out_path
        )
        out = out_path(result["step"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"step {result['step']}: ground truth on the held-out split (nats)")
    print(format_table({g: result[g] for g in ("frequency", "context")}))
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
