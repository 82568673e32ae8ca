"""Global batches from disjoint document streams, the same under any number of processes.

The training documents are split into S streams: stream s reads documents s, s + S, s + 2S, ...
(``mile.data`` with ``process_index=s, process_count=S``) and fills rows [s * G/S, (s + 1) * G/S)
of every global batch of G rows. A process opens only the streams whose rows its devices hold,
so with one stream per process each process reads a disjoint slice of the documents.

The batches depend on S, not on the process count: a single-process run with ``data.shards=S``
sees exactly the batches of an S-process run, and a checkpoint, which stores every stream's
position, resumes under a different process count with the same data order.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator, Sequence

import jax
import numpy as np


def resolve_num_streams(requested: int, process_count: int, saved_states: Sequence | None) -> int:
    """data.shards, where 0 means the checkpoint's count when resuming, else one per process."""
    if saved_states is not None:
        if requested and requested != len(saved_states):
            raise ValueError(
                f"checkpoint holds {len(saved_states)} data streams but data.shards={requested}; "
                f"resume with --config.data.shards={len(saved_states)} (or 0)"
            )
        return len(saved_states)
    return requested or process_count


def _row_range(index, num_rows: int) -> tuple[int, int]:
    start, stop, _ = index[0].indices(num_rows)
    return start, stop


def local_streams(sharding, global_batch_size: int, num_streams: int) -> tuple[list[int], bool]:
    """(streams this process must read, whether it holds all of their rows alone)."""
    per = global_batch_size // num_streams
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size, 1)).values():
        rows.update(range(*_row_range(index, global_batch_size)))
    streams = sorted({r // per for r in rows})
    whole = all(set(range(s * per, (s + 1) * per)) <= rows for s in streams)
    return streams, whole


class StreamBatches:
    """Iterator of global batches {name: jax.Array[G, ...]} sharded with `sharding`.

    `open_stream(s)` returns an iterator of stream s's rows ({name: np.ndarray[G/S, ...]});
    only the streams this process needs are opened.
    """

    def __init__(
        self,
        open_stream: Callable[[int], Iterator[dict[str, np.ndarray]]],
        *,
        num_streams: int,
        sharding,
        global_batch_size: int,
    ):
        if num_streams < 1 or global_batch_size % num_streams:
            raise ValueError(
                f"data.global_batch_size={global_batch_size} cannot be split into {num_streams} data "
                f"streams; set --config.data.shards to a divisor of the batch size"
            )
        self.num_streams = num_streams
        self._sharding = sharding
        self._rows = global_batch_size
        self._per_stream = global_batch_size // num_streams
        self.streams, self.whole = local_streams(sharding, global_batch_size, num_streams)
        self._iterators = {s: open_stream(s) for s in self.streams}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = {s: next(it) for s, it in self._iterators.items()}
        names = next(iter(local.values())).keys()
        return {name: self._global_array({s: b[name] for s, b in local.items()}) for name in names}

    def _global_array(self, parts: dict[int, np.ndarray]) -> jax.Array:
        per = self._per_stream
        sample = next(iter(parts.values()))

        def rows(index):
            # Global rows [start, stop) of one device, cut from the streams that cover them.
            start, stop = _row_range(index, self._rows)
            pieces = [
                parts[s][max(start, s * per) - s * per : min(stop, (s + 1) * per) - s * per]
                for s in range(start // per, (stop - 1) // per + 1)
            ]
            block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # usually one stream
            return block[(slice(None), *index[1:])]

        return jax.make_array_from_callback((self._rows, *sample.shape[1:]), self._sharding, rows)

    # -- position, for checkpoints ---------------------------------------------------------------
    def get_state(self) -> list[dict]:
        """Every stream's position (all processes' streams, gathered); call on every process."""
        return gather_stream_states(
            {s: it.get_state() for s, it in self._iterators.items()}, self.num_streams
        )

    def set_state(self, states: Sequence[dict]) -> None:
        for s, it in self._iterators.items():
            it.set_state(states[s])


def gather_stream_states(local: dict[int, dict], num_streams: int) -> list[dict]:
    """The positions of all streams, from each process's {stream: state}, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = np.frombuffer(json.dumps({str(s): v for s, v in local.items()}).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).ravel()
        buf = np.zeros(int(sizes.max()), np.uint8)
        buf[: raw.size] = raw
        rows = np.asarray(multihost_utils.process_allgather(buf))
        local = {}
        for row, size in zip(rows, sizes):
            local.update({int(s): v for s, v in json.loads(bytes(row[:size]).decode()).items()})
    missing = [s for s in range(num_streams) if s not in local]
    if missing:
        raise RuntimeError(f"no process reads data streams {missing}; the mesh leaves their rows unassigned")
    return [local[s] for s in range(num_streams)]


def primary_first(fn: Callable[[], object], what: str):
    """fn() on process 0, then on the others: caches it builds are read, not raced for, by the rest.

    If it fails on process 0, the others stop too, with a one-line ValueError, rather than wait.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, once the others know
            error = e
    ok = np.asarray(multihost_utils.process_allgather(np.array([error is None])))
    if error is not None:
        raise error
    if not ok.all():
        raise ValueError(f"process 0 could not {what} (its error says why); fix that and relaunch")
    return result if jax.process_index() == 0 else fn()
