"""Concatenate token sequences and cut the stream into fixed windows, with an exact, small state.

Input: an IterDataset of 1-D int arrays (one per document, separator already appended).
Output: consecutive, non-overlapping int32 windows of ``window`` tokens; no padding, the tail
that never fills a window (finite inputs only) is dropped.

Checkpoint state: ``{"anchor": <parent state>, "skip": int}`` meaning "restore the parent to
``anchor``, re-read the next document and drop its first ``skip`` tokens". The anchor is the
parent position of the first document not yet fully emitted, so the state stays a few
integers however long documents are (instead of storing leftover tokens), and restoring
re-tokenises one document.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import numpy as np


class _PackedWindowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window: int):
        super().__init__(parent)
        self._window = window
        self._buffer = np.zeros((0,), np.int32)  # tokens not yet emitted
        # (parent state before the document, its length) for each document with tokens in the
        # buffer; the first one has had its first `_skip` tokens emitted already.
        self._docs: collections.deque[tuple[Any, int]] = collections.deque()
        self._skip = 0

    def _read_document(self) -> np.ndarray:
        return np.asarray(next(self._parent), dtype=np.int32).reshape(-1)

    def __next__(self) -> np.ndarray:
        while self._buffer.size < self._window:
            state_before = self._parent.get_state()
            doc = self._read_document()  # StopIteration ends a finite stream
            self._docs.append((state_before, doc.size))
            self._buffer = np.concatenate([self._buffer, doc])
        window, self._buffer = self._buffer[: self._window], self._buffer[self._window :]
        self._skip += self._window
        # Forget fully emitted documents so the anchor moves forward and `skip` stays small.
        while self._docs and self._skip >= self._docs[0][1]:
            self._skip -= self._docs.popleft()[1]
        return window

    def get_state(self) -> dict[str, Any]:
        if not self._docs:
            return {"anchor": self._parent.get_state(), "skip": 0}
        return {"anchor": self._docs[0][0], "skip": int(self._skip)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["anchor"])
        self._docs.clear()
        self._buffer = np.zeros((0,), np.int32)
        self._skip = int(state["skip"])
        if self._skip == 0:
            return
        # Re-read the partly emitted document and drop the tokens already emitted.
        state_before = self._parent.get_state()
        doc = self._read_document()
        if doc.size <= self._skip:
            raise ValueError(
                f"packing state skip={self._skip} does not match the data (document of {doc.size} tokens); "
                "restore with the same corpus, tokenizer, seed and process layout."
            )
        self._docs.append((state_before, doc.size))
        self._buffer = doc[self._skip :]


class PackedWindowsIterDataset(grain.IterDataset):
    """Packs a stream of token arrays into fixed windows of ``window`` tokens."""

    def __init__(self, parent: grain.IterDataset, window: int):
        super().__init__(parent)
        if window < 2:
            raise ValueError(f"window={window} must be >= 2 (seq_len + 1 tokens); use seq_len >= 1.")
        self._window = window

    def __iter__(self) -> _PackedWindowsIterator:
        return _PackedWindowsIterator(self._parent.__iter__(), self._window)

    def __str__(self) -> str:
        return f"PackedWindowsIterDataset(window={self._window})"
