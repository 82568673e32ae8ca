"""Tests for mile.qa: normalisation, exact match, k-shot prompts, converters, evaluate_qa."""

import json

import pytest
from flax import nnx

from mile import qa
from mile.generate import greedy_generate
from mile.model import Llama
from model_helpers import tiny_model_config


class CharTokenizer:
    """ASCII characters are their own ids; 0-3 are unk/bos/eos/pad. Records what it encodes."""

    unk_id, bos_id, eos_id, pad_id = 0, 1, 2, 3

    def __init__(self):
        self.encoded = []

    def encode(self, text):
        self.encoded.append(text)
        return [ord(c) if 4 <= ord(c) < 128 else self.unk_id for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i >= 4)


EXAMPLES = [
    {"question": "Where is the Eiffel Tower?", "answers": ["Paris", "Paris, France"]},
    {"question": "Largest planet?", "answers": ["Jupiter"]},
    {"question": "Author of Hamlet?", "answers": ["William Shakespeare", "Shakespeare"]},
    {"question": "H2O is?", "answers": ["water"]},
    {"question": "Capital of Italy?", "answers": ["Rome"]},
]
POOL = [{"question": f"pool question {i}?", "answers": [f"answer {i}"]} for i in range(10)]


@pytest.mark.parametrize(
    "prediction, aliases, expected",
    [
        ("The Eiffel Tower!", ["eiffel tower"], 1.0),
        ("an apple", ["Apple"], 1.0),
        ("a theory", ["theory"], 1.0),
        ("theater", ["ater"], 0.0),  # articles only as whole words
        ("U.S.A.", ["usa"], 1.0),
        ("  New   York\tCity ", ["new york city"], 1.0),
        ("Rome", ["Paris", "Roma", "rome."], 1.0),
        ("Rome", ["Paris", "Roma"], 0.0),
        ("“Jaws”", ["jaws"], 1.0),  # unicode quotes are punctuation too
        ("", ["x"], 0.0),
    ],
)
def test_exact_match(prediction, aliases, expected):
    assert qa.exact_match(prediction, aliases) == expected


def test_normalize_answer():
    assert qa.normalize_answer("The  Quick, Brown Fox!") == "quick brown fox"
    assert qa.normalize_answer("A an THE") == ""


def test_cut_at_stop():
    assert qa.cut_at_stop(" Paris, France.") == "Paris"
    assert qa.cut_at_stop(" Mr Smith\nQ: next") == "Mr Smith"
    assert qa.cut_at_stop(" no stop") == "no stop"
    assert qa.cut_at_stop(".") == ""


def test_prompt_format():
    assert qa.build_prompt("Why?") == "Q: Why?\nA:"
    assert qa.build_prompt("Why?", POOL[:2]) == (
        "Q: pool question 0?\nA: answer 0\n\nQ: pool question 1?\nA: answer 1\n\nQ: Why?\nA:"
    )


def test_k_shot_prompts_deterministic():
    a = qa.build_prompts(EXAMPLES, k_shot=3, seed=7, shots_pool=POOL)
    assert a == qa.build_prompts(EXAMPLES, k_shot=3, seed=7, shots_pool=POOL)
    assert a != qa.build_prompts(EXAMPLES, k_shot=3, seed=8, shots_pool=POOL)
    for prompt, ex in zip(a, EXAMPLES):
        blocks = prompt.split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"Q: {ex['question']}\nA:"
        assert all(b.startswith("Q: pool question ") for b in blocks[:3])
        assert len(set(blocks[:3])) == 3  # shots drawn without replacement
    assert qa.build_prompts(EXAMPLES, k_shot=0) == [f"Q: {e['question']}\nA:" for e in EXAMPLES]
    with pytest.raises(ValueError, match="k_shot=11 needs at least 11 shot examples, the shot pool has 10"):
        qa.build_prompts(EXAMPLES, k_shot=11, shots_pool=POOL)
    with pytest.raises(ValueError, match="k_shot=5 needs .* the task's other examples has 4"):
        qa.build_prompts(EXAMPLES, k_shot=5)


def test_k_shot_without_a_pool_uses_the_multiple_choice_rule():
    """No pool: each question's shots are other questions of the task, chosen exactly as multiple
    choice chooses them (same seed and example index -> the same other examples)."""
    from mile.multiple_choice import few_shot_prefix

    prompts = qa.build_prompts(EXAMPLES, k_shot=2, seed=5)
    # The task as multiple choice, worded so an MC shot renders exactly as a QA shot.
    mc = [
        {"context": f"Q: {e['question']}\nA:", "choices": [f" {e['answers'][0]}"], "gold": 0}
        for e in EXAMPLES
    ]
    for i, (prompt, ex) in enumerate(zip(prompts, EXAMPLES)):
        assert prompt == few_shot_prefix(mc, i, 2, seed=5) + f"Q: {ex['question']}\nA:"
        shots = prompt.split("\n\n")[:-1]
        assert len(shots) == 2 and not any(ex["question"] in shot for shot in shots)
    assert prompts != qa.build_prompts(EXAMPLES, k_shot=2, seed=6)


def test_load_examples_rejects_a_line_without_answers(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"question": "Q1", "answers": ["Paris"]}) + "\n")
    assert qa.load_examples(path) == [{"question": "Q1", "answers": ["Paris"]}]
    path.write_text(json.dumps({"question": "Q"}) + "\n")
    with pytest.raises(ValueError, match="answers"):
        qa.load_examples(path)


def test_evaluate_qa_plumbing(monkeypatch):
    """A scripted generator: checks prompts, padding of the last batch, cutting and scoring."""
    tok = CharTokenizer()
    scripted = {
        "Where is the Eiffel Tower?": " the PARIS, France",
        "Largest planet?": " Saturn.",
        "Author of Hamlet?": " Shakespeare\nQ:",
        "H2O is?": " Water",
        "Capital of Italy?": " rome",
    }
    calls = []

    def fake_generate(model, prompts, *, max_new_tokens, stop_ids, pad_id):
        calls.append(len(prompts))
        assert pad_id == tok.pad_id and max_new_tokens == 16
        outs = []
        for ids in prompts:
            question = tok.decode(ids)[len("Q: ") : -len("\nA:")]
            out = [ord(c) for c in scripted[question]] + [tok.eos_id]
            assert not stop_ids(out[:1]) and stop_ids([tok.eos_id])
            outs.append(out)
        return outs

    monkeypatch.setattr(qa, "greedy_generate", fake_generate)
    model = type("M", (), {"config": type("C", (), {"max_seq_len": 64})()})()
    result = qa.evaluate_qa(model, tok, EXAMPLES, batch_size=2)
    assert calls == [2, 2, 2]  # 5 examples, last batch filled to 2
    assert tok.encoded == [f"Q: {e['question']}\nA:" for e in EXAMPLES]
    assert [p["prediction"] for p in result["predictions"]] == [
        "the PARIS",
        "Saturn",
        "Shakespeare",
        "Water",
        "rome",
    ]
    assert [p["em"] for p in result["predictions"]] == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert result["em"] == pytest.approx(0.8) and result["n"] == 5


def test_evaluate_qa_end_to_end():
    """A tiny random model: predictions equal a direct greedy_generate from EOS + prompt (the
    conditioning rule), scoring is consistent."""
    cfg = tiny_model_config(vocab_size=128, num_layers=1, max_seq_len=128, init_std=0.3)  # ASCII ids
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tok = CharTokenizer()
    result = qa.evaluate_qa(
        model, tok, EXAMPLES, k_shot=1, seed=3, shots_pool=POOL, max_new_tokens=6, batch_size=4
    )
    prompts = qa.build_prompts(EXAMPLES, k_shot=1, seed=3, shots_pool=POOL)
    assert tok.encoded == prompts
    direct = greedy_generate(
        model, [[tok.eos_id] + tok.encode(p) for p in prompts], max_new_tokens=6, pad_id=tok.pad_id, stop_ids={tok.eos_id}
    )
    for pred, ids in zip(result["predictions"], direct):
        assert pred["prediction"] == qa.cut_at_stop(tok.decode(ids))
    # Make every other example's alias the model's own answer (shouted): EM follows.
    rescored = [
        dict(ex, answers=[p["prediction"].upper() + "!"] if i % 2 else ["no match at all"])
        for i, (ex, p) in enumerate(zip(EXAMPLES, result["predictions"]))
    ]
    again = qa.evaluate_qa(
        model, tok, rescored, k_shot=1, seed=3, shots_pool=POOL, max_new_tokens=6, batch_size=4
    )
    expected = [
        float(i % 2 == 1 or qa.normalize_answer(p["prediction"]) == "no match at all")
        for i, p in enumerate(result["predictions"])
    ]
    assert [p["em"] for p in again["predictions"]] == expected
    assert again["em"] == pytest.approx(sum(expected) / 5)
