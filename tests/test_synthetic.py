"""Tests for the synthetic language (mile.data.synthetic) and the ground-truth evaluation
(mile.ground_truth): the recorded truths against independent float64 computations and against
samples, an oracle model that scores exactly the truth, and a tiny trained run."""

import dataclasses
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import mile.data as md
from mile import ground_truth as gt
from mile.data import synthetic as syn

from train_helpers import tiny_config

SMALL = syn.SyntheticSpec(vocab_size=128, validation_every=10, seed=3, train_tokens=30_000, eos_prob=0.02)


def _entropy_f64(rows):
    rows = np.asarray(rows, np.float64)
    return np.array([-sum(p * np.log(p) for p in row if p > 0) for row in rows])


def _eval_batches(cfg, prep):
    """One pass over the held-out split, in document order."""
    return md.eval_iterator(cfg.data, prep, seq_len=cfg.data.seq_len, global_batch_size=8, num_batches=None)


@pytest.fixture(scope="module")
def language():
    return syn.build_language(SMALL)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("synthetic"))
    cfg.data.update(source="synthetic", vocab_size=SMALL.vocab_size, validation_every=SMALL.validation_every)
    cfg.data.synthetic = ml_collections.ConfigDict(
        dict(seed=SMALL.seed, train_tokens=SMALL.train_tokens, eos_prob=SMALL.eos_prob)
    )
    cfg.model.vocab_size = SMALL.vocab_size
    return cfg, md.prepare(cfg.data)


def test_every_context_has_the_designed_kind(language):
    p, n_res = language.probs, syn.RESERVED
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    body = p[n_res:, n_res:]
    np.testing.assert_allclose(p[n_res:, syn.EOS_ID], SMALL.eos_prob)  # every type can end a document
    support = (body > 0).sum(axis=1)
    kind = language.kind[n_res:]
    assert set(np.unique(kind)) == {0, 1, 2}
    assert (support[kind == 0] == 1).all()
    # A deterministic context never points at another deterministic context (no locked cycles).
    assert (kind[body[kind == 0].argmax(axis=1)] != 0).all()
    assert ((support[kind == 1] >= 2) & (support[kind == 1] <= SMALL.max_labels)).all()
    assert (support[kind == 2] == body.shape[1]).all()
    # Entropies per kind do not overlap: the kinds are also the true-entropy buckets.
    h = _entropy_f64(p)[n_res:]
    assert h[kind == 0].max() < h[kind == 1].min() and h[kind == 1].max() < h[kind == 2].min()
    np.testing.assert_allclose(language.entropy(), _entropy_f64(p), atol=1e-12)
    # The recorded stationary distribution is stationary.
    np.testing.assert_allclose(language.stationary @ p, language.stationary, atol=1e-12)


def test_build_is_deterministic_in_the_spec():
    a, b = syn.build_language(SMALL), syn.build_language(SMALL)
    np.testing.assert_array_equal(a.probs, b.probs)
    c = syn.build_language(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert not np.array_equal(a.probs, c.probs)


def test_samples_follow_the_recorded_probabilities(language):
    docs = syn.sample_documents(language, 200_000, seed=0, chains=500)
    stream = syn.heldout_stream(docs)
    context = np.concatenate([[syn.EOS_ID], stream[:-1]])
    V = language.vocab_size
    counts = np.bincount(context * V + stream, minlength=V * V).reshape(V, V).astype(np.float64)
    assert counts[language.probs == 0].sum() == 0  # nothing impossible is ever sampled
    # The busiest contexts: empirical next-token frequencies match the table.
    for c in np.argsort(-counts.sum(axis=1))[:10]:
        n = counts[c].sum()
        tv = 0.5 * np.abs(counts[c] / n - language.probs[c]).sum()
        assert tv < 3.0 * np.sqrt(V / n), (c, tv, n)
    # The mean surprisal of the samples estimates the mean recorded entropy of their contexts.
    entropy, logp = syn.position_truth(language, stream)
    diff = -logp - entropy  # zero mean given the context
    assert abs(diff.mean()) < 4.0 * diff.std() / np.sqrt(diff.size)
    # Each document's EOS is recorded; lengths are geometric with mean 1 / eos_prob.
    lengths = np.array([len(d) + 1 for d in docs])
    assert abs(lengths.mean() - (1 + 1 / SMALL.eos_prob)) < 4.0 * lengths.std() / np.sqrt(len(lengths))


def test_heldout_records_line_up_with_the_eval_pipeline(prepared):
    cfg, prep = prepared
    language, records = syn.load_language(prep.tokenizer_path)
    assert isinstance(prep.tokenizer, syn.IdTokenizer) and prep.tokenizer.vocab_size == SMALL.vocab_size
    seq = cfg.data.seq_len
    batches = _eval_batches(cfg, prep)
    window, checked = 0, 0
    for batch in batches:
        for inputs, targets in zip(batch["inputs"], batch["targets"]):
            at = slice(window * (seq + 1) + 1, (window + 1) * (seq + 1))  # the window's targets
            np.testing.assert_allclose(records["heldout_entropy"][at], _entropy_f64(language.probs[inputs]))
            np.testing.assert_array_equal(
                records["heldout_logp"][at], np.log(language.probs[inputs, targets])
            )
            window, checked = window + 1, checked + seq
    assert checked > 1000


class _Oracle(nnx.Module):
    """A 'model' given the true transition table: hidden = one-hot(previous token), head = log P."""

    def __init__(self, language):
        log_p = np.maximum(language.log_probs(), -1e4)  # finite, so softmax gives back P
        self.head = nnx.Param(jnp.asarray(log_p, jnp.float32))

    def __call__(self, tokens):
        return jnp.eye(self.head.shape[0], dtype=jnp.float32)[tokens]

    def unembedding(self):
        return self.head[...]


def test_the_true_table_scores_exactly_the_recorded_truth(prepared):
    cfg, prep = prepared
    language, records = syn.load_language(prep.tokenizer_path)
    stats_fn = gt.make_truth_stats_fn(_Oracle(language), language)
    batches = list(_eval_batches(cfg, prep))
    out = stats_fn(batches[0]["inputs"], batches[0]["targets"])
    np.testing.assert_allclose(out["nll"], out["true_nll"], atol=2e-5)
    np.testing.assert_allclose(out["entropy"], out["true_entropy"], atol=2e-5)
    np.testing.assert_allclose(out["kl"], 0.0, atol=2e-5)

    buckets = np.zeros(language.vocab_size, np.int32)
    result = gt.ground_truth_stats(stats_fn, batches, buckets, language.kind)
    seq = cfg.data.seq_len
    n = len(batches) * 8  # windows
    in_windows = np.concatenate([np.arange(w * (seq + 1) + 1, (w + 1) * (seq + 1)) for w in range(n)])
    overall = result["context"]["overall"]
    assert overall["tokens"] == in_windows.size
    recorded_entropy = records["heldout_entropy"][in_windows].mean()
    np.testing.assert_allclose(overall["true_entropy"], recorded_entropy, rtol=1e-6)
    np.testing.assert_allclose(overall["true_nll"], -records["heldout_logp"][in_windows].mean(), rtol=1e-6)
    for grouping in ("context", "frequency"):
        for name, r in result[grouping].items():
            if r["tokens"]:
                assert abs(r["excess"]) < 1e-4 and abs(r["kl"]) < 1e-4, (grouping, name, r)


def test_a_tiny_run_has_non_negative_excess_loss(prepared, tmp_path):
    from mile import train
    from mile.restore import load_trained_model
    from mile.token_frequency import assign_buckets, token_counts

    cfg, prep = prepared
    cfg = cfg.copy_and_resolve_references()
    cfg.train.update(steps=30, eval_every=30, checkpoint_every=30)
    cfg.optim.update(learning_rate=1e-2)
    workdir = str(tmp_path / "run")
    train.train(cfg, workdir)
    result = gt.evaluate_workdir(workdir)
    # Per-position statistics, to size the sampling noise of the excess loss.
    model, _, _ = load_trained_model(workdir)
    language, _ = syn.load_language(prep.tokenizer_path)
    stats_fn = gt.make_truth_stats_fn(model, language)
    diffs, kls = [], []
    for b in _eval_batches(cfg, prep):
        out = stats_fn(b["inputs"], b["targets"])
        diffs.append((out["nll"] - out["true_nll"] - out["kl"]).ravel())
        kls.append(out["kl"].ravel())
    diff, kl = np.concatenate(diffs), np.concatenate(kls)
    noise = 4.0 * diff.std() / np.sqrt(diff.size)
    overall = result["context"]["overall"]
    assert overall["tokens"] == diff.size
    np.testing.assert_allclose(overall["kl"], kl.mean(), rtol=1e-6)
    assert (kl > -1e-4).all()  # KL is non-negative at every position
    # The excess loss estimates the KL: non-negative within noise, overall and per kind of context.
    assert overall["excess"] > -noise and abs(overall["excess"] - overall["kl"]) < noise
    for name in syn.KINDS:
        assert result["context"][name]["excess"] > -noise * 3, (name, result["context"][name])
    # The model learned something: less than a uniform guess, more than the truth.
    assert overall["true_nll"] < overall["ce"] < np.log(SMALL.vocab_size)
    buckets = assign_buckets(token_counts(prep))
    assert result["bucket_types"] == np.bincount(buckets, minlength=3).tolist()


def test_bad_synthetic_config_is_one_line_error(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.update(source="synthetic", vocab_size=128, cache_dir=str(tmp_path / "cache"))
    cfg.data.synthetic = ml_collections.ConfigDict(dict(kind_shares=(0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match="kind_shares"):
        md.prepare(cfg.data)
    cfg.data.synthetic = ml_collections.ConfigDict(dict(kind_shares=(0.4, 0.35, 0.25), bogus=1))
    with pytest.raises(ValueError, match="unknown data.synthetic keys"):
        md.prepare(cfg.data)
    del cfg.data.synthetic["bogus"]
    cfg.data.vocab_size = 10
    with pytest.raises(ValueError, match="vocab_size=10"):
        md.prepare(cfg.data)
    assert not os.path.exists(tmp_path / "cache" / "synthetic")


def test_id_tokenizer_round_trip_and_bad_ids(tmp_path):
    tok = syn.IdTokenizer(path=tmp_path / "language.npz", size=100)
    assert tok.encode("5 17 99") == [5, 17, 99]
    assert tok.decode([5, 17, 99]) == "5 17 99"
    assert tok.encode_batch(["1 2", "3"]) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="out of range"):
        tok.encode("5 100")
    with pytest.raises(ValueError, match="space-separated token ids"):
        tok.encode("five")


def test_ground_truth_cli_reports_a_missing_workdir(tmp_path, capsys):
    assert gt.main(["--workdir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: workdir") and "does not exist" in err and "\n" not in err
