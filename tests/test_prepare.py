"""Preparing data at scale: every input format, the bad-record rule, sharded stores built by worker
processes or a Beam pipeline (the same files either way), a preparation killed midway, your own
tokenizer, pretokenized batches equal to on-the-fly ones (and resuming across them), and the
``python -m mile.prepare`` command. Small files made here; nothing from the network."""

import gzip
import json
import os
import signal

import numpy as np
import pytest

import mile.data as md
from mile.data import build, corpus, sources, store
from mile.data import tokenizer as mtok
from mile.data.prepared import Builder
from tokenizer_helpers import train_hf_tokenizer
from train_helpers import REPO, start, wait, wait_for

WAIT_S = 240


def _docs(n=120, seed=0):
    """Documents with non-ASCII text, digits and inner newlines (never a blank line: .txt splits there)."""
    rng = np.random.default_rng(seed)
    words = "in the beginning god created heaven and earth naïve über ☃ 42 7 fruit tree seed".split()
    return [
        "\n".join(" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(rng.integers(1, 4)))
        for _ in range(n)
    ]


def _write(path, docs, key="text"):
    """`docs` in the format `path`'s name asks for."""
    path = str(path)
    fmt = sources.format_of(path)
    if fmt == ".txt":
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
    elif fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({key: docs, "id": list(range(len(docs)))}), path, row_group_size=7)
    else:
        lines = "".join(json.dumps({key: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
        data = lines.encode("utf-8")
        if fmt == ".jsonl.gz":
            data = gzip.compress(data)
        elif fmt == ".jsonl.zst":
            import zstandard

            data = zstandard.ZstdCompressor().compress(data)
        with open(path, "wb") as f:
            f.write(data)
    return path


FORMATS = ["a.txt", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.parquet"]


def _corpus(directory, docs, names=FORMATS):
    """`docs` split over one file per name, in order; the files."""
    parts = np.array_split(np.arange(len(docs)), len(names))
    os.makedirs(directory, exist_ok=True)
    return [_write(os.path.join(directory, n), [docs[i] for i in part]) for n, part in zip(names, parts)]


def _cfg(tmp_path, files, **more):
    return {
        "source": "text",
        "text_files": tuple(files),
        "vocab_size": 300,
        "validation_every": 7,
        "cache_dir": str(tmp_path / "cache"),
        "seq_len": 16,
        "global_batch_size": 4,
        **more,
    }


def _held_out(docs, every):
    """The reference split rule, over the documents of all files in order."""
    train = [d for i, d in enumerate(docs) if (i + 1) % every]
    return train, [d for i, d in enumerate(docs) if (i + 1) % every == 0]


def _all(source):
    return [source[i] for i in range(len(source))]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def _shards(directory):
    return sorted(p for p in os.listdir(directory) if p.endswith(".arrayrecord"))


# --- input formats --------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_its_documents_in_order(tmp_path, name):
    docs = _docs(30)
    path = _write(tmp_path / name, docs)
    assert corpus.read_documents([path]) == docs


def test_directories_and_globs_expand_sorted_and_once(tmp_path):
    docs = _docs(50)
    files = _corpus(tmp_path / "corpus", docs)
    (tmp_path / "corpus" / "notes.csv").write_text("not a corpus file")
    os.makedirs(tmp_path / "corpus" / "sub")
    extra = _write(tmp_path / "corpus" / "sub" / "f.jsonl", ["in a subdirectory"])
    assert sources.expand([str(tmp_path / "corpus")]) == sorted(files + [extra])
    assert sources.expand([str(tmp_path / "corpus" / "*.jsonl*")]) == files[1:4]
    # A file named twice is read once, in the place it was first named.
    assert sources.expand([files[4], str(tmp_path / "corpus" / "*.txt"), files[4]]) == [files[4], files[0]]
    said = []
    assert sources.expand([str(tmp_path / "corpus")], report=said.append) == sorted(files + [extra])
    assert said == [
        f"data.text_files entry {str(tmp_path / 'corpus')!r}: 1 file(s) not in a supported format are not read (notes.csv)"
    ]
    assert corpus.read_documents([str(tmp_path / "corpus" / "*")]) == docs
    with pytest.raises(ValueError, match=r"matches no .*file; check the path or glob"):
        sources.expand([str(tmp_path / "corpus" / "*.json")])


def test_parquet_text_column_is_configurable(tmp_path):
    path = _write(tmp_path / "x.parquet", ["one", "two"], key="body")
    assert corpus.read_documents([path], text_key="body") == ["one", "two"]
    with pytest.raises(ValueError) as err:
        corpus.read_documents([path])
    assert str(err.value) == f"{path} has no column 'text' (has ['body', 'id']); set data.text_key."


BAD = {
    "json": (b'{"text": "ok"}\n{"text": "cut\n{"text": "ok too"}\n', ".jsonl", ":2: is not JSON"),
    "key": (
        b'{"text": "ok"}\n{"body": "x"}\n{"text": "ok too"}\n',
        ".jsonl",
        ":2: is not a JSON object with a 'text'",
    ),
    "type": (
        b'{"text": "ok"}\n{"text": 5}\n{"text": "ok too"}\n',
        ".jsonl",
        ":2: field 'text' is int, not a string",
    ),
    "utf8": (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n{"text": "ok too"}\n', ".jsonl", ":2: is not UTF-8"),
    "txt": (b"ok\n\n\xff bad line\n\nok too\n", ".txt", ":3: is not UTF-8"),
    "surrogate": (
        b'{"text": "ok"}\n{"text": "cut \\ud800 here"}\n{"text": "ok too"}\n',
        ".jsonl",
        ":2: field 'text' holds a lone surrogate",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_malformed_record_stops_with_its_file_and_line_or_is_skipped_and_counted(tmp_path, kind, capsys):
    data, suffix, where = BAD[kind]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    good = _write(tmp_path / "good.jsonl", _docs(20))
    with pytest.raises(ValueError) as err:
        md.prepare(_cfg(tmp_path, [good, str(path)]))
    message = str(err.value)
    assert message.startswith(f"{path}{where}") and "data.bad_records=skip" in message and "\n" not in message
    assert not list((tmp_path / "cache" / "text").glob("*/manifest.json"))  # nothing complete was left

    prepared = md.prepare(_cfg(tmp_path, [good, str(path)], bad_records="skip"))
    line = capsys.readouterr().err
    assert "prepared 22 documents from 2 file(s)" in line and "1 malformed record(s) skipped" in line
    assert f"{path}{where}" in line
    manifest = store.read_manifest(prepared.train.store_dir)
    assert manifest["counts"] == {"documents": 22, "empty": 0, "malformed": 1}
    assert manifest["malformed_examples"][0].startswith(f"{path}{where}")
    docs = _all(prepared.open("train")) + _all(prepared.open("eval"))
    assert sorted(docs) == sorted(_docs(20) + ["ok", "ok too"])


def test_a_null_parquet_row_names_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
    with pytest.raises(ValueError, match=r"x\.parquet:row 2: column 'text' is null, not a string"):
        corpus.read_documents([path])
    assert list(corpus.iter_documents(path, bad_records="skip")) == ["a", "c"]


def test_empty_records_are_counted_not_kept(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "a"}\n{"text": "   "}\n{"text": ""}\n{"text": "b"}\n')
    counts = corpus.Counts()
    assert list(corpus.iter_documents(path, counts=counts)) == ["a", "b"]
    assert counts.as_dict() == {"documents": 2, "empty": 2, "malformed": 0}


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.jsonl.zst"])
def test_a_truncated_compressed_file_is_one_line(tmp_path, name):
    path = _write(tmp_path / name, _docs(200))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        corpus.read_documents([path])
    assert str(err.value).startswith(f"{path} cannot be read to the end") and "fetch it again" in str(
        err.value
    )
    assert "\n" not in str(err.value)


# --- stores -----------------------------------------------------------------------------------


def test_the_split_is_the_held_out_rule_over_every_file_in_order(tmp_path):
    docs = _docs(100)
    files = _corpus(tmp_path / "corpus", docs)
    prepared = md.prepare(_cfg(tmp_path, [str(tmp_path / "corpus")]))
    train, validation = _held_out(docs, 7)
    assert _all(prepared.open("train")) == train and _all(prepared.open("eval")) == validation
    assert prepared.open("train").__getitems__([3, 0, 50]) == [train[3], train[0], train[50]]
    # One shard per input file, committed by its manifest.
    text_dir = prepared.train.store_dir
    assert _shards(text_dir) == [f"docs-{i:05d}-000.arrayrecord" for i in range(len(files))]
    assert store.read_manifest(text_dir)["counts"]["documents"] == 100


def test_a_large_unit_rotates_its_shard_files(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SHARD_BYTES", 500)
    docs = _docs(60)
    path = _write(tmp_path / "one.jsonl", docs)
    prepared = md.prepare(_cfg(tmp_path, [path]))
    assert len(_shards(prepared.train.store_dir)) > 3
    assert _all(prepared.open("train")) + _all(prepared.open("eval")) != []
    assert _all(prepared.open("train")) == _held_out(docs, 7)[0]


@pytest.fixture(scope="module")
def many_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    docs = _docs(300, seed=1)
    return root, docs, _corpus(root / "corpus", docs, [f"part-{i:02d}.jsonl" for i in range(6)])


def _store_files(cache):
    """{relative path: bytes} of every shard and manifest under a cache, with the run's own
    paths and timings taken out of the manifests."""
    out = {}
    for dirpath, _, names in os.walk(cache):
        if "/.unit-" in dirpath:  # a killed unit's own directory: never part of the store
            continue
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, cache)
            if name.endswith(".arrayrecord"):
                out[rel] = open(path, "rb").read()
            elif name == "manifest.json":
                manifest = json.load(open(path))
                out[rel] = (manifest["splits"], manifest["counts"], manifest["kind"], manifest["dtype"])
    return out


def test_workers_and_a_beam_pipeline_write_the_same_files(tmp_path, many_files):
    root, docs, files = many_files
    cfgs = {}
    for name, builder in [
        ("one", Builder()),
        ("workers", Builder(workers=2)),
        ("beam", Builder(runner="DirectRunner", beam_options=("--direct_num_workers=1",))),
    ]:
        cfgs[name] = _cfg(tmp_path / name, files, pretokenize=True)
        md.prepare(cfgs[name], builder=builder)
    one = _store_files(tmp_path / "one" / "cache")
    assert len([k for k in one if k.endswith(".arrayrecord")]) == 12  # 6 text + 6 token shards
    assert _store_files(tmp_path / "workers" / "cache") == one
    assert _store_files(tmp_path / "beam" / "cache") == one


def test_a_preparation_killed_midway_is_never_read_as_complete_and_a_rerun_finishes_it(tmp_path, many_files):
    root, docs, files = many_files
    cfg = _cfg(tmp_path, [str(root / "corpus")])
    release = tmp_path / "release"
    argv = [
        os.path.join(REPO, "tests", "prepare_with_faults.py"),
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        *(f"--config.data.{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in cfg.items()),
    ]
    # Held in the middle of the third file's unit (each file has 50 documents).
    proc, log = start(
        argv, tmp_path / "killed.log", MILE_TEST_HOLD_AT_RECORD="120", MILE_TEST_HOLD_FILE=str(release)
    )
    wait_for(lambda: os.path.exists(f"{release}.held"), proc, log, "the hold in the third unit", WAIT_S)
    os.killpg(proc.pid, signal.SIGKILL)
    wait(proc, log, 30)
    (text_dir,) = (tmp_path / "cache" / "text").iterdir()
    assert not (text_dir / "manifest.json").exists()
    assert sorted(os.listdir(text_dir / "units")) == ["00000.json", "00001.json"]
    # The cut-short unit wrote only into a directory of its own, never into the store.
    assert not os.path.exists(text_dir / "docs-00002-000.arrayrecord")
    assert [p.name.startswith(".unit-00002-") for p in text_dir.iterdir() if p.name.startswith(".unit")] == [True]
    with pytest.raises(ValueError, match="not a complete prepared dataset"):
        store.StoreSource(text_dir, build.DOCS)

    done_before = os.stat(text_dir / "units" / "00000.json").st_mtime_ns
    prepared = md.prepare(cfg)  # the same preparation again: keeps units 0-1, redoes the rest
    assert os.stat(text_dir / "units" / "00000.json").st_mtime_ns == done_before
    train, validation = _held_out(docs, 7)
    assert _all(prepared.open("train")) == train and _all(prepared.open("eval")) == validation
    clean = tmp_path / "clean"
    md.prepare(_cfg(clean, [str(root / "corpus")]))
    assert _store_files(tmp_path / "cache" / "text") == _store_files(clean / "cache" / "text")


# --- pretokenized -----------------------------------------------------------------------------


def test_pretokenized_batches_equal_on_the_fly_ones_and_resume_across_them(tmp_path, many_files):
    root, docs, files = many_files
    text_cfg = _cfg(tmp_path, files)
    ids_cfg = {**text_cfg, "pretokenize": True}
    text, ids = md.prepare(text_cfg), md.prepare(ids_cfg)
    assert ids.pretokenized and ids.tokenizer.fingerprint == text.tokenizer.fingerprint
    first = ids.open("train")[0]
    assert first.dtype == np.dtype("<u2") and list(first) == text.tokenizer.encode(text.open("train")[0])
    for stream in range(2):
        kw = dict(process_index=stream, process_count=2)
        _assert_batches_equal(
            _take(md.train_iterator(ids_cfg, ids, **kw), 12),
            _take(md.train_iterator(text_cfg, text, **kw), 12),
        )
        _assert_batches_equal(
            list(md.eval_iterator(ids_cfg, ids, num_batches=3, **kw)),
            list(md.eval_iterator(text_cfg, text, num_batches=3, **kw)),
        )
    # A data position saved while tokenising on the fly resumes exactly in the pretokenized
    # store and back: the position counts documents, whichever form they are stored in.
    it = md.train_iterator(text_cfg, text)
    _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    for cfg, prepared in ((ids_cfg, ids), (text_cfg, text)):
        resumed = md.train_iterator(cfg, prepared)
        resumed.set_state(state)
        _assert_batches_equal(_take(resumed, 6), expected)


def _word_level_tokenizer(path, n):
    """A tokenizer.json of `n` whole-word tokens w0..w{n-2} and </s>: ids above 65,535 when n is large."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(n - 1)}
    vocab["</s>"] = n - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_a_vocabulary_beyond_uint16_is_stored_as_int32(tmp_path):
    path = _word_level_tokenizer(tmp_path / "big" / "tokenizer.json", 70_000)
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 69_999, size=rng.integers(5, 30))) for _ in range(40)]
    files = [_write(tmp_path / "c.jsonl", docs)]
    text_cfg = _cfg(tmp_path, files, tokenizer=str(path))
    ids_cfg = {**text_cfg, "pretokenize": True}
    text, ids = md.prepare(text_cfg), md.prepare(ids_cfg)
    assert ids.open("train")[0].dtype == np.dtype("<i4") and ids.tokenizer.vocab_size == 70_000
    assert int(max(max(ids.open("train")[i]) for i in range(len(ids.open("train"))))) > 65_535
    _assert_batches_equal(
        _take(md.train_iterator(ids_cfg, ids), 8), _take(md.train_iterator(text_cfg, text), 8)
    )


# --- your own tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    lines = _docs(300, seed=7)
    sp = mtok.train_or_load(lines, corpus_fingerprint="own", vocab_size=320, cache_dir=root / "sp")
    return {
        "sentencepiece": sp,
        "hf": train_hf_tokenizer("bytelevel", root / "hf" / "tokenizer.json", lines, 320),
        "no-eos": train_hf_tokenizer("no-eos", root / "noeos" / "tokenizer.json", lines, 320),
    }


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_a_given_tokenizer_is_used_as_is(tmp_path, own_tokenizers, kind, monkeypatch):
    given = own_tokenizers[kind]
    monkeypatch.setattr(mtok, "train_or_load", lambda *a, **k: pytest.fail("trained a tokenizer"))
    docs = _docs(40)
    cfg = _cfg(tmp_path, [_write(tmp_path / "c.jsonl", docs)], tokenizer=str(given.path), pretokenize=True)
    prepared = md.prepare(cfg)
    assert prepared.tokenizer.path == given.path and prepared.tokenizer.fingerprint == given.fingerprint
    train = _held_out(docs, 7)[0]
    assert [list(x) for x in _all(prepared.open("train"))] == [given.encode(d) for d in train]
    inputs = np.concatenate([b["inputs"] for b in _take(md.train_iterator(cfg, prepared), 10)])
    assert (inputs == given.eos_id).any()  # documents joined by this tokenizer's EOS


def test_a_special_tokens_text_inside_a_document_is_text(own_tokenizers):
    for tok in (own_tokenizers["hf"], own_tokenizers["sentencepiece"]):
        ids = tok.encode("a web page that says <|endoftext|> and </s> in its text")
        assert tok.eos_id not in ids, (tok.kind, ids)


def test_tokenizer_problems_are_one_line_errors(tmp_path, own_tokenizers):
    files = [_write(tmp_path / "c.jsonl", _docs(40))]
    no_eos = own_tokenizers["no-eos"].path
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a sentencepiece model")
    bad_config = tmp_path / "badcfg" / "tokenizer.json"
    bad_config.parent.mkdir()
    bad_config.write_bytes(own_tokenizers["hf"].path.read_bytes())
    (bad_config.parent / "tokenizer_config.json").write_text("{not json")
    for tokenizer, message in [
        (str(garbage), f"{garbage} is not a SentencePiece model ("),
        (str(bad_config), f"{bad_config.parent / 'tokenizer_config.json'} is not JSON ("),
        (str(no_eos), f"tokenizer {no_eos} has no EOS token, which mile puts between documents; add one"),
        (
            str(tmp_path / "missing.model"),
            f"tokenizer {tmp_path / 'missing.model'} does not exist; set data.tokenizer",
        ),
        (files[0], f"tokenizer {files[0]}: cannot tell its kind from the name"),
    ]:
        with pytest.raises(ValueError) as err:
            md.prepare(_cfg(tmp_path, files, tokenizer=tokenizer))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_trained_tokenizer_is_the_same_file_on_any_machine(tmp_path):
    docs = _docs(200)
    a = mtok.train_or_load(docs, corpus_fingerprint="x", vocab_size=300, cache_dir=tmp_path / "a")
    b = mtok.train_or_load(iter(docs), corpus_fingerprint="x", vocab_size=300, cache_dir=tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes() and a.fingerprint == b.fingerprint
    assert str(tmp_path).encode() not in a.path.read_bytes()  # no file names recorded in the model


# --- tfds source --------------------------------------------------------------------------------


def test_a_tfds_dataset_is_read_in_place_and_pretokenized(tmp_path, own_tokenizers):
    from tfds_helpers import build_tfds_dataset

    docs = _docs(60, seed=3)
    data_dir = build_tfds_dataset(tmp_path / "tfds", {"train": docs[:50], "validation": docs[50:]})
    sp = own_tokenizers["sentencepiece"]
    text_cfg = {
        "source": "tfds",
        "tfds_name": "mile_test_corpus",
        "tfds_data_dir": str(data_dir),
        "tokenizer": str(sp.path),
        "cache_dir": str(tmp_path / "cache"),
        "seq_len": 16,
        "global_batch_size": 4,
    }
    ids_cfg = {**text_cfg, "pretokenize": True}
    text, ids = md.prepare(text_cfg), md.prepare(ids_cfg, builder=Builder(workers=2))
    assert _all(text.open("train")) == docs[:50] and _all(text.open("eval")) == docs[50:]
    assert [list(x) for x in _all(ids.open("eval"))] == [sp.encode(d) for d in docs[50:]]
    _assert_batches_equal(
        _take(md.train_iterator(ids_cfg, ids), 8), _take(md.train_iterator(text_cfg, text), 8)
    )


# --- the command --------------------------------------------------------------------------------


def test_the_prepare_command_builds_and_reports_bad_input_in_one_line(tmp_path, many_files):
    root, docs, files = many_files
    base = [
        "-m",
        "mile.prepare",
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--config.data.source=text",
        f"--config.data.text_files={root / 'corpus'}",
        "--config.data.vocab_size=300",
        "--config.data.validation_every=7",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
    ]
    proc, log = start([*base, "--config.data.pretokenize=true", "--workers", "2"], tmp_path / "ok.log")
    rc, out = wait(proc, log, WAIT_S)
    assert rc == 0, out[-3000:]
    assert "prepared 300 documents from 6 file(s)" in out and "train: 258 documents (ids)" in out
    assert "eval: 42 documents (ids)" in out
    for flags, message in [
        (["--workers", "0"], "error: --workers=0 must be >= 1"),
        (
            [f"--config.data.text_files={tmp_path / 'nothing.jsonl'}"],
            f"error: corpus file {tmp_path / 'nothing.jsonl'} does not exist",
        ),
        (["--config.data.bad_records=maybe"], "error: data.bad_records='maybe'; use one of error, skip"),
    ]:
        proc, log = start([*base, *flags], tmp_path / "bad.log")
        rc, out = wait(proc, log, WAIT_S)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and errors[0].startswith(message), out[-3000:]
        assert "Traceback" not in out


# --- a run with its own tokenizer -------------------------------------------------------------


def test_a_run_records_its_tokenizer_evaluates_and_exports_with_it_and_refuses_another(
    tmp_path, own_tokenizers, capsys
):
    import shutil

    import transformers

    from mile import evaluate, export
    from mile import train as T
    from train_helpers import tiny_config

    hf = own_tokenizers["hf"]
    given = tmp_path / "tok" / "tokenizer.json"
    given.parent.mkdir()
    shutil.copyfile(hf.path, given)
    overrides = {
        "data.tokenizer": str(given),
        "data.pretokenize": True,
        "train.steps": 2,
        "train.checkpoint_every": 2,
        "train.eval_every": 2,
    }
    cfg = tiny_config(tmp_path, **overrides)
    wd = tmp_path / "wd"
    T.train(cfg, str(wd))
    with T.Checkpointer.reader(str(wd / "checkpoints")) as ck:
        assert ck.saved_config(2)[md.FINGERPRINT_KEY] == hf.fingerprint

    # Evaluation and the export read the run's tokenizer from its saved config.
    args = ["--workdir", str(wd), "--eval-batches", "2"]
    assert evaluate.run_eval(evaluate.parse_args(args))["step"] == 2
    assert export.main(["--workdir", str(wd), "--out", str(tmp_path / "hf")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "in the beginning 42 naïve ☃"
    assert exported(text, add_special_tokens=False)["input_ids"] == hf.encode(text)
    # Generation (the lm-eval backend) too: it encodes with the run's tokenizer and decodes with it.
    from lm_eval.api.instance import Instance

    from mile.lm_eval import MileLM

    lm = MileLM(workdir=str(wd), batch_size=1, max_gen_toks=3)
    assert lm.tok.fingerprint == hf.fingerprint
    assert lm.tok_encode(text, add_special_tokens=False) == hf.encode(text)
    (generated,) = lm.generate_until([Instance("generate_until", {}, (text, {"until": ["\n\n"]}), 0)])
    assert isinstance(generated, str) and len(generated.encode()) <= 3 * 16, generated  # 3 new ids at most

    # The same path, another tokenizer: resuming, evaluating and exporting refuse it by fingerprint.
    shutil.copyfile(own_tokenizers["no-eos"].path, given)  # no EOS either: the fingerprint speaks first
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "a"}')
    more = tiny_config(tmp_path, **{**overrides, "train.steps": 4})
    for attempt in (
        lambda: T.train(more, str(wd)),
        lambda: evaluate.run_eval(evaluate.parse_args([*args, "--overwrite"])),
    ):
        with pytest.raises(ValueError) as err:
            attempt()
        assert f"was trained with tokenizer {hf.fingerprint}, but data.tokenizer='{given}' gives" in str(
            err.value
        )
    assert export.main(["--workdir", str(wd), "--out", str(tmp_path / "hf2")]) == 2
    assert "was trained with tokenizer" in capsys.readouterr().err

    # A tokenizer larger than the model's vocabulary is refused before anything is written.
    shutil.copyfile(hf.path, given)
    small = tiny_config(tmp_path, **{**overrides, "model.vocab_size": 256})
    with pytest.raises(ValueError) as err:
        T.train(small, str(tmp_path / "small"))
    n = hf.vocab_size  # the trainer stops below 320 when the text has no more merges
    assert str(err.value) == (
        f"tokenizer has {n} tokens but model.vocab_size=256; raise --config.model.vocab_size to at least {n}"
    )
    assert not (tmp_path / "small").exists()

    # The same file at another path resumes: the fingerprint, not the path, is the run's tokenizer.
    moved = tmp_path / "moved" / "tokenizer.json"
    moved.parent.mkdir()
    shutil.copyfile(hf.path, moved)
    T.train(tiny_config(tmp_path, **{**overrides, "data.tokenizer": str(moved), "train.steps": 3}), str(wd))
    assert [r["step"] for r in map(json.loads, open(wd / "metrics.jsonl")) if "train/loss" in r][-1] == 3


def test_grain_worker_processes_resume_exactly(tmp_path, many_files):
    root, docs, files = many_files
    cfg = _cfg(tmp_path, files, read_workers=2, pretokenize=True)
    prepared = md.prepare(cfg)
    it = md.train_iterator(cfg, prepared)
    first = _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    resumed = md.train_iterator(cfg, prepared)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)
    # Every window is a run of the documents' ids joined by EOS, from either worker's share.
    eos = prepared.tokenizer.eos_id
    stream = np.concatenate(
        [np.append(prepared.open("train")[i], eos) for i in range(len(prepared.open("train")))]
    )
    text = " ".join(map(str, stream))
    for batch in first + expected:
        for row in np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1):
            assert row[row != eos].size == 0 or any(
                " ".join(map(str, part)) in text
                for part in np.split(row, np.flatnonzero(row == eos))
                if part.size > 1
            )
