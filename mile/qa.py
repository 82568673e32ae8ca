"""Closed-book QA by greedy generation and exact match (lm-evaluation-harness TriviaQA style).

Task file: JSONL, one example per line::

    {"question": "Which city hosts the Eiffel Tower?", "answers": ["Paris", "Paris, France"]}

`answers` is the alias list (an example scores 1 if the normalised prediction equals any
normalised alias); answers[0] is the canonical answer, used as the target in k-shot prompts.
TriviaQA, WebQuestions and NQ-Open themselves run in lm-evaluation-harness (python -m mile.lm_eval).

Prompt: k shots "Q: {q}\\nA: {a}\\n\\n", then "Q: {question}\\nA:". The shots follow the rule
multiple choice uses (mile.fewshot.draw_shots): drawn without replacement, seeded by
[seed, example index], from `shots_pool` when given, else from the task's other examples.
The prompt is conditioned on one EOS in front (mile.conditioning). The model generates
greedily; the decoded text is cut at the first newline, period or comma and compared after
`normalize_answer`.
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from typing import Sequence

from mile.conditioning import encode_document
from mile.fewshot import draw_shots
from mile.jsonl import read_records
from mile.generate import greedy_generate

STOP_CHARS = ("\n", ".", ",")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = s.lower()
    s = "".join(
        ch for ch in s if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, aliases: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised alias, else 0.0."""
    if isinstance(aliases, str):
        aliases = [aliases]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(alias) for alias in aliases))


def cut_at_stop(text: str) -> str:
    """The text before the first newline, period or comma, stripped."""
    cut = min((i for i in (text.find(c) for c in STOP_CHARS) if i >= 0), default=len(text))
    return text[:cut].strip()


def format_shot(example: dict) -> str:
    return f"Q: {example['question']}\nA: {example['answers'][0]}\n\n"


def build_prompt(question: str, shots: Sequence[dict] = ()) -> str:
    return "".join(format_shot(s) for s in shots) + f"Q: {question}\nA:"


def build_prompts(
    examples: Sequence[dict], *, k_shot: int = 0, seed: int = 0, shots_pool: Sequence[dict] | None = None
) -> list[str]:
    """One prompt per example; the same (examples, k_shot, seed, pool) give the same prompts.
    Shots come from `shots_pool`, or from the other examples when it is None (mile.fewshot)."""
    return [
        build_prompt(ex["question"], draw_shots(examples, i, k_shot, seed, shots_pool))
        for i, ex in enumerate(examples)
    ]


def evaluate_qa(
    model,
    tokenizer,
    examples: Sequence[dict],
    *,
    k_shot: int = 0,
    seed: int = 0,
    shots_pool: Sequence[dict] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> dict:
    """Greedy-generate an answer per example and score exact match.

    Returns {"em": mean EM, "n": number of examples, "predictions": [{"question",
    "prediction", "answers", "em"}, ...]} in the order of `examples`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    prompts = build_prompts(examples, k_shot=k_shot, seed=seed, shots_pool=shots_pool)
    # Keep the end of over-long prompts (the question), as the harness truncates from the left.
    room = model.config.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
            f"model.max_seq_len={model.config.max_seq_len}; lower max_new_tokens"
        )
    encoded = [encode_document(tokenizer, p)[-room:] for p in prompts]
    eos = tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else eos

    def stop(ids):
        return ids[-1] == eos or any(c in tokenizer.decode(ids) for c in STOP_CHARS)

    generations = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        # Fill the last batch with copies so every batch has one shape (one compilation).
        filled = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out = greedy_generate(model, filled, max_new_tokens=max_new_tokens, stop_ids=stop, pad_id=pad)
        generations.extend(out[: len(chunk)])

    predictions = []
    for ex, ids in zip(examples, generations):
        ids = [t for t in ids if t != eos]
        pred = cut_at_stop(tokenizer.decode(ids))
        predictions.append(
            {
                "question": ex["question"],
                "prediction": pred,
                "answers": list(ex["answers"]),
                "em": exact_match(pred, ex["answers"]),
            }
        )
    n = len(predictions)
    em = sum(p["em"] for p in predictions) / n if n else 0.0
    return {"em": em, "n": n, "predictions": predictions}


# ------------------------------------------------------------------------- task files
def load_examples(path: str | os.PathLike) -> list[dict]:
    """Read a task JSONL file, checking each line has a question and a non-empty answer list."""
    examples = []
    for where, ex in read_records(path, "QA task"):
        answers = ex.get("answers")
        if not isinstance(ex.get("question"), str) or not isinstance(answers, list) or not answers:
            raise ValueError(
                f"{where} needs 'question' (str) and a non-empty 'answers' list; "
                "fix the task file"
            )
        examples.append({"question": ex["question"], "answers": list(answers)})
    return examples
