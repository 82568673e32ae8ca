"""``prepare``: a data config -> a TFDS ArrayRecord dataset and a tokenizer, each built once."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

from mile.data import corpus, synthetic, tfds_corpus
from mile.data.config import DataConfig
from mile.data.tokenizer import Tokenizer, train_or_load


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

    @classmethod
    def built(cls, tokenizer, data_dir: str | os.PathLike) -> "PreparedData":
        """A dataset that ``tfds_corpus.MileTextCorpus`` built in ``data_dir`` (kjv, text, synthetic)."""
        return cls(
            tokenizer=tokenizer,
            tokenizer_path=tokenizer.path,
            tfds_name=tfds_corpus.DATASET_NAME,
            tfds_data_dir=str(data_dir),
            text_key="text",  # the built dataset's feature name
            train_split="train",
            eval_split="validation",
        )

    def open(self, split: str):
        """The "train" or "eval" split as a random-access sequence of documents (``str``)."""
        names = {"train": self.train_split, "eval": self.eval_split}
        if split not in names:
            raise ValueError(f"split={split!r}; use 'train' or 'eval'")
        return tfds_corpus.open_source(self.tfds_name, self.tfds_data_dir, names[split], self.text_key)


def prepare(data_cfg: DataConfig | Any, cache_dir: str | os.PathLike | None = None) -> PreparedData:
    """Fetches/reads the corpus, builds the TFDS dataset and trains the tokenizer, each once.

    ``data_cfg``: a DataConfig, or the ``data`` ConfigDict/dict it is read from. On several hosts
    sharing a filesystem, run it on process 0 first (then a barrier), so the hosts do not build
    the same cache at the same time; afterwards it only reads caches.
    """
    cfg = DataConfig.from_cfg(data_cfg)
    # Absolute, so PreparedData paths stay valid if the caller later changes directory.
    cache_dir = pathlib.Path(cache_dir if cache_dir is not None else cfg.cache_dir).absolute()
    if cfg.source == "tfds":
        return _prepare_tfds(cfg, cache_dir)
    if cfg.source == "synthetic":  # generated, and its tokens are ids: no SentencePiece
        return synthetic.prepare(cfg, cache_dir)
    return _prepare_text(cfg, cache_dir)


def _prepare_text(cfg: DataConfig, cache_dir: pathlib.Path) -> PreparedData:
    """source "kjv" or "text": local documents -> MileTextCorpus dataset + a tokenizer of its train split."""
    if cfg.source == "kjv":
        files = [corpus.fetch_kjv(cache_dir)]
        file_key = "text"  # fetch_kjv always writes this field
    else:
        files = list(cfg.text_files)
        file_key = cfg.text_key
    docs = corpus.read_documents(files, file_key)
    data_dir = tfds_corpus.build_text_dataset(docs, cache_dir, cfg.validation_every)
    train_docs, _ = tfds_corpus.split_documents(docs, cfg.validation_every)
    tokenizer = train_or_load(
        train_docs,
        corpus_fingerprint=tfds_corpus.fingerprint(docs, cfg.validation_every),
        vocab_size=cfg.vocab_size,
        cache_dir=cache_dir,
    )
    return PreparedData.built(tokenizer, data_dir)


def _prepare_tfds(cfg: DataConfig, cache_dir: pathlib.Path) -> PreparedData:
    """source "tfds": an already-built ArrayRecord dataset + a tokenizer of a sample of its train split."""
    name, data_dir, text_key = cfg.tfds_name, cfg.tfds_data_dir, cfg.text_key
    train_source = tfds_corpus.open_source(name, data_dir, cfg.train_split, text_key)
    tfds_corpus.open_source(name, data_dir, cfg.eval_split, text_key)  # fail now, not at first eval
    max_docs = cfg.tokenizer_max_docs
    # A strided sample over the whole split, rather than its first documents.
    stride = max(1, len(train_source) // max_docs)
    sample = range(0, len(train_source), stride)[:max_docs]
    key = f"{name}|{data_dir}|{cfg.train_split}|{text_key}|{len(train_source)}|{max_docs}"
    tokenizer = train_or_load(
        (train_source[i] for i in sample),
        corpus_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
        vocab_size=cfg.vocab_size,
        cache_dir=cache_dir,
    )
    return PreparedData(
        tokenizer=tokenizer,
        tokenizer_path=tokenizer.path,
        tfds_name=name,
        tfds_data_dir=None if data_dir is None else str(data_dir),
        text_key=text_key,
        train_split=cfg.train_split,
        eval_split=cfg.eval_split,
    )
