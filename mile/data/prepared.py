"""``prepare``: a data config -> a document store and a tokenizer (and, pretokenized, a token store),
each built once and cached under ``data.cache_dir``.

  source kjv/text   corpus files -> text store (``<cache>/text/<key>/``), one unit per file
  source tfds       an ArrayRecord TFDS dataset, read in place
  source synthetic  the generated language, stored as ids (``mile.data.synthetic``)
  tokenizer         ``data.tokenizer``: "train" (SentencePiece on a sample of the train split,
                    ``<cache>/tokenizers/``) or a SentencePiece .model / HF tokenizer.json path
  pretokenize       ``data.pretokenize``: the documents' ids in a token store
                    (``<cache>/tokens/<key>-<tokenizer fingerprint>/``), so training only reads and packs

The text store's key is the files' names, sizes and modification times (and the reading
options), not their contents: a corpus of hundreds of GB is not read to check its cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
import tempfile
from typing import Any, Callable, Sequence

from mile import paths
from mile.data import build, corpus, sources, store, synthetic, tfds_corpus
from mile.data.config import DataConfig
from mile.data.tokenizer import Tokenizer, check_usable, load_tokenizer, local_tokenizer, train_or_load

_TEXT_VERSION = "text-v1"  # bump when reading or storing text changes, so old stores are rebuilt


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Where one split's documents are: a store (optionally a held-out view of it) or a TFDS split."""

    store_dir: str | None = None
    store_split: str = build.DOCS
    validation_every: int | None = None  # a HeldOut view of the store's docs
    held_out: str = "train"  # "train" | "validation": which side of the view
    tfds: tuple[str, str | None, str, str] | None = None  # (name, data_dir, split, text_key)

    def open(self):
        if self.tfds is not None:
            return tfds_corpus.open_source(*self.tfds)
        docs = store.StoreSource(self.store_dir, self.store_split)
        if self.validation_every is None:
            return docs
        return build.HeldOut(docs, self.validation_every, self.held_out)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Everything the iterators need; cheap to rebuild with ``prepare`` once caches exist."""

    tokenizer: Tokenizer  # or synthetic.IdTokenizer (same interface) for data.source="synthetic"
    train: SplitSpec
    eval: SplitSpec
    key: str  # identifies the documents (and the ids, pretokenized): caches of derived data use it
    cache_dir: str  # where derived data (token counts) is cached
    pretokenized: bool = False

    @property
    def tokenizer_path(self) -> pathlib.Path:
        """The file that defines the tokenizer, to export with checkpoints."""
        return self.tokenizer.path

    def open(self, split: str):
        """The "train" or "eval" split as a random-access sequence of documents: ``str``, or, when
        pretokenized, int arrays of ids (the pipeline appends the EOS in both cases)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}; use 'train' or 'eval'")
        return (self.train if split == "train" else self.eval).open()


@dataclasses.dataclass(frozen=True)
class Builder:
    """Who builds the stores: ``workers`` local processes, or a Beam ``runner`` (mile.data.store.build)."""

    workers: int = 1
    runner: str = "local"
    beam_options: tuple[str, ...] = ()

    def build(self, directory, units, **kwargs) -> dict:
        return store.build(
            directory,
            units,
            workers=self.workers,
            runner=self.runner,
            beam_options=self.beam_options,
            **kwargs,
        )


def prepare(
    data_cfg: DataConfig | Any,
    cache_dir: str | os.PathLike | None = None,
    *,
    builder: Builder | None = None,
    check: Callable[[Tokenizer], None] | None = None,
) -> PreparedData:
    """Reads or fetches the corpus, builds its store, gets the tokenizer and (pretokenize) the token
    store, each once. ``builder`` says who builds the stores (``python -m mile.prepare`` sets it;
    default: this process). ``check(tokenizer)`` runs as soon as the tokenizer is known, before
    any token store is built (the trainer refuses a tokenizer too large for its model there).

    ``data_cfg``: a DataConfig, or the ``data`` ConfigDict/dict it is read from. On several hosts
    sharing a filesystem, run it on process 0 first (then a barrier), so the hosts do not build
    the same cache at the same time; afterwards it only reads caches. A gs:// ``cache_dir`` is
    built there (by a Beam runner on Dataflow, say) and read through a copy on each host's disk
    (``store.readable_copy``: ArrayRecord reads local files only).
    """
    cfg = DataConfig.from_cfg(data_cfg)
    builder = builder or Builder()
    # Absolute, so PreparedData paths stay valid if the caller later changes directory.
    cache_dir = paths.join(cache_dir if cache_dir is not None else cfg.cache_dir)
    if cfg.source == "synthetic":  # generated, and its tokens are ids: no tokenizer to train
        # Generated from the config alone, so each host makes its own on its disk (even when the
        # cache is a bucket: pathlib would turn gs://b into a local "gs:/b").
        tokenizer, token_dir = synthetic.prepare(cfg, _local_cache(cache_dir))
        key = f"synthetic:{token_dir.parent.name}"
        return _held_out(tokenizer, token_dir, cfg.validation_every, key, cache_dir, True)
    check = check or (lambda tokenizer: None)
    if cfg.source == "tfds":
        return _prepare_tfds(cfg, cache_dir, builder, check)
    return _prepare_files(cfg, cache_dir, builder, check)


def _local_cache(cache_dir: str) -> pathlib.Path:
    """Where tokenizers (and the KJV download) are cached: the cache itself, or, for a gs:// one,
    a local directory (SentencePiece and tokenizers read local files only)."""
    if paths.is_remote(cache_dir):
        return (
            pathlib.Path(tempfile.gettempdir())
            / "mile-cache"
            / hashlib.sha256(cache_dir.encode()).hexdigest()[:16]
        )
    return pathlib.Path(cache_dir)


def _held_out(tokenizer, store_dir, every: int, key: str, cache_dir, pretokenized: bool) -> PreparedData:
    def view(side):
        return SplitSpec(store_dir=str(store_dir), validation_every=every, held_out=side)

    return PreparedData(tokenizer, view("train"), view("validation"), key, str(cache_dir), pretokenized)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def corpus_files(cfg: DataConfig, cache_dir: str) -> tuple[list[str], str]:
    """(the corpus files in order, the text key) of a kjv/text source."""
    if cfg.source == "kjv":
        return [str(corpus.fetch_kjv(_local_cache(cache_dir)))], "text"  # it always writes this field
    if not cfg.text_files:
        raise ValueError("data.source='text' needs data.text_files (files, directories or globs); set it.")
    return sources.expand(cfg.text_files), cfg.text_key


def _prepare_files(cfg: DataConfig, cache_dir: str, builder: Builder, check) -> PreparedData:
    """source "kjv" or "text": corpus files -> text store -> tokenizer -> (token store)."""
    files, text_key = corpus_files(cfg, cache_dir)
    key = _digest([_TEXT_VERSION, list(zip(files, paths.versions(files))), text_key, cfg.bad_records])
    text_dir = paths.join(cache_dir, "text", key)
    fresh = not store.is_complete(text_dir)
    manifest = builder.build(
        text_dir,
        build.text_units(files, text_key, cfg.bad_records),
        kind="text",
        dtype=None,
        meta={"files": files, "text_key": text_key, "bad_records": cfg.bad_records},
    )
    if fresh:
        _report(manifest, len(files))
    documents = manifest["counts"]["documents"]
    if documents == 0:
        names = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        raise ValueError(
            f"corpus {names} is empty: no documents ({manifest['counts'].get('empty', 0)} empty records); "
            "add text (see mile.data.sources for the formats)."
        )
    if documents // cfg.validation_every == 0:
        raise ValueError(
            f"corpus has {documents} documents, too few to hold out 1 in {cfg.validation_every}; "
            "add documents or lower data.validation_every."
        )
    text = _held_out(None, text_dir, cfg.validation_every, key, cache_dir, False)
    tokenizer = _tokenizer(
        cfg, cache_dir, lambda: text.open("train"), f"{key}|{cfg.validation_every}|{cfg.tokenizer_max_docs}"
    )
    check(tokenizer)
    if not cfg.pretokenize:
        return dataclasses.replace(text, tokenizer=tokenizer)
    dtype = store.token_dtype(tokenizer.vocab_size)
    token_dir = paths.join(cache_dir, "tokens", f"{key}-{tokenizer.fingerprint}")
    builder.build(
        token_dir,
        build.token_units_from_store(text_dir, _for_workers(cfg, tokenizer), dtype),
        kind="tokens",
        dtype=dtype,
        meta={"text_store": text_dir, "tokenizer": str(tokenizer.path), "fingerprint": tokenizer.fingerprint},
    )
    return _held_out(
        tokenizer, token_dir, cfg.validation_every, f"{key}-{tokenizer.fingerprint}", cache_dir, True
    )


def _report(manifest: dict, num_files: int) -> None:
    """One line on what the corpus held, so nothing is dropped without a word."""
    c = manifest["counts"]
    line = f"prepared {c['documents']} documents from {num_files} file(s)"
    if c.get("empty"):
        line += f"; {c['empty']} empty record(s) not kept"
    if c.get("malformed"):
        first = "; ".join(manifest["malformed_examples"][:3])
        line += f"; {c['malformed']} malformed record(s) skipped (data.bad_records=skip), first: {first}"
    print(line, file=sys.stderr, flush=True)


def _tokenizer(cfg: DataConfig, cache_dir: str, train_docs, sample_key: str) -> Tokenizer:
    """``data.tokenizer``: a given file, or SentencePiece trained on a strided sample of the train split."""
    if cfg.tokenizer != "train":
        return check_usable(load_tokenizer(local_tokenizer(cfg.tokenizer, _local_cache(cache_dir))))
    docs = train_docs()
    # A strided sample over the whole split rather than its first documents.
    stride = max(1, len(docs) // cfg.tokenizer_max_docs)
    sample = range(0, len(docs), stride)[: cfg.tokenizer_max_docs]
    return train_or_load(
        (docs[i] for i in sample),
        corpus_fingerprint=hashlib.sha256(sample_key.encode()).hexdigest()[:16],
        vocab_size=cfg.vocab_size,
        cache_dir=_local_cache(cache_dir),
    )


def _for_workers(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    """The tokenizer as units elsewhere (Beam workers) can load it: the configured path, local or
    gs://, or the trained file (a trained tokenizer is local: its store is, too)."""
    return cfg.tokenizer if cfg.tokenizer != "train" else str(tokenizer.path)


def _open_tfds_split(name: str, data_dir: str | None, text_key: str, split: str):
    return tfds_corpus.open_source(name, data_dir, split, text_key)


def _prepare_tfds(cfg: DataConfig, cache_dir: str, builder: Builder, check) -> PreparedData:
    """source "tfds": an already-built ArrayRecord dataset, a tokenizer, and (pretokenize) its ids."""
    name, data_dir, text_key = cfg.tfds_name, cfg.tfds_data_dir, cfg.text_key
    opener = functools.partial(_open_tfds_split, name, data_dir, text_key)
    train_source = opener(cfg.train_split)
    eval_source = opener(cfg.eval_split)  # fail now, not at first eval
    key = f"{name}|{data_dir}|{cfg.train_split}|{text_key}|{len(train_source)}"
    tokenizer = _tokenizer(cfg, cache_dir, lambda: train_source, f"{key}|{cfg.tokenizer_max_docs}")
    check(tokenizer)
    key = f"{key}|{cfg.eval_split}"
    splits = {"train": cfg.train_split, "eval": cfg.eval_split}
    if not cfg.pretokenize:
        train, eval_ = (SplitSpec(tfds=(name, data_dir, splits[s], text_key)) for s in ("train", "eval"))
        return PreparedData(tokenizer, train, eval_, _digest(key), str(cache_dir))
    dtype = store.token_dtype(tokenizer.vocab_size)
    token_key = f"{_digest(key)}-{tokenizer.fingerprint}"
    token_dir = paths.join(cache_dir, "tokens", token_key)
    lengths = {cfg.train_split: len(train_source), cfg.eval_split: len(eval_source)}
    builder.build(
        token_dir,
        build.token_units_from_source(opener, lengths, _for_workers(cfg, tokenizer), dtype),
        kind="tokens",
        dtype=dtype,
        meta={"tfds": key, "tokenizer": str(tokenizer.path), "fingerprint": tokenizer.fingerprint},
    )
    train, eval_ = (SplitSpec(store_dir=str(token_dir), store_split=splits[s]) for s in ("train", "eval"))
    return PreparedData(tokenizer, train, eval_, token_key, str(cache_dir), pretokenized=True)


# The key under which a run's saved config records the fingerprint of its tokenizer.
FINGERPRINT_KEY = "tokenizer_fingerprint"


def check_fingerprint(tokenizer: Tokenizer, saved_config: dict, what: str) -> None:
    """ValueError unless the tokenizer is the one recorded in a run's saved config (configs saved
    before fingerprints were recorded accept any)."""
    expected = saved_config.get(FINGERPRINT_KEY)
    got = tokenizer.fingerprint
    if expected is not None and expected != got:
        name = (saved_config.get("data") or {}).get("tokenizer", "train")
        raise ValueError(
            f"{what} was trained with tokenizer {expected}, but data.tokenizer={name!r} gives {got} "
            f"({tokenizer.path}); use the tokenizer the run was trained with, or a new --workdir"
        )


def check_fits(tokenizer: Tokenizer, model_cfg: Any, data_cfg: Any) -> None:
    """ValueError unless every id of the tokenizer has a row in the model's embedding."""
    size, model_size = tokenizer.vocab_size, model_cfg.vocab_size
    if size > model_size:
        lower = " or lower --config.data.vocab_size" if data_cfg.get("tokenizer", "train") == "train" else ""
        raise ValueError(
            f"tokenizer has {size} tokens but model.vocab_size={model_size}; "
            f"raise --config.model.vocab_size to at least {size}{lower}"
        )


def describe(prepared: PreparedData) -> Sequence[str]:
    """Lines for the ``mile.prepare`` CLI: what each split holds and where."""
    lines = [f"tokenizer: {prepared.tokenizer.path} ({prepared.tokenizer.vocab_size} ids)"]
    what = "ids" if prepared.pretokenized else "text"
    for split in ("train", "eval"):
        spec = prepared.train if split == "train" else prepared.eval
        if spec.store_dir is not None and paths.is_remote(spec.store_dir):
            lines.append(
                f"{split}: {what} in {spec.store_dir} (mount it or copy it to a local disk to train)"
            )
        else:
            lines.append(f"{split}: {len(prepared.open(split))} documents ({what})")
    return lines
