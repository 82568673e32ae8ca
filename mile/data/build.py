"""The units of work that fill a store (``mile.data.store``): text from corpus files, token ids from
a text store or any random-access source. Each unit is a module-level function bound with
``functools.partial``, so worker processes can run it.

Text stores hold one sequence, ``docs``: every document of every file, in file order. The
train/validation split is a view over it (``HeldOut``), so units never need to know how many
documents the files before theirs hold.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from typing import Callable, Sequence

import numpy as np

from mile.data import corpus, store
from mile.data.tokenizer import Tokenizer, load_tokenizer, local_tokenizer

DOCS = "docs"  # the one split of a text or token store built from files
_TOKENIZE_BATCH = 256  # documents per encode_batch call


# -- text from files -------------------------------------------------------------------------------


def text_units(files: Sequence[str], text_key: str, bad_records: str) -> list[store.Unit]:
    """One unit per input file."""
    return [
        store.Unit(i, functools.partial(_text_unit, path, text_key, bad_records), label=path)
        for i, path in enumerate(files)
    ]


def _text_unit(path: str, text_key: str, bad_records: str, directory: pathlib.Path, index: int) -> dict:
    counts = corpus.Counts()
    writer = store.ShardWriter(directory, DOCS, index)
    try:
        for doc in corpus.iter_documents(path, text_key, bad_records, counts):
            writer.write(store.encode_record(doc, None))
    finally:
        shards = writer.close()
    return {
        "unit": index,
        "file": path,
        "shards": {DOCS: shards},
        "counts": counts.as_dict(),
        "malformed_examples": counts.examples,
    }


# -- token ids -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Tokenizer:
    """Loaded once per worker process; a gs:// one is copied to this machine first."""
    local_cache = pathlib.Path(tempfile.gettempdir()) / "mile-cache"
    return load_tokenizer(local_tokenizer(path, local_cache))


def _write_ids(writer: store.ShardWriter, tokenizer: Tokenizer, docs: Sequence, dtype: np.dtype) -> int:
    """Encodes text documents (ids pass through) and writes them; returns the tokens written."""
    texts = [d for d in docs if isinstance(d, str)]
    # One core per unit: --workers, not the tokenizer's own threads, decides how many are busy.
    encoded = iter(tokenizer.encode_batch(texts, num_threads=1)) if texts else iter(())
    tokens = 0
    for doc in docs:
        ids = np.asarray(next(encoded) if isinstance(doc, str) else doc, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
            raise ValueError(
                f"token id {ids.max()} does not fit {dtype}; this is a bug in choosing the dtype."
            )
        writer.write(store.encode_record(ids, dtype))
        tokens += ids.size
    return tokens


def token_units_from_store(text_dir: str, tokenizer_path: str, dtype: np.dtype) -> list[store.Unit]:
    """One unit per shard of a text store, in its order: the token store's ``docs`` lists the same
    documents in the same order."""
    manifest = store.read_manifest(text_dir)
    names = manifest["splits"][DOCS]["shards"]
    return [
        store.Unit(
            i, functools.partial(_token_unit_from_shard, str(text_dir), name, tokenizer_path, dtype.str)
        )
        for i, name in enumerate(names)
    ]


def _token_unit_from_shard(
    text_dir: str, name: str, tokenizer_path: str, dtype: str, directory: pathlib.Path, index: int
) -> dict:
    tokenizer, dtype = _tokenizer(tokenizer_path), np.dtype(dtype)
    writer = store.ShardWriter(directory, DOCS, index)
    tokens = documents = 0
    try:
        records = store.iter_records(text_dir, name)
        for chunk in store.batched((r.decode("utf-8") for r in records), _TOKENIZE_BATCH):
            tokens += _write_ids(writer, tokenizer, chunk, dtype)
            documents += len(chunk)
    finally:
        shards = writer.close()
    return {"unit": index, "shards": {DOCS: shards}, "counts": {"documents": documents, "tokens": tokens}}


def token_units_from_source(
    open_split: Callable[[str], Sequence],
    splits: dict[str, int],
    tokenizer_path: str,
    dtype: np.dtype,
    docs_per_unit: int = 500_000,
) -> list[store.Unit]:
    """Units over index ranges of random-access splits (``{name: length}``), e.g. a TFDS dataset:
    the token store has the same splits, in the same order. ``open_split`` must be picklable."""
    units = []
    for split, length in splits.items():
        for start in range(0, length, docs_per_unit):
            stop = min(length, start + docs_per_unit)
            run = functools.partial(
                _token_unit_from_range, open_split, split, start, stop, tokenizer_path, dtype.str
            )
            units.append(store.Unit(len(units), run, label=f"{split}[{start}:{stop}]"))
    return units


def _token_unit_from_range(
    open_split,
    split: str,
    start: int,
    stop: int,
    tokenizer_path: str,
    dtype: str,
    directory: pathlib.Path,
    index: int,
) -> dict:
    tokenizer, dtype = _tokenizer(tokenizer_path), np.dtype(dtype)
    source = open_split(split)
    writer = store.ShardWriter(directory, split, index)
    tokens = 0
    try:
        for begin in range(start, stop, _TOKENIZE_BATCH):
            indices = list(range(begin, min(stop, begin + _TOKENIZE_BATCH)))
            tokens += _write_ids(writer, tokenizer, source.__getitems__(indices), dtype)
    finally:
        shards = writer.close()
    return {"unit": index, "shards": {split: shards}, "counts": {"documents": stop - start, "tokens": tokens}}


# -- the held-out view -----------------------------------------------------------------------------


class HeldOut:
    """The train or validation documents of a sequence: document i (0-based) is held out for
    validation iff (i + 1) % every == 0, the rule mile has always used."""

    def __init__(self, docs: Sequence, every: int, split: str):
        if every < 2:
            raise ValueError(
                f"validation_every={every} must be >= 2 (1 in N documents is held out); e.g. 50."
            )
        if split not in ("train", "validation"):
            raise ValueError(f"split={split!r}; use 'train' or 'validation'")
        self._docs, self._every, self._train = docs, every, split == "train"
        held_out = len(docs) // every
        self._length = len(docs) - held_out if self._train else held_out

    def index(self, k: int) -> int:
        """The position in the whole sequence of this split's k-th document."""
        if not 0 <= k < self._length:
            raise IndexError(f"index {k} out of range for {self._length} documents")
        if self._train:
            block, offset = divmod(k, self._every - 1)
            return block * self._every + offset
        return k * self._every + self._every - 1

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, k: int):
        return self._docs[self.index(int(k))]

    def __getitems__(self, ks: Sequence[int]) -> list:
        indices = [self.index(int(k)) for k in ks]
        if hasattr(self._docs, "__getitems__"):
            return list(self._docs.__getitems__(indices))
        return [self._docs[i] for i in indices]

    _getitems = __getitems__  # grain's name for a batched read

    def __repr__(self) -> str:
        return f"HeldOut({self._docs!r}, every={self._every}, {'train' if self._train else 'validation'})"
