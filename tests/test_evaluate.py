"""mile.evaluate: frequency buckets, bucket perplexity, multiple-choice scoring, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from model_helpers import tiny_model_config
from train_helpers import REPO as REPO_ROOT, tiny_config

from mile import data as mdata
from mile import evaluate as E
from mile import multiple_choice as MC
from mile import perplexity as P
from mile import qa as mqa
from mile import token_frequency as TF
from mile import train as T
from mile.model import Llama

VOCAB = 320


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny corpus, its tokenizer, and a workdir trained for 2 steps."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(tmp, **{"train.steps": 2, "train.eval_every": 100})
    workdir = tmp / "work"
    T.train(cfg, str(workdir))
    return cfg, mdata.prepare(cfg.data), workdir


@pytest.fixture(scope="module")
def model():
    # The tests' tiny model on the tokenizer's vocabulary; init_std 0.3 spreads the scores.
    return Llama(tiny_model_config(vocab_size=VOCAB, max_seq_len=64, init_std=0.3), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def stats_fn(model):
    return P.make_stats_fn(model)


def _log_softmax64(model, ids):
    z = np.asarray(model.logits(np.asarray(ids, np.int32)), np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# Buckets.
# --------------------------------------------------------------------------------------------


def test_assign_buckets_hand_example():
    # counts [50, 30, 10, 5, 3, 2, 0], total 100; ranked order is the ids 0..6.
    # cumulative: share of occurrences *before* each type = 0, .50, .80, .90, .95, .98, 1.0
    #   start < .80 -> easy: ids 0, 1; start < .95 -> medium: ids 2, 3; else difficult: 4, 5, 6.
    # rank: 6 seen types, start = rank / 6 = 0, .17, .33, .50, .67, .83, (unseen)
    #   < .80 -> easy: ids 0..4; < .95 -> medium: id 5; id 6 never seen -> difficult.
    counts = np.array([50, 30, 10, 5, 3, 2, 0])
    np.testing.assert_array_equal(TF.assign_buckets(counts), [0, 0, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(TF.assign_buckets(counts, mode="rank"), [0, 0, 0, 0, 0, 1, 2])
    # Order does not matter, ties go to the smaller id: [5, 50, 5, 40] ranks ids 1, 3, 0, 2 with
    # starts 0, .50, .90, .95 -> easy {1, 3}, medium {0}, difficult {2}.
    np.testing.assert_array_equal(TF.assign_buckets(np.array([5, 50, 5, 40])), [1, 0, 2, 0])


@pytest.mark.parametrize(
    "kwargs", [dict(cut_points=(0.95, 0.8)), dict(cut_points=(0.0, 0.5)), dict(mode="zipf")]
)
def test_assign_buckets_bad_input(kwargs):
    with pytest.raises(ValueError):
        TF.assign_buckets(np.array([3, 2, 1]), **kwargs)


def test_token_counts_match_the_training_tokenisation(trained, monkeypatch):
    cfg, prepared, _ = trained
    counts = TF.token_counts(prepared)
    source = prepared.open("train")
    docs = [source[i] for i in range(len(source))]
    expected = np.zeros(prepared.tokenizer.vocab_size, np.int64)
    for doc in docs:
        for t in prepared.tokenizer.encode(doc) + [prepared.tokenizer.eos_id]:
            expected[t] += 1
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int64 and counts[prepared.tokenizer.eos_id] == len(docs)
    assert os.path.isfile(TF.counts_cache_path(prepared, len(source)))
    # A second call reads the cache instead of tokenising again.
    monkeypatch.setattr(prepared.tokenizer.processor, "encode", None)
    np.testing.assert_array_equal(TF.token_counts(prepared), expected)


# --------------------------------------------------------------------------------------------
# Bucket perplexity.
# --------------------------------------------------------------------------------------------


def test_bucket_perplexity_matches_numpy(model, stats_fn):
    rng = np.random.default_rng(0)
    buckets = rng.integers(0, 3, VOCAB).astype(np.int32)
    batches = []
    for _ in range(3):
        tokens = rng.integers(0, VOCAB, (4, 17))
        mask = (rng.random((4, 16)) > 0.2).astype(np.float32)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask})
    res = P.bucket_perplexity(model, iter(batches), buckets, stats_fn=stats_fn)

    sums = np.zeros((4, 3))  # per bucket (+ overall): tokens, nll, entropy
    for b in batches:
        logp = _log_softmax64(model, b["inputs"])
        nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        ent = -(np.exp(logp) * logp).sum(-1)
        for k in range(3):
            m = b["mask"] * (buckets[b["targets"]] == k)
            sums[k] += [m.sum(), (m * nll).sum(), (m * ent).sum()]
        sums[3] += [b["mask"].sum(), (b["mask"] * nll).sum(), (b["mask"] * ent).sum()]
    for k, name in enumerate(TF.BUCKET_NAMES + ("overall",)):
        tokens, nll, ent = sums[k]
        assert res[name]["tokens"] == tokens
        np.testing.assert_allclose(res[name]["ce"], nll / tokens, rtol=1e-5)
        np.testing.assert_allclose(res[name]["perplexity"], np.exp(nll / tokens), rtol=1e-5)
        np.testing.assert_allclose(res[name]["entropy"], ent / tokens, rtol=1e-5)
    assert sum(res[n]["tokens"] for n in TF.BUCKET_NAMES) == res["overall"]["tokens"]


def test_empty_bucket_is_reported_not_nan(model, stats_fn):
    tokens = np.arange(17)[None] % 5
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((1, 16))}
    res = P.bucket_perplexity(model, [batch], np.zeros(VOCAB, np.int32), stats_fn=stats_fn)
    assert res["easy"]["tokens"] == 16 and res["difficult"] == {
        "tokens": 0,
        "ce": None,
        "perplexity": None,
        "entropy": None,
    }


# --------------------------------------------------------------------------------------------
# Multiple choice.
# --------------------------------------------------------------------------------------------


def _hand_loglik(model, tokenizer, context, choice):
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + choice)
    assert whole[: len(ctx)] == ctx  # a clean boundary, so the continuation is whole[len(ctx):]
    ids = np.array([tokenizer.eos_id] + whole)
    logp = _log_softmax64(model, ids[None, :-1])[0]
    picked = logp[np.arange(len(ids) - 1), ids[1:]]
    return picked[len(ctx) :].sum()


def test_mc_loglik_matches_hand_computation(trained, model, stats_fn):
    tok = trained[1].tokenizer
    ex = {
        "context": "The lord said unto moses",
        "choices": [" and aaron", " go forth into the land", " amen"],
        "gold": 1,
    }
    res = MC.score_multiple_choice(model, tok, [ex], stats_fn=stats_fn)
    expected = [_hand_loglik(model, tok, ex["context"], c) for c in ex["choices"]]
    np.testing.assert_allclose(res["loglik"][0], expected, rtol=1e-5)
    assert res["acc"] == float(np.argmax(expected) == 1)
    norm = np.array(expected) / [len(c) for c in ex["choices"]]
    assert res["acc_norm"] == float(np.argmax(norm) == 1)


# A short choice of byte-fallback tokens (many tokens, 2 chars) against a long choice of common
# words: the long one has the lower total but the higher per-character loglik, so length
# normalisation flips the choice (to the gold one).
SHORT, LONG = " \u00fc\u00df", " and the lord said unto moses"
FLIPPED = {"context": "And they went up", "choices": [SHORT, LONG], "gold": 1}


def test_acc_and_acc_norm_differ(trained, model, stats_fn):
    tok = trained[1].tokenizer
    hand = np.array([_hand_loglik(model, tok, FLIPPED["context"], c) for c in FLIPPED["choices"]])
    # The case really discriminates: the float64 logliks pick choice 0 raw, choice 1 per character.
    assert hand[0] > hand[1] and hand[0] / len(SHORT) < hand[1] / len(LONG)
    res = MC.score_multiple_choice(model, tok, [FLIPPED], stats_fn=stats_fn)
    np.testing.assert_allclose(res["loglik"][0], hand, rtol=1e-5)
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_padding_never_changes_a_score(trained, model, stats_fn):
    tok = trained[1].tokenizer
    short = {"context": "The lord", "choices": [" said", " went"], "gold": 0}
    longer = {
        "context": "And the people rested on the seventh day and blessed the name of the lord for ever",
        "choices": [" and ever amen", " unto moses"],
        "gold": 0,
    }
    alone = MC.score_multiple_choice(model, tok, [short], stats_fn=stats_fn, batch_size=1)["loglik"][0]
    mixed = MC.score_multiple_choice(model, tok, [longer, short], stats_fn=stats_fn, batch_size=8)["loglik"][1]
    np.testing.assert_allclose(mixed, alone, rtol=1e-5, atol=1e-5)
    # The two batches really had different padded lengths.
    requests = [MC.encode_request(tok, e["context"], e["choices"][0], 64) for e in (short, longer)]
    assert MC._bucket_len(len(requests[0][0]) - 1, 64) < MC._bucket_len(len(requests[1][0]) - 1, 64)


def test_long_contexts_are_cut_from_the_left(trained, model, stats_fn):
    tok = trained[1].tokenizer
    context = "and the lord said unto moses " * 30
    ids, n_cont = MC.encode_request(tok, context, "go forth", 64)
    assert len(ids) == 65 and ids[-n_cont:] == tok.encode(context + "go forth")[-n_cont:]
    res = MC.score_multiple_choice(
        model, tok, [{"context": context, "choices": ["go forth", "amen"], "gold": 0}], stats_fn=stats_fn
    )
    assert np.isfinite(res["loglik"]).all()


def _examples(n=6):
    words = ["lord", "moses", "aaron", "egypt", "land", "people", "flocks", "herds"]
    return [
        {
            "context": f"Question: who went up with {words[i]}?\nAnswer:",
            "choices": [" moses", " aaron"],
            "gold": i % 2,
        }
        for i in range(n)
    ]


def test_k_shot_is_deterministic_with_the_seed(trained, model, stats_fn):
    tok = trained[1].tokenizer
    examples = _examples()
    a = [MC.few_shot_prefix(examples, i, 2, seed=1) for i in range(len(examples))]
    assert a == [MC.few_shot_prefix(examples, i, 2, seed=1) for i in range(len(examples))]
    assert a != [MC.few_shot_prefix(examples, i, 2, seed=2) for i in range(len(examples))]
    for i, prefix in enumerate(a):
        assert examples[i]["context"] not in prefix and prefix.count("\n\n") == 2
    r1 = MC.score_multiple_choice(model, tok, examples, k_shot=2, seed=1, stats_fn=stats_fn)
    r2 = MC.score_multiple_choice(model, tok, examples, k_shot=2, seed=1, stats_fn=stats_fn)
    r0 = MC.score_multiple_choice(model, tok, examples, k_shot=0, stats_fn=stats_fn)
    assert r1 == r2 and r1["loglik"] != r0["loglik"] and r1["k_shot"] == 2
    with pytest.raises(ValueError, match="k_shot"):
        MC.few_shot_prefix(examples, 0, 6, seed=0)


def test_winogrande_partial_scoring_matches_hand_computation(trained, model, stats_fn):
    """Partial scoring: each option fills the blank in the context and the shared rest of the
    sentence is scored, so every choice has the same length and acc_norm is acc. Scored with the
    length-flipping example above, acc and acc_norm must then differ by exactly that example."""
    tok = trained[1].tokenizer
    # "The lord spoke to _ in the land." with the options moses / aaron, gold moses.
    wino = {
        "context": ["The lord spoke to moses", "The lord spoke to aaron"],
        "choices": [" in the land.", " in the land."],
        "gold": 0,
    }
    hand = [_hand_loglik(model, tok, ctx, " in the land.") for ctx in wino["context"]]
    wino_right = float(np.argmax(hand) == 0)
    res = MC.score_multiple_choice(model, tok, [wino], stats_fn=stats_fn)
    np.testing.assert_allclose(res["loglik"][0], hand, rtol=1e-5)
    assert res["acc"] == res["acc_norm"] == wino_right

    both = MC.score_multiple_choice(model, tok, [wino, FLIPPED], stats_fn=stats_fn)
    np.testing.assert_allclose(both["loglik"][0], hand, rtol=1e-5)
    assert both["n"] == 2
    assert both["acc"] == (wino_right + 0.0) / 2 and both["acc_norm"] == (wino_right + 1.0) / 2


@pytest.mark.parametrize(
    "line",
    [
        '{"context": "a", "choices": [" b", " c"]}',
        "not json",
        '{"context": "a", "choices": [" b", " c"], "gold": 2}',
        '{"context": "a", "choices": [" b"], "gold": 0}',
    ],
)
def test_load_task_rejects_bad_lines(tmp_path, line):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "a", "choices": [" b", " c"], "gold": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match="task.jsonl:2"):
        MC.load_task(path)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def test_cli_end_to_end(trained, tmp_path, capsys):
    _, _, workdir = trained
    task = tmp_path / "toy_mc.jsonl"
    task.write_text("".join(json.dumps(e) + "\n" for e in _examples()))
    argv = ["--workdir", str(workdir), "--mc", str(task), "--k-shot", "1", "--eval-batches", "2"]
    assert E.main(argv) == 0
    out = workdir / "eval" / "step_2.json"
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["cut_points"] == [0.8, 0.95]
    for mode in ("cumulative", "rank"):
        res = result["perplexity"][mode]
        assert set(res) == {"easy", "medium", "difficult", "overall"}
        assert res["overall"]["tokens"] == 2 * 8 * 32  # eval batches x batch x seq_len
        assert sum(res[n]["tokens"] for n in TF.BUCKET_NAMES) == res["overall"]["tokens"]
    assert result["mc"]["toy_mc"]["n"] == 6 and result["mc"]["toy_mc"]["k_shot"] == 1
    printed = capsys.readouterr().out
    assert "difficult" in printed and "toy_mc" in printed

    # Never overwrites silently; bad input is a one-line error and exit status 2.
    assert E.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert E.main(["--workdir", str(workdir), "--mc", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and err.count("\n") == 1
    assert E.main(["--workdir", str(tmp_path / "missing")]) == 2
    # A step that does not exist: one line naming the steps there are (was a FileNotFoundError).
    capsys.readouterr()
    assert E.main(["--workdir", str(workdir), "--step", "4", "--out", str(tmp_path / "z.json")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: no checkpoint for step 4 in {workdir}; pass --step with one of 2\n"
    )
    from mile import export

    assert export.main(["--workdir", str(workdir), "--step", "99", "--out", str(tmp_path / "hf")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: no checkpoint for step 99 in {workdir}; pass --step with one of 2\n"
    )
    assert (
        E.main(["--workdir", str(workdir), "--cut-points", "0.9,0.5", "--out", str(tmp_path / "y.json")]) == 2
    )
    assert not os.path.exists(tmp_path / "x.json")


def test_cli_skips_partial_and_refuses_corrupt_checkpoints(trained, tmp_path, capsys):
    """A step directory half-deleted by a kill is not a step; a damaged one is one error line."""
    import shutil

    _, _, workdir = trained
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    shutil.copytree(copy / "checkpoints" / "2", copy / "checkpoints" / "1")
    os.remove(copy / "checkpoints" / "1" / "_CHECKPOINT_METADATA")  # as orbax's deleter leaves it
    shutil.rmtree(copy / "checkpoints" / "1" / "state")
    out = str(tmp_path / "out.json")
    assert E.main(["--workdir", str(copy), "--step", "1", "--out", out]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint step 1 in {copy / 'checkpoints'} is incomplete (no _CHECKPOINT_METADATA, state/); "
        "pass --step with one of 2\n"
    )
    meta = copy / "checkpoints" / "2" / "data_state" / "metadata"
    assert '"streams"' in meta.read_text()  # the data positions the trainer saved
    meta.write_text(meta.read_text().replace('"streams"', '"streamS"'))
    assert E.main(["--workdir", str(copy), "--out", out]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint step 2 in {copy / 'checkpoints'} failed its integrity check (data_state differs "
        "from its checksum); there is no other complete checkpoint\n"
    )
    assert not os.path.exists(out)


def test_cli_closed_book_qa(trained, tmp_path, capsys, monkeypatch):
    _, _, workdir = trained
    qa = tmp_path / "toy_qa.jsonl"
    qa.write_text(json.dumps({"question": "Who went up?", "answers": ["moses"]}) + "\n")
    out = tmp_path / "qa.json"
    argv = ["--workdir", str(workdir), "--qa", str(qa), "--eval-batches", "1", "--out", str(out)]
    assert E.main(argv) == 0
    result = json.loads(out.read_text())["qa"]["toy_qa"]
    assert result["n"] == 1 and len(result["predictions"]) == 1
    said = result["predictions"][0]["prediction"]
    assert result["em"] == result["predictions"][0]["em"] == float(mqa.normalize_answer(said) == "moses")

    # A hand-checked score: the same question twice, once with the model's own answer among the
    # aliases (with an article, shouted and punctuated: it still matches), once with an answer it
    # cannot have given. EM is exactly 1 and 0, the task's EM exactly 0.5.
    assert said != "no such answer"
    qa.write_text(
        json.dumps({"question": "Who went up?", "answers": ["no such answer", f"The {said.upper()}!"]}) + "\n"
        + json.dumps({"question": "Who went up?", "answers": ["no such answer"]}) + "\n"
    )
    assert E.main(argv + ["--overwrite"]) == 0
    result = json.loads(out.read_text())["qa"]["toy_qa"]
    assert [p["prediction"] for p in result["predictions"]] == [said, said]
    assert [p["em"] for p in result["predictions"]] == [1.0, 0.0]
    assert result["n"] == 2 and result["em"] == 0.5

    # The README's k-shot command: shots come from the task's other questions (it used to fail
    # with "k_shot=5 needs shots_pool").
    questions = [{"question": f"Who went up {i}?", "answers": [f"moses {i}"]} for i in range(4)]
    qa.write_text("".join(json.dumps(q) + "\n" for q in questions))
    seen = []
    real = mqa.build_prompts
    monkeypatch.setattr(mqa, "build_prompts", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    assert E.main(argv + ["--k-shot", "2", "--seed", "3", "--overwrite"]) == 0
    assert seen == [real(questions, k_shot=2, seed=3)]
    assert all(p.count("Q: ") == 3 for p in seen[0])
    assert json.loads(out.read_text())["qa"]["toy_qa"]["n"] == 4

    qa.write_text(json.dumps({"question": "Who went up?"}) + "\n")  # no answers
    assert E.main(argv + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{qa}:1" in err[0] and "answers" in err[0]


def test_harness_cli_on_the_workdir_matches_mile_evaluate(trained, tmp_path):
    """python -m mile.lm_eval --model mile on a trained workdir (own process, the harness's own
    CLI, a local task file) gives the log-likelihoods and acc of mile.evaluate --mc on that file."""
    pytest.importorskip("lm_eval", reason="needs requirements-eval.txt")
    from mile import lm_eval as MLE

    _, _, workdir = trained
    TASK = "mile_cli_mc"
    data = tmp_path / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in _examples(8)))
    MLE.write_mc_task(tmp_path / "tasks", TASK, data)
    out = tmp_path / "own.json"
    argv = ["--workdir", str(workdir), "--mc", str(data), "--eval-batches", "1", "--out", str(out)]
    argv += ["--tasks", TASK, "--include-path", str(tmp_path / "tasks"), "--batch-size", "8"]
    assert E.main(argv) == 0
    result = json.loads(out.read_text())
    own = result["mc"][TASK]
    assert len({tuple(ll) for ll in own["loglik"]}) > 1  # examples really differ

    env = dict(os.environ, PYTHONPATH=REPO_ROOT, XLA_FLAGS="", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "mile.lm_eval", "--model", "mile",
        "--model_args", f"workdir={workdir},step=2", "--batch_size", "8",
        "--tasks", TASK, "--include_path", str(tmp_path / "tasks"),
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples_file,) = list((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    harness_ll = np.array([[float(r[0]) for r in s["filtered_resps"]] for s in samples])
    np.testing.assert_allclose(harness_ll, own["loglik"], rtol=0, atol=1e-4)
    (results_file,) = list((tmp_path / "out").rglob("results_*.json"))
    metrics = json.loads(results_file.read_text())["results"][TASK]
    assert metrics["acc,none"] == own["acc"] and metrics["acc_norm,none"] == own["acc_norm"]
    # mile.evaluate --tasks: the same harness run in-process on the model it restored.
    assert result["harness"][TASK]["acc,none"] == own["acc"]
    assert result["harness"][TASK]["acc_norm,none"] == own["acc_norm"]
