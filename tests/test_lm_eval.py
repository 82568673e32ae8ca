"""mile.lm_eval: the harness backend, the HF export through the harness and mile's own evaluator
score a local task alike; rolling log-likelihood and greedy generation match the HF backend."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="needs requirements-eval.txt")
pytest.importorskip("accelerate", reason="needs requirements-eval.txt")

import lm_eval  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from model_helpers import tiny_model_config  # noqa: E402

from mile import export  # noqa: E402
from mile import lm_eval as MLE  # noqa: E402
from mile import multiple_choice as MC  # noqa: E402
from mile.data import tokenizer as mtok  # noqa: E402
from mile.model import Llama  # noqa: E402

VOCAB = 320
TASK = "mile_tiny_mc"
WORDS = "the lord said unto moses and aaron go forth into land which i shall give thee people".split()


def _task_examples(n=12, seed=0):
    """Generated multiple choice: choices of 1-4 words, one gold per example."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        context = " ".join(rng.choice(WORDS, size=rng.integers(3, 7))).capitalize()
        if i % 3 == 0:
            context = f"Question: {context}?\nAnswer:"
        choices = [" " + " ".join(rng.choice(WORDS, size=k)) for k in rng.permutation([1, 2, 3, 4])]
        examples.append({"context": context, "choices": choices, "gold": int(rng.integers(4))})
    return examples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tokenizer, a random tiny model (init 0.3: scores far apart), its HF export, a local task."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(WORDS, size=30)).capitalize() + "." for _ in range(200)]
    tok = mtok.train_or_load(docs, corpus_fingerprint="lm-eval-test", vocab_size=VOCAB, cache_dir=tmp / "tok")
    cfg = tiny_model_config(vocab_size=VOCAB, max_seq_len=64, init_std=0.3)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    hf_dir = export.export_hf(model, cfg, tok.path, tmp / "hf")
    data = tmp / f"{TASK}.jsonl"
    examples = _task_examples()
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    MLE.write_mc_task(tmp / "tasks", TASK, data)
    return dict(tok=tok, model=model, hf_dir=hf_dir, examples=examples, tasks=tmp / "tasks", data=data)


def _harness(setup, model, **kwargs):
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(setup["tasks"])),
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    logliks = np.array([[r[0] for r in s["filtered_resps"]] for s in samples])
    metrics = out["results"][TASK]
    return logliks, metrics["acc,none"], metrics["acc_norm,none"]


@pytest.fixture(scope="module")
def hf_route(setup):
    return _harness(
        setup, "hf", model_args=f"pretrained={setup['hf_dir']},dtype=float32", device="cpu", batch_size=8
    )


def test_three_routes_agree(setup, hf_route):
    mile_ll, mile_acc, mile_norm = _harness(setup, MLE.MileLM(model=setup["model"], tokenizer=setup["tok"]))
    hf_ll, hf_acc, hf_norm = hf_route
    own = MC.score_multiple_choice(setup["model"], setup["tok"], MC.load_task(setup["data"]))
    own_ll = np.array(own["loglik"])
    assert mile_ll.shape == hf_ll.shape == own_ll.shape == (12, 4)
    # Real, well separated scores (a route that dropped the EOS moves them by far more than 1e-4).
    assert np.ptp(hf_ll, axis=1).min() > 0.1
    print(
        f"max |d loglik|: mile backend vs hf {np.abs(mile_ll - hf_ll).max():.1e}, mile.evaluate vs hf "
        f"{np.abs(own_ll - hf_ll).max():.1e}, backend vs mile.evaluate {np.abs(mile_ll - own_ll).max():.1e}; "
        f"acc {mile_acc:.3f}, acc_norm {mile_norm:.3f}"
    )
    np.testing.assert_allclose(mile_ll, hf_ll, rtol=0, atol=1e-4)
    np.testing.assert_allclose(own_ll, hf_ll, rtol=0, atol=1e-4)
    assert mile_acc == hf_acc == own["acc"]
    assert mile_norm == hf_norm == own["acc_norm"]


def test_export_tokenizer_puts_one_eos_in_front(setup):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(setup["hf_dir"])
    text = "The lord said unto moses"
    assert hf_tok(text)["input_ids"] == [setup["tok"].eos_id] + setup["tok"].encode(text)
    gen = json.loads((setup["hf_dir"] / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == setup["tok"].eos_id


def _hf_lm(setup, **kwargs):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(setup["hf_dir"]), dtype="float32", device="cpu", batch_size=4, **kwargs)


def test_rolling_loglikelihood_and_generation_match_the_hf_backend(setup, tmp_path):
    mile_lm = MLE.MileLM(model=setup["model"], tokenizer=setup["tok"], batch_size=4)
    hf_lm = _hf_lm(setup)
    # Longer than max_seq_len=64, so several windows; the first token is predicted from EOS.
    texts = [" ".join(WORDS * 6), "Moses said unto the lord"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    assert len(setup["tok"].encode(texts[0])) > 64
    mine = mile_lm.loglikelihood_rolling(rolling)
    # lm-eval 0.4.13's hf backend tokenises a rolling text with the tokenizer's begin-of-text
    # (EOS here) and then puts its prefix token (EOS again) before it, scoring an extra token;
    # add_bos_token=False gives the one-EOS rule (README, Evaluation).
    plain = _hf_lm(setup, add_bos_token=False).loglikelihood_rolling(rolling)
    np.testing.assert_allclose(mine, plain, rtol=0, atol=1e-4)
    assert np.abs(np.subtract(mine, hf_lm.loglikelihood_rolling(rolling))).min() > 1.0
    # Greedy text: a model whose special and byte-fallback logits are 0, so that it writes words
    # (a random model writes bytes, whose partial UTF-8 the two tokenizers decode differently).
    cfg = tiny_model_config(vocab_size=VOCAB, max_seq_len=64, init_std=0.3)
    wordy = Llama(cfg, rngs=nnx.Rngs(0))
    wordy.head[...] = wordy.head[...].at[:, : 4 + 256].set(0.0)
    hf_dir = export.export_hf(wordy, cfg, setup["tok"].path, tmp_path / "wordy")
    wordy_lm = MLE.MileLM(model=wordy, tokenizer=setup["tok"], batch_size=2)
    from lm_eval.models.huggingface import HFLM

    hf_wordy = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=2)
    prompts = ["The lord said unto", "Question: who went up?\nAnswer:", "And aaron"]
    gen_kwargs = {"until": ["o"], "max_gen_toks": 8, "do_sample": False}  # "o" comes: cut
    gen = [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]
    mine = wordy_lm.generate_until(gen)
    assert mine == hf_wordy.generate_until(gen)
    assert all(m and "o" not in m for m in mine), mine
    with pytest.raises(ValueError, match="greedily"):
        mile_lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])


def test_backend_refuses_a_missing_workdir():
    with pytest.raises(ValueError, match="workdir"):
        MLE.MileLM()
    with pytest.raises(ValueError, match="unknown --model_args wrokdir"):
        MLE.MileLM(wrokdir="w")
