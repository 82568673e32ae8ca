"""The data section of the run config (``c.data`` in configs/base.py), validated and frozen."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from mile import fields

SOURCES = ("kjv", "text", "tfds", "synthetic")
BAD_RECORDS = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One field per ``data.*`` key; a key the config lacks (or sets to None) takes the default."""

    # "kjv" (Debian's bible-kjv-text) | "text" | "tfds" | "synthetic". Required.
    source: str | None = None
    # source="text": files, directories and globs (local or gs://) of .txt (blank-line separated
    # documents), .jsonl, .jsonl.gz, .jsonl.zst or .parquet (mile.data.sources); a command-line
    # "a.txt,dir/,shards/*.jsonl.zst" becomes a tuple.
    text_files: tuple[str, ...] = ()
    # source="tfds": a prepared ArrayRecord TFDS dataset, e.g. "c4/en", and its TFDS data_dir.
    tfds_name: str = ""
    tfds_data_dir: str | None = None
    # The text feature (tfds) / JSONL field / parquet column (text).
    text_key: str = "text"
    # A record that is not a document (bad JSON, no text_key, not UTF-8, a null): "error" stops
    # with its file and line; "skip" skips it and counts it (the count is printed and kept in
    # the prepared store's manifest.json).
    bad_records: str = "error"
    # source="tfds": the splits to train and to evaluate on.
    train_split: str = "train"
    eval_split: str = "validation"
    # kjv/text/synthetic: every N-th document is held out for evaluation.
    validation_every: int = 50
    # "train": a SentencePiece BPE trained on the train split; or a path (local or gs://) to a
    # SentencePiece .model or a Hugging Face tokenizer.json, used as is.
    tokenizer: str = "train"
    # Store the documents' token ids (uint16 when the vocabulary allows, else int32) so training
    # only reads and packs; the batches are the same as tokenising on the fly.
    pretokenize: bool = False
    # The trained tokenizer's vocabulary (must be <= model.vocab_size); synthetic: its id space.
    vocab_size: int = 8000
    # Documents sampled (strided over the train split) to train the tokenizer.
    tokenizer_max_docs: int = 100_000
    # Where corpora, TFDS datasets and tokenizers are cached.
    cache_dir: str = ".cache"
    # Training shuffle seed (when train_iterator gets seed=None).
    shuffle_seed: int = 0
    # grain read/tokenise threads per data stream; 0 = the main thread.
    read_threads: int = 0
    # grain worker processes per data stream (each packs its own share of the documents, so the
    # batches differ from read_workers=0); 0 = none. For tokenising on the fly on many cores;
    # a pretokenized store needs none (experiments/bench_input.py).
    read_workers: int = 0
    # Tokens per training/eval sequence, and sequences per optimiser update over all processes.
    seq_len: int = 256
    global_batch_size: int = 16
    # Disjoint document streams, each filling its own rows of every batch (mile.multihost);
    # 0 = one per process. Fix it to get the same batches under any process count.
    shards: int = 0
    # source="synthetic": the generator's parameters (mile.data.synthetic.SyntheticSpec;
    # configs/synthetic.py sets them all). Not hashed: a dict.
    synthetic: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "DataConfig":
        """From a ConfigDict, a dict, or a DataConfig (returned as is)."""
        return fields.section(cls, cfg)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(
                f"data.source={self.source!r} is not one of {SOURCES}; set --config.data.source."
            )
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError(
                "data.source='tfds' needs data.tfds_name (e.g. 'c4/en'); set --config.data.tfds_name."
            )
        files = self.text_files
        if isinstance(files, str):  # a command-line "a.txt,b.jsonl"
            files = [f for f in files.split(",") if f]
        self._set("text_files", tuple(os.fspath(f) for f in files))
        # The data functions always int()-ed these, so a float or numpy int in a config still works.
        for name in (
            "validation_every",
            "vocab_size",
            "tokenizer_max_docs",
            "shuffle_seed",
            "read_threads",
            "read_workers",
        ):
            self._set(name, int(getattr(self, name)))
        fields.whole_number("data.seq_len", self.seq_len)
        fields.whole_number("data.global_batch_size", self.global_batch_size)
        fields.whole_number("data.shards", self.shards, minimum=0, why=" (0 = one per process)")
        fields.whole_number("data.tokenizer_max_docs", self.tokenizer_max_docs)
        fields.whole_number("data.read_threads", self.read_threads, minimum=0, why=" (0 = main thread)")
        fields.whole_number("data.read_workers", self.read_workers, minimum=0, why=" (0 = none)")
        fields.one_of("data.bad_records", self.bad_records, BAD_RECORDS)
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r}; use 'train' or a path to a SentencePiece .model "
                "or a tokenizer.json."
            )
        if not isinstance(self.pretokenize, bool):
            raise ValueError(f"data.pretokenize={self.pretokenize!r} must be true or false.")
        if self.synthetic is not None:
            self._set("synthetic", dict(self.synthetic))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ normalises
