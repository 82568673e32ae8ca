"""grain pipelines: documents (text, or ids when pretokenized) -> tokens -> packed windows -> per-process batches.

Each batch is ``{"inputs": int32[B, S], "targets": int32[B, S], "mask": float32[B, S]}`` with
``targets[:, t] == inputs[:, t + 1]`` within a window (both cut from one window of S + 1
tokens; consecutive windows do not overlap), documents joined by EOS, and ``mask`` all ones
(packing leaves no padding). ``B = global_batch_size // process_count``.

Process ``p`` of ``n`` reads documents ``p, p + n, p + 2n, ...`` only, so processes see
disjoint data; each builds its own part of the global batch.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from mile.data.packing import PackedWindowsIterDataset
from mile.data.tokenizer import Tokenizer


class DocumentIds:
    """A document -> int32 token ids followed by the separator (EOS). A document is text
    (tokenised here) or, from a pretokenized store, its ids already: the same ids either way."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._separator = np.asarray([tokenizer.eos_id], np.int32)

    def __call__(self, doc: str | np.ndarray) -> np.ndarray:
        if isinstance(doc, str):
            ids = self._tokenizer.encode(doc)
            ids.append(int(self._separator[0]))
            return np.asarray(ids, dtype=np.int32)
        return np.concatenate([np.asarray(doc, np.int32), self._separator])


class _ReadAheadIterator(grain.DatasetIterator):
    def __init__(self, docs: grain.MapDataset, chunk: int):
        super().__init__()
        self._docs, self._chunk, self._length = docs, chunk, len(docs)
        self._next = 0  # index of the next element to return
        self._ahead: list = []  # elements self._next, self._next + 1, ... (last first)

    def __next__(self):
        if not self._ahead:
            if self._next >= self._length:
                raise StopIteration
            indices = list(range(self._next, min(self._next + self._chunk, self._length)))
            self._ahead = list(self._docs._getitems(indices))  # noqa: SLF001  grain's batched read
            self._ahead.reverse()
        self._next += 1
        return self._ahead.pop()

    def get_state(self) -> dict:
        return {"next_index": self._next}  # the same state as grain's own reader

    def set_state(self, state: dict) -> None:
        self._next, self._ahead = int(state["next_index"]), []


class ReadAheadIterDataset(grain.IterDataset):
    """A MapDataset's elements in order, read ``chunk`` indices at a time.

    The same elements and state as ``to_iter_dataset`` without threads, but each chunk is one
    batched read down to the source: ArrayRecord returns a batch of records in about 7 us each
    against about 100 us for one record at a time (experiments/bench_input.py).
    """

    def __init__(self, docs: grain.MapDataset, chunk: int):
        super().__init__(docs)
        self._chunk = chunk

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # grain's worker processes each take a slice of the elements
        self._parents = (self._parent.slice(sl),)

    def __iter__(self) -> _ReadAheadIterator:
        return _ReadAheadIterator(self._parent, self._chunk)

    def __str__(self) -> str:
        return f"ReadAheadIterDataset(chunk={self._chunk})"


def _window_to_example(window: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "mask": np.ones(window.shape[0] - 1, np.float32),
    }


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}; change the batch size."
        )
    return global_batch_size // process_count


def _process_shard(source: Sequence, process_index: int, process_count: int) -> grain.MapDataset:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    shard = grain.MapDataset.source(source)[process_index::process_count]
    if len(shard) == 0:
        raise ValueError(
            f"process {process_index} of {process_count} gets no documents from a source of {len(source)}; use a bigger split or fewer processes."
        )
    return shard


def _pack_and_batch(
    docs: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, batch_size: int, read_threads: int
) -> grain.IterDataset:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1.")
    # Tokenising on the MapDataset lets grain's read threads (if any) do it in parallel.
    ids = docs.map(DocumentIds(tokenizer))
    if read_threads == 0:
        tokens = ReadAheadIterDataset(ids, chunk=64)
    else:
        tokens = ids.to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 8 * batch_size))
        )
    windows = PackedWindowsIterDataset(tokens, window=seq_len + 1)
    return windows.map(_window_to_example).batch(batch_size, drop_remainder=True)


def train_dataset(
    source: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 0,
    read_workers: int = 0,
) -> grain.IterDataset:
    """Infinite training batches: this process's documents, reshuffled every epoch with ``seed``.

    ``iter(dataset)`` is checkpointable: ``get_state()`` gives a JSON-serialisable dict and
    ``set_state`` on a fresh iterator of the same pipeline resumes at exactly the same batch.
    With ``read_workers`` grain worker processes, worker w reads and packs every
    ``read_workers``-th document of the shuffled stream and batches come from the workers in turn.
    """
    batch_size = per_process_batch_size(global_batch_size, process_count)
    docs = _process_shard(source, process_index, process_count).shuffle(seed=seed).repeat()
    batches = _pack_and_batch(docs, tokenizer, seq_len, batch_size, read_threads)
    if read_workers == 0:
        return batches
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller may have none
        flags.FLAGS.mark_as_parsed()
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=read_workers))


def eval_dataset(
    source: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    num_batches: int | None,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 0,
) -> grain.IterDataset:
    """Deterministic evaluation batches in document order, no shuffling.

    With ``num_batches`` set, every process yields exactly that many batches (cycling over its
    documents if they run out), so multi-process eval loops stay in lock-step. With ``None``
    it makes one pass and drops the final partial batch (counts may differ across processes).
    """
    batch_size = per_process_batch_size(global_batch_size, process_count)
    docs = _process_shard(source, process_index, process_count)
    if num_batches is None:
        return _pack_and_batch(docs, tokenizer, seq_len, batch_size, read_threads)
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1 (or None for one pass).")
    batches = _pack_and_batch(docs.repeat(), tokenizer, seq_len, batch_size, read_threads)
    return grain.experimental.LimitIterDataset(batches, count=num_batches)
