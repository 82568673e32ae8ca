"""Data for mile: corpus -> TFDS ArrayRecord dataset -> SentencePiece tokenizer -> grain batches.

The trainer calls three functions::

    prepared = mile.data.prepare(cfg.data)                    # idempotent; cached on disk
    train_it = mile.data.train_iterator(cfg.data, prepared, seq_len=S, global_batch_size=G,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
    eval_it = mile.data.eval_iterator(cfg.data, prepared, seq_len=S, global_batch_size=G,
                                      num_batches=N, process_index=..., process_count=...)

Batches: ``{"inputs": int32[B,S], "targets": int32[B,S], "mask": float32[B,S]}`` with
``B = G // process_count`` (see ``mile.data.pipeline``). ``train_it.get_state()`` is a small
JSON-serialisable dict; ``train_it.set_state(state)`` on a fresh iterator built with the same
config/seed/process layout resumes at exactly the next batch.

Data config keys read (``data_cfg.get(key, default)``; an ml_collections ConfigDict or dict):
  source            "kjv" | "text" | "tfds" | "synthetic"                         (required)
  text_files        list of .txt (blank-line separated) / .jsonl paths   (source="text")
  tfds_name         prepared ArrayRecord TFDS dataset, e.g. "c4/en"      (source="tfds")
  tfds_data_dir     its TFDS data_dir                                    (source="tfds")
  text_key          text feature / JSONL field                           ("text")
  train_split       TFDS split to train on (source="tfds")               ("train")
  eval_split        TFDS split to evaluate on (source="tfds")            ("validation")
  validation_every  kjv/text: hold out every N-th document               (50)
  vocab_size        SentencePiece vocabulary size; synthetic: its id space   (8000)
  synthetic         source="synthetic": generator parameters (mile.data.synthetic.SyntheticSpec;
                    configs/synthetic.py sets them all)
  tokenizer_max_docs  source="tfds": documents sampled to train the tokenizer (100000)
  cache_dir         where corpora, datasets and tokenizers are cached    (".cache")
  shuffle_seed      training shuffle seed (if train_iterator gets seed=None) (0)
  read_threads      grain read/tokenise threads per process; 0 = main thread (0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import grain

from mile.data import corpus, pipeline, tfds_corpus
from mile.data.tokenizer import Tokenizer, train_or_load

__all__ = ["PreparedData", "Tokenizer", "prepare", "train_iterator", "eval_iterator"]

_SOURCES = ("kjv", "text", "tfds", "synthetic")


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Everything the iterators need; cheap to rebuild with ``prepare`` once caches exist."""

    tokenizer: Tokenizer  # or synthetic.IdTokenizer (same interface) for data.source="synthetic"
    tokenizer_path: pathlib.Path  # the SentencePiece .model file, to export with checkpoints
    tfds_name: str
    tfds_data_dir: str | None
    text_key: str
    train_split: str
    eval_split: str


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def prepare(data_cfg: Any, cache_dir: str | os.PathLike | None = None) -> PreparedData:
    """Fetches/reads the corpus, builds the TFDS dataset and trains the tokenizer, each once.

    On several hosts sharing a filesystem, run it on process 0 first (then a barrier), so the
    hosts do not build the same cache at the same time; afterwards it only reads caches.
    """
    source = _get(data_cfg, "source")
    if source not in _SOURCES:
        raise ValueError(f"data.source={source!r} is not one of {_SOURCES}; set --config.data.source.")
    # Absolute, so PreparedData paths stay valid if the caller later changes directory.
    cache_dir = pathlib.Path(
        cache_dir if cache_dir is not None else _get(data_cfg, "cache_dir", ".cache")
    ).absolute()
    text_key = _get(data_cfg, "text_key", "text")
    vocab_size = int(_get(data_cfg, "vocab_size", 8000))

    if source == "tfds":
        return _prepare_tfds(data_cfg, cache_dir, text_key, vocab_size)
    if source == "synthetic":  # generated, and its tokens are ids: no SentencePiece
        from mile.data import synthetic

        return synthetic.prepare(data_cfg, cache_dir)

    if source == "kjv":
        files = [corpus.fetch_kjv(cache_dir)]
        file_key = "text"  # fetch_kjv always writes this field
    else:
        files = _get(data_cfg, "text_files", [])
        if isinstance(files, str):  # a command-line "a.txt,b.jsonl"
            files = [f for f in files.split(",") if f]
        files = list(files)
        file_key = text_key
    docs = corpus.read_documents(files, file_key)
    validation_every = int(_get(data_cfg, "validation_every", 50))
    data_dir = tfds_corpus.build_text_dataset(docs, cache_dir, validation_every)
    train_docs, _ = tfds_corpus.split_documents(docs, validation_every)
    tokenizer = train_or_load(
        train_docs,
        corpus_fingerprint=tfds_corpus.fingerprint(docs, validation_every),
        vocab_size=vocab_size,
        cache_dir=cache_dir,
    )
    return PreparedData(
        tokenizer=tokenizer,
        tokenizer_path=tokenizer.path,
        tfds_name=tfds_corpus.DATASET_NAME,
        tfds_data_dir=str(data_dir),
        text_key="text",  # the built dataset's feature name
        train_split="train",
        eval_split="validation",
    )


def _prepare_tfds(data_cfg: Any, cache_dir: pathlib.Path, text_key: str, vocab_size: int) -> PreparedData:
    name = _get(data_cfg, "tfds_name")
    if not name:
        raise ValueError(
            "data.source='tfds' needs data.tfds_name (e.g. 'c4/en'); set --config.data.tfds_name."
        )
    data_dir = _get(data_cfg, "tfds_data_dir")
    train_split = _get(data_cfg, "train_split", "train")
    eval_split = _get(data_cfg, "eval_split", "validation")
    train_source = tfds_corpus.open_source(name, data_dir, train_split, text_key)
    tfds_corpus.open_source(name, data_dir, eval_split, text_key)  # fail now, not at first eval
    max_docs = int(_get(data_cfg, "tokenizer_max_docs", 100_000))
    # A strided sample over the whole split, rather than its first documents.
    stride = max(1, len(train_source) // max_docs)
    sample = range(0, len(train_source), stride)[:max_docs]
    key = f"{name}|{data_dir}|{train_split}|{text_key}|{len(train_source)}|{max_docs}"
    tokenizer = train_or_load(
        (train_source[i] for i in sample),
        corpus_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        vocab_size=vocab_size,
        cache_dir=cache_dir,
    )
    return PreparedData(
        tokenizer=tokenizer,
        tokenizer_path=tokenizer.path,
        tfds_name=name,
        tfds_data_dir=None if data_dir is None else str(data_dir),
        text_key=text_key,
        train_split=train_split,
        eval_split=eval_split,
    )


def train_iterator(
    data_cfg: Any,
    prepared: PreparedData,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled, checkpointable training batches for this process."""
    source = tfds_corpus.open_source(
        prepared.tfds_name, prepared.tfds_data_dir, prepared.train_split, prepared.text_key
    )
    dataset = pipeline.train_dataset(
        source,
        prepared.tokenizer,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=int(seed if seed is not None else _get(data_cfg, "shuffle_seed", 0)),
        process_index=process_index,
        process_count=process_count,
        read_threads=int(_get(data_cfg, "read_threads", 0)),
    )
    return iter(dataset)


def eval_iterator(
    data_cfg: Any,
    prepared: PreparedData,
    *,
    seq_len: int,
    global_batch_size: int,
    num_batches: int | None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """A fresh, deterministic, finite pass of evaluation batches (call again for each eval)."""
    source = tfds_corpus.open_source(
        prepared.tfds_name, prepared.tfds_data_dir, prepared.eval_split, prepared.text_key
    )
    dataset = pipeline.eval_dataset(
        source,
        prepared.tokenizer,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        num_batches=num_batches,
        process_index=process_index,
        process_count=process_count,
        read_threads=int(_get(data_cfg, "read_threads", 0)),
    )
    return iter(dataset)
