"""Tokenizers: a SentencePiece model or a Hugging Face tokenizer.json given by path, or a
SentencePiece model trained once per (corpus fingerprint, vocab size) and cached on disk.

The trained model:

Model: BPE with byte fallback (LLaMA-style), identity normalisation and no whitespace
collapsing, so ``decode(encode(text)) == text`` for any UTF-8 text (newlines included).
Ids: unk=0, bos=1, eos=2, pad=3. The pipeline uses eos as the document separator.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pathlib
import time
from typing import Iterable, Sequence

from absl import logging
import sentencepiece as spm

from mile import paths

# Bump when training options change, so old cached models are not reused.
_TRAINER_VERSION = "bpe-bytefallback-v2"
# SentencePiece drops training "sentences" longer than its max_sentence_length, so long lines
# are cut into pieces of at most this many characters before training.
_MAX_LINE_CHARS = 4096


def file_fingerprint(path: str | os.PathLike) -> str:
    """A short hash of a file's bytes: what a checkpoint records of the tokenizer it was trained with."""
    h = hashlib.sha256()
    with paths.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Tokenizer:
    """What the pipeline, the evaluators and the export need of a tokenizer (one per kind below).

    ``encode`` never adds special tokens: the pipeline appends ``eos_id`` after each document and
    the evaluators put one EOS in front (mile.conditioning). ``pad_id``/``bos_id`` are -1 when the
    tokenizer has none. ``path`` is the file that defines it; ``fingerprint`` hashes that file.
    """

    kind: str
    path: pathlib.Path

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """``encode`` of each text; ``num_threads`` caps the library's own threads (None: its default)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @functools.cached_property
    def fingerprint(self) -> str:
        return file_fingerprint(self.path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """A SentencePiece ``.model`` or a Hugging Face ``tokenizer.json`` (by the file's suffix)."""
        return load_tokenizer(path)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model``): mile's own trained ones, or LLaMA's ``tokenizer.model``."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:  # e.g. LLaMA-3's tokenizer.model, which is tiktoken's format
            raise ValueError(
                f"{self.path} is not a SentencePiece model ({str(e).strip().splitlines()[0]}); pass a "
                "SentencePiece .model or a Hugging Face tokenizer.json."
            ) from None

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

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=-1 if num_threads is None else num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.processor.id_to_piece(int(i))


# Special tokens taken as EOS (and BOS / pad) when no tokenizer_config.json beside a tokenizer.json
# names them, in this order.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library; no hub, no transformers).

    Its EOS/BOS/pad are the ``eos_token``/``bos_token``/``pad_token`` of a ``tokenizer_config.json``
    in the same directory when there is one, else the first of the usual names it has.
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        import tokenizers  # only this kind needs it

        self.path = pathlib.Path(path)
        try:
            self.processor = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ValueError(
                f"{self.path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]}); "
                "pass a tokenizer.json saved by the tokenizers library or a SentencePiece .model."
            ) from None
        # A special token's text inside a document ("<|endoftext|>" in a web page) is text, as in
        # SentencePiece: it must not become a document boundary.
        self.processor.encode_special_tokens = True
        named = self._configured_specials()
        self.eos_id = self._special(named.get("eos_token"), _EOS_NAMES)
        self.bos_id = self._special(named.get("bos_token"), _BOS_NAMES)
        self.pad_id = self._special(named.get("pad_token"), _PAD_NAMES)
        self.unk_id = self._special(named.get("unk_token"), ("<unk>", "[UNK]", "<|unk|>"))

    def _configured_specials(self) -> dict[str, str]:
        config = self.path.parent / "tokenizer_config.json"
        if not config.is_file():
            return {}
        try:
            named = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config} is not JSON ({e}); fix it or remove it.") from None
        if not isinstance(named, dict):
            raise ValueError(f"{config} is not a JSON object; fix it or remove it.")
        out = {}
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            value = named.get(key)
            if isinstance(value, dict):  # {"content": "</s>", ...} in some configs
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
        return out

    def _special(self, configured: str | None, names: Sequence[str]) -> int:
        for name in (configured,) if configured else names:
            token_id = self.processor.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return -1

    @functools.cached_property
    def vocab_size(self) -> int:
        # Ids run 0..max: added tokens may sit above the base vocabulary.
        return max(self.processor.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        if num_threads == 1:  # the library's thread pool is process-wide: encode one by one instead
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.processor.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.processor.id_to_token(int(i))

    @functools.cached_property
    def fingerprint(self) -> str:
        # The EOS (and the others) may come from a tokenizer_config.json beside the file: a change
        # there changes the ids training sees, so it changes the fingerprint too.
        specials = f"eos={self.eos_id},bos={self.bos_id},pad={self.pad_id},unk={self.unk_id}"
        return hashlib.sha256(f"{file_fingerprint(self.path)}|{specials}".encode()).hexdigest()[:16]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from its local file: ``*.model`` (SentencePiece) or ``*.json`` (Hugging Face)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(
            f"tokenizer {path} does not exist; set data.tokenizer to a SentencePiece .model, a "
            "Hugging Face tokenizer.json, or 'train'."
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(
        f"tokenizer {path}: cannot tell its kind from the name; use a SentencePiece *.model or a "
        "Hugging Face *.json (tokenizer.json)."
    )


def local_tokenizer(path: str, cache_dir: str | os.PathLike) -> pathlib.Path:
    """``path`` itself when local; a gs:// tokenizer (and a tokenizer_config.json beside it) is
    copied into ``<cache_dir>/tokenizers/remote-<hash of the URL>/`` (again at every call, so the
    copy follows the bucket)."""
    if not paths.is_remote(path):
        return pathlib.Path(path)
    if not paths.isfile(path):
        raise ValueError(f"tokenizer {path} does not exist; check data.tokenizer.")
    out_dir = (
        pathlib.Path(cache_dir) / "tokenizers" / f"remote-{hashlib.sha256(path.encode()).hexdigest()[:16]}"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    name = paths.path(path).name
    sibling = paths.join(str(paths.path(path).parent), "tokenizer_config.json")
    copied_config = out_dir / "tokenizer_config.json"
    if name.endswith(".json") and paths.isfile(sibling):
        with paths.replacing(copied_config) as tmp:
            tmp.write_bytes(paths.read_bytes(sibling))
    elif copied_config.exists():  # the bucket's copy was removed since: so is ours
        copied_config.unlink()
    with paths.replacing(out_dir / name) as tmp:  # last: a present copy is complete
        tmp.write_bytes(paths.read_bytes(path))
    return out_dir / name


def check_usable(tokenizer: Tokenizer, model_vocab_size: int | None = None) -> Tokenizer:
    """ValueError (one line, naming the fix) unless the tokenizer can join documents with an EOS
    and fits the model's vocabulary."""
    if tokenizer.eos_id is None or tokenizer.eos_id < 0:
        raise ValueError(
            f"tokenizer {tokenizer.path} has no EOS token, which mile puts between documents; add one "
            "(e.g. '</s>' as a special token, or eos_token in a tokenizer_config.json beside it)."
        )
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{model_vocab_size}; raise --config.model.vocab_size to at least {tokenizer.vocab_size}."
        )
    return tokenizer


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
) -> SentencePieceTokenizer:
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
        return SentencePieceTokenizer(model_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = _CountedLines(docs)
    start = time.time()
    model = _train_sentencepiece(lines, vocab_size, max_sentences)
    if lines.count == 0:
        raise ValueError(
            "tokenizer training text is empty; check the corpus (data.text_files / data.tfds_name)."
        )
    logging.info(
        "Trained %d-piece tokenizer on %d lines in %.1fs", vocab_size, lines.count, time.time() - start
    )
    with paths.replacing(model_path) as tmp:  # a present sp.model is always complete
        tmp.write_bytes(model)
    return SentencePieceTokenizer(model_path)


class _CountedLines:
    """The training lines of ``docs``, counted as SentencePiece reads them."""

    def __init__(self, docs: Iterable[str]):
        self._docs, self.count = docs, 0

    def __iter__(self):
        for line in _training_lines(self._docs):
            self.count += 1
            yield line


def _train_sentencepiece(lines: Iterable[str], vocab_size: int, max_sentences: int) -> bytes:
    """The trained model's bytes; a SentencePiece failure becomes a ValueError.

    Lines come from an iterator and the model goes to memory, so the model records no file names,
    and the thread count is fixed: the same corpus gives the same bytes (and the same fingerprint)
    on any machine."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
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
            num_threads=16,
            minloglevel=2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size is too high (8000). Please set it to a value <= 1234."
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size}: {str(e).strip().splitlines()[-1]}"
        ) from None
    return model.getvalue()
