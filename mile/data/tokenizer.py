"""SentencePiece tokenizer: train once per (corpus fingerprint, vocab size), cache on disk, load.

Model: BPE with byte fallback (LLaMA-style), identity normalisation and no whitespace
collapsing, so ``decode(encode(text)) == text`` for any UTF-8 text (newlines included).
Ids: unk=0, bos=1, eos=2, pad=3. The pipeline uses eos as the document separator.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
import time
from typing import Iterable, Sequence

from absl import logging
import sentencepiece as spm

# Bump when training options change, so old cached models are not reused.
_TRAINER_VERSION = "bpe-bytefallback-v1"
# SentencePiece drops training "sentences" longer than its max_sentence_length, so long lines
# are cut into pieces of at most this many characters before training.
_MAX_LINE_CHARS = 4096


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A loaded SentencePiece model; ``path`` is the ``.model`` file to export with checkpoints."""

    path: pathlib.Path
    processor: spm.SentencePieceProcessor

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = pathlib.Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer model {path} does not exist; run mile.data.prepare() to train it.")
        return cls(path=path, processor=spm.SentencePieceProcessor(model_file=str(path)))

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


def _training_lines(docs: Iterable[str]) -> Iterable[str]:
    for doc in docs:
        for line in doc.splitlines():
            for start in range(0, len(line), _MAX_LINE_CHARS):
                piece = line[start : start + _MAX_LINE_CHARS]
                if piece.strip():
                    yield piece


def train_or_load(
    docs: Iterable[str],
    *,
    corpus_fingerprint: str,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    max_sentences: int = 2_000_000,
) -> Tokenizer:
    """Loads ``<cache_dir>/tokenizers/<fingerprint>-v<vocab>/sp.model``, training it first if missing.

    ``docs`` (the training split) is only iterated when training is needed. ``max_sentences``
    caps how many lines SentencePiece samples, which bounds time and memory on big corpora.
    """
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer; use >= 300 (e.g. 8000 or 32000)."
        )
    out_dir = (
        pathlib.Path(cache_dir) / "tokenizers" / f"{corpus_fingerprint}-{_TRAINER_VERSION}-v{vocab_size}"
    )
    model_path = out_dir / "sp.model"
    if model_path.is_file():
        return Tokenizer.load(model_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="train-") as tmp:
        tmp = pathlib.Path(tmp)
        n_lines = _write_training_lines(docs, tmp / "lines.txt")
        start = time.time()
        _train_sentencepiece(tmp / "lines.txt", tmp / "sp", vocab_size, max_sentences)
        logging.info(
            "Trained %d-piece tokenizer on %d lines in %.1fs", vocab_size, n_lines, time.time() - start
        )
        # Rename last: a present sp.model is always complete.
        os.replace(tmp / "sp.vocab", out_dir / "sp.vocab")
        os.replace(tmp / "sp.model", model_path)
    return Tokenizer.load(model_path)


def _write_training_lines(docs: Iterable[str], path: pathlib.Path) -> int:
    """Writes the training lines of ``docs`` to ``path``, one per line; returns how many."""
    n_lines = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in _training_lines(docs):
            f.write(line + "\n")
            n_lines += 1
    if n_lines == 0:
        raise ValueError(
            "tokenizer training text is empty; check the corpus (data.text_files / data.tfds_name)."
        )
    return n_lines


def _train_sentencepiece(
    lines_path: pathlib.Path, model_prefix: pathlib.Path, vocab_size: int, max_sentences: int
) -> None:
    """Writes ``<model_prefix>.model`` and ``.vocab``; a SentencePiece failure becomes a ValueError."""
    try:
        spm.SentencePieceTrainer.train(
            input=str(lines_path),
            model_prefix=str(model_prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=4 * _MAX_LINE_CHARS,  # bytes; a char is at most 4 bytes.
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size is too high (8000). Please set it to a value <= 1234."
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size}: {str(e).strip().splitlines()[-1]}"
        ) from None
