"""Multiple choice scored by log-likelihood (lm-evaluation-harness style).

A task file is JSONL, one example per line::

    {"context": "Question: ...\\nAnswer:", "choices": [" yes", " no"], "gold": 0}

``context`` may also be a list with one context per choice (WinoGrande's partial scoring:
the options differ in the context and the continuation is shared). ``gold`` indexes
``choices``. Each choice's score is the summed log-likelihood of its continuation tokens:

* Tokenisation: ``mile.conditioning`` (one EOS in front, the harness's split of context and
  continuation), so this scorer, ``python -m mile.lm_eval`` and the HF export through the
  harness score the same tokens.
* ``acc``: argmax of the summed log-likelihood; ``acc_norm``: argmax of log-likelihood / number
  of characters in the choice (lm-eval's length normalisation). Ties go to the lower index.
* k-shot: ``k`` examples drawn by ``mile.fewshot.draw_shots`` (seed ``[seed, example index]``,
  the rule QA uses too) from the other examples of the task, or from ``shot_pool`` when given,
  each rendered ``{context}{gold choice}\\n\\n`` and prepended to the context.
* Batching: model inputs are right-padded to power-of-two lengths (at least 16, at most
  ``max_seq_len``) and rows to a fixed batch size, so few shapes are compiled.
  Attention is causal, so right padding never changes a score. Too long contexts are cut from
  the left.

Benchmarks (HellaSwag, PIQA, ...) run in lm-evaluation-harness with its own prompts
(``python -m mile.lm_eval``); this scorer is the harness-free check on local task files, and
``mile.lm_eval.write_mc_task`` turns such a file into a harness task.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from mile.conditioning import split_request
from mile.fewshot import draw_shots
from mile.jsonl import read_records
from mile.perplexity import make_stats_fn

_MIN_MC_LEN = 16

# ---------------------------------------------------------------------------------------------
# Task files.
# ---------------------------------------------------------------------------------------------


def _check_example(ex: Any, where: str) -> dict:
    if not isinstance(ex, dict) or not {"context", "choices", "gold"} <= set(ex):
        raise ValueError(f"{where}: expected an object with context, choices, gold; fix the task file.")
    choices, gold, context = ex["choices"], ex["gold"], ex["context"]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise ValueError(f"{where}: choices must be a list of >= 2 non-empty strings; fix the task file.")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: gold={gold!r} must be an int index into the {len(choices)} choices.")
    if isinstance(context, list):
        if len(context) != len(choices) or not all(isinstance(c, str) for c in context):
            raise ValueError(f"{where}: a context list needs one string per choice; fix the task file.")
    elif not isinstance(context, str):
        raise ValueError(f"{where}: context must be a string (or a list, one per choice).")
    return {"context": context, "choices": choices, "gold": gold}


def load_task(path: str | os.PathLike) -> list[dict]:
    """Examples of a multiple-choice JSONL task file (schema in the module docstring)."""
    return [_check_example(record, where) for where, record in read_records(path, "task")]


# ---------------------------------------------------------------------------------------------
# Prompts and requests.
# ---------------------------------------------------------------------------------------------


def _contexts(ex: Mapping) -> list[str]:
    c = ex["context"]
    return list(c) if isinstance(c, list) else [c] * len(ex["choices"])


def _shot_text(ex: Mapping) -> str:
    return _contexts(ex)[ex["gold"]] + ex["choices"][ex["gold"]] + "\n\n"


def few_shot_prefix(
    examples: Sequence[Mapping],
    index: int,
    k_shot: int,
    seed: int,
    shot_pool: Sequence[Mapping] | None = None,
) -> str:
    """The k demonstrations for example ``index`` (mile.fewshot's rule, shared with QA)."""
    return "".join(_shot_text(ex) for ex in draw_shots(examples, index, k_shot, seed, shot_pool))


def encode_request(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """(token ids incl. leading EOS, number of trailing continuation tokens), split by
    mile.conditioning (the harness's cut) and left-truncated to ``max_len + 1`` tokens (model
    inputs are the first ``max_len``)."""
    ctx, cont = split_request(tokenizer, context, continuation)
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens; give non-empty choices.")
    if len(cont) > max_len:
        raise ValueError(
            f"continuation has {len(cont)} tokens, more than max_seq_len={max_len}; shorten the choices."
        )
    return (ctx + cont)[-(max_len + 1) :], len(cont)


# ---------------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------------


def _bucket_len(n: int, cap: int) -> int:
    return min(cap, max(_MIN_MC_LEN, 1 << (n - 1).bit_length()))


def score_requests(
    stats_fn, requests: Sequence[tuple[list[int], int]], *, max_len: int, batch_size: int = 16
) -> np.ndarray:
    """float64 summed log-likelihood of each request's continuation tokens."""
    # Sorted by length so each batch pads to about its own longest request.
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    scores = np.zeros(len(requests))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seq = _bucket_len(max(len(requests[i][0]) for i in rows) - 1, max_len)
        inputs = np.zeros((batch_size, seq), np.int32)  # padding rows/columns: masked out below
        targets = np.zeros((batch_size, seq), np.int32)
        mask = np.zeros((batch_size, seq))
        for r, i in enumerate(rows):
            ids, n_cont = requests[i]
            n = len(ids) - 1
            inputs[r, :n], targets[r, :n] = ids[:-1], ids[1:]
            mask[r, n - n_cont : n] = 1.0
        nll = stats_fn(inputs, targets)["nll"]
        for r, i in enumerate(rows):
            scores[i] = -(nll[r] * mask[r]).sum()
    return scores


def score_multiple_choice(
    model,
    tokenizer,
    examples: Sequence[Mapping],
    *,
    k_shot: int = 0,
    seed: int = 0,
    shot_pool: Sequence[Mapping] | None = None,
    batch_size: int = 16,
    max_len: int | None = None,
    stats_fn=None,
) -> dict[str, Any]:
    """{"acc", "acc_norm", "n", "k_shot", "loglik": [[per choice] per example]}."""
    examples = [_check_example(e, f"example {i}") for i, e in enumerate(examples)]
    max_len = max_len or model.config.max_seq_len
    stats_fn = stats_fn or make_stats_fn(model)
    requests = []
    for i, ex in enumerate(examples):
        prefix = few_shot_prefix(examples, i, k_shot, seed, shot_pool)
        for context, choice in zip(_contexts(ex), ex["choices"]):
            requests.append(encode_request(tokenizer, prefix + context, choice, max_len))
    scores = score_requests(stats_fn, requests, max_len=max_len, batch_size=batch_size)
    logliks, acc, acc_norm, pos = [], 0, 0, 0
    for ex in examples:  # the requests are in example order, len(choices) each
        ll = scores[pos : pos + len(ex["choices"])]
        pos += len(ex["choices"])
        lengths = np.array([len(c) for c in ex["choices"]], np.float64)
        acc += int(np.argmax(ll) == ex["gold"])
        acc_norm += int(np.argmax(ll / lengths) == ex["gold"])
        logliks.append([float(x) for x in ll])
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "k_shot": k_shot, "loglik": logliks}


def format_mc_table(results: Mapping[str, dict]) -> str:
    lines = [f"{'task':<24}{'n':>6}{'k':>4}{'acc':>8}{'acc_norm':>10}"]
    for name, r in results.items():
        lines.append(f"{name:<24}{r['n']:>6}{r['k_shot']:>4}{r['acc']:>8.4f}{r['acc_norm']:>10.4f}")
    return "\n".join(lines)
