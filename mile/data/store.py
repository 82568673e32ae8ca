"""A prepared dataset on disk: sharded ArrayRecord files, built unit by unit, committed by a manifest.

A store directory holds::

    manifest.json                          written last: a store without it is not complete
    units/<unit>.json                      one per finished unit of work (its shards and counts)
    <split>-<unit:05d>-<part:03d>.arrayrecord

Every split is the concatenation of its shards in (unit, part) order, read with grain's
``ArrayRecordDataSource`` as one random-access sequence. A record is one document: ``kind
"text"`` stores its UTF-8 bytes, ``kind "tokens"`` its ids (little-endian ``uint16`` when the
vocabulary fits, else ``int32``; the EOS the pipeline puts after a document is not stored).

Building (``build``) runs independent units (an input file, or a shard of another store) in
``workers`` processes, or as an Apache Beam pipeline on any runner (Dataflow, Flink, Spark; the
DirectRunner here); each unit writes its own shards, then its ``units/`` entry, and the same
units give the same files whichever runs them. A build killed
midway leaves no manifest, so nothing reads it as complete; running it again keeps the finished
units and redoes the rest. The files are written uncompressed with one record per group, so a
random read touches one record.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from mile import paths

FORMAT = 1
MANIFEST = "manifest.json"
_WRITER_OPTIONS = "group_size:1,uncompressed"
# A unit starts a new file after this many bytes, so one huge input still gives several shards
# (and a corpus of hundreds of GB some hundreds of files, not thousands: readers keep each open).
SHARD_BYTES = 1 << 30


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest id type for a vocabulary: uint16 up to 65,536 ids, else int32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


class ShardWriter:
    """Writes one split of one unit: ``<split>-<unit>-<part>.arrayrecord`` files of about
    ``shard_bytes`` each; ``shards`` lists (file name, records) of what was written."""

    def __init__(self, directory: pathlib.Path, split: str, unit: int, shard_bytes: int | None = None):
        self._directory, self._split, self._unit = directory, split, unit
        self._shard_bytes = shard_bytes or SHARD_BYTES
        self.shards: list[tuple[str, int]] = []
        self._writer = None
        self._bytes = 0

    def write(self, record: bytes) -> None:
        if self._writer is None or self._bytes >= self._shard_bytes:
            self._open_next()
        self._writer.write(record)
        self._bytes += len(record)
        name, count = self.shards[-1]
        self.shards[-1] = (name, count + 1)

    def _open_next(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self._close_current()
        name = f"{self._split}-{self._unit:05d}-{len(self.shards):03d}.arrayrecord"
        self._writer = ArrayRecordWriter(str(self._directory / name), _WRITER_OPTIONS)
        self.shards.append((name, 0))
        self._bytes = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[tuple[str, int]]:
        self._close_current()
        return self.shards


def encode_record(doc: str | np.ndarray, dtype: np.dtype | None) -> bytes:
    if dtype is None:
        return doc.encode("utf-8")
    return np.asarray(doc).astype(dtype, copy=False).tobytes()


def decode_record(record: bytes, dtype: np.dtype | None) -> str | np.ndarray:
    if dtype is None:
        return record.decode("utf-8")
    return np.frombuffer(record, dtype=dtype)


# -- building --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: ``run(directory, index)`` writes that unit's shards and returns its
    summary, a JSON-able dict with ``"shards": {split: [[name, records], ...]}`` and counts."""

    index: int
    run: Callable[[pathlib.Path, int], dict]
    label: str = ""


def _unit_path(directory: str, index: int) -> str:
    return paths.join(directory, "units", f"{index:05d}.json")


def _run_unit(directory: str, unit: Unit) -> dict:
    """Runs one unit in a directory of its own, then publishes its files into the store, each one
    whole (a rename locally, one upload per object on gs://: ArrayRecord writes only to a
    filesystem), then its ``units/`` entry. Two builds of the same store at once (two runs sharing
    a cache) then never write into each other's files."""
    started = time.perf_counter()
    remote = paths.is_remote(directory)
    with tempfile.TemporaryDirectory(
        prefix=f".unit-{unit.index:05d}-", dir=None if remote else directory
    ) as own:
        summary = dict(unit.run(pathlib.Path(own), unit.index))
        if remote:
            paths.upload_tree(own, directory)
        else:
            for name in os.listdir(own):
                os.replace(os.path.join(own, name), os.path.join(directory, name))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    paths.write_text(_unit_path(directory, unit.index), json.dumps(summary))
    return summary


class _RunUnits:
    """The Beam step: runs each unit it is given (a class, so runners can pickle it)."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, unit: Unit) -> int:
        _run_unit(self.directory, unit)
        return unit.index


def build(
    directory: str | os.PathLike,
    units: Sequence[Unit],
    *,
    kind: str,
    dtype: np.dtype | None,
    meta: dict,
    workers: int = 1,
    runner: str = "local",
    beam_options: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> dict:
    """Builds the store at ``directory`` (unless its manifest exists) and returns the manifest.

    ``runner="local"`` runs the units in ``workers`` processes of this machine; any other value is
    an Apache Beam runner ("DirectRunner", "DataflowRunner", "FlinkRunner", ...), given
    ``beam_options`` (its command-line options), which runs them wherever it runs its workers:
    they must all be able to write ``directory`` (a gs:// URL, or a shared filesystem).
    """
    directory = os.fspath(directory)
    if paths.isfile(paths.join(directory, MANIFEST)):
        return read_manifest(directory)
    paths.makedirs(paths.join(directory, "units"))
    done = {u.index: _read_unit(directory, u.index) for u in units}
    todo = [u for u in units if done[u.index] is None]
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if len(todo) < len(units):
        say(f"{directory}: {len(units) - len(todo)} of {len(units)} units already done, resuming")
    if runner == "local":
        started = last_said = time.perf_counter()
        for summary in _map_units(directory, todo, workers):
            done[summary["unit"]] = summary
            now = time.perf_counter()
            if now - last_said > 30:  # progress on long builds only
                finished = sum(s is not None for s in done.values())
                say(f"{directory}: {finished}/{len(units)} units ({now - started:.0f} s)")
                last_said = now
    elif todo:
        _run_beam(directory, todo, runner, beam_options)
        done.update({u.index: _read_unit(directory, u.index) for u in todo})
        missing = [u.label or str(u.index) for u in todo if done[u.index] is None]
        if missing:
            raise RuntimeError(
                f"the {runner} pipeline finished but units {missing[:5]} wrote nothing; see its log."
            )
    manifest = _manifest([done[u.index] for u in units], kind=kind, dtype=dtype, meta=meta)
    paths.write_text(paths.join(directory, MANIFEST), json.dumps(manifest, indent=1))  # last: the commit
    return manifest


def _run_beam(directory: str, units: Sequence[Unit], runner: str, beam_options: Sequence[str]) -> None:
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ValueError(
            f"runner={runner!r} needs Apache Beam; pip install -r requirements-dev.txt (or apache-beam), "
            "or run with --workers N on this machine."
        ) from None
    options = PipelineOptions(list(beam_options))
    with beam.Pipeline(runner=runner, options=options) as pipeline:
        _ = (
            pipeline
            | "units" >> beam.Create(list(units))
            | "spread" >> beam.Reshuffle()  # one unit per worker task, not all in one bundle
            | "run" >> beam.Map(_RunUnits(directory))
        )


def _map_units(directory: str, units: Sequence[Unit], workers: int) -> Iterator[dict]:
    if workers <= 1 or len(units) <= 1:
        for unit in units:
            yield _run_unit(directory, unit)
        return
    # spawn, not fork: the caller may be a JAX process with threads running. An executor, not a
    # Pool: a worker that dies (killed, out of memory) fails the build instead of hanging it.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(units)), mp_context=context) as pool:
        pending = [pool.submit(_run_unit, directory, u) for u in units]
        try:
            for future in concurrent.futures.as_completed(pending):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the error now, not after every unit
            raise


def _read_unit(directory: str, index: int) -> dict | None:
    path = _unit_path(directory, index)
    if not paths.isfile(path):
        return None
    summary = json.loads(paths.read_text(path))
    # A unit whose shard files went missing is redone.
    for shards in summary["shards"].values():
        if any(not paths.isfile(paths.join(directory, name)) for name, _ in shards):
            return None
    return summary


def _manifest(summaries: Sequence[dict], *, kind: str, dtype: np.dtype | None, meta: dict) -> dict:
    splits: dict[str, dict[str, list]] = {}
    counts: dict[str, int] = {}
    examples: list[str] = []
    for summary in summaries:
        for split, shards in summary["shards"].items():
            entry = splits.setdefault(split, {"shards": [], "records": []})
            for name, records in shards:
                entry["shards"].append(name)
                entry["records"].append(int(records))
        for key, value in summary.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + int(value)
        examples.extend(summary.get("malformed_examples", [])[: max(0, 10 - len(examples))])
    return {
        "format": FORMAT,
        "kind": kind,
        "dtype": None if dtype is None else np.dtype(dtype).str,
        "splits": splits,
        "counts": counts,
        "malformed_examples": examples,
        "meta": meta,
    }


def read_manifest(directory: str | os.PathLike) -> dict:
    path = paths.join(directory, MANIFEST)
    if not paths.isfile(path):
        raise ValueError(f"{directory} is not a complete prepared dataset (no {MANIFEST}); run mile.prepare.")
    manifest = json.loads(paths.read_text(path))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory} was prepared by another version of mile; delete it and prepare again.")
    return manifest


def is_complete(directory: str | os.PathLike) -> bool:
    return paths.isfile(paths.join(directory, MANIFEST))


# -- reading ---------------------------------------------------------------------------------------


def readable_copy(directory: str | os.PathLike) -> pathlib.Path:
    """The store as a local directory ArrayRecord can read (it opens local files only): the store
    itself, or for a gs:// store a mirror on this host's disk under $TMPDIR/mile-cache/stores/,
    copied on first use. Each file lands whole and the manifest comes last, so a copy cut short
    is finished by the next open (the shards it already holds are kept when the remote manifest
    is the one the copy started from) and a store rebuilt under the same name is copied afresh.
    For a store larger than a host's disk, mount the bucket (gcsfuse) and point at the mount."""
    if not paths.is_remote(directory):
        return pathlib.Path(directory)
    manifest = read_manifest(directory)  # the clear error for an incomplete remote store
    text = json.dumps(manifest, sort_keys=True)
    digest = hashlib.sha256(os.fspath(directory).encode()).hexdigest()[:16]
    local = pathlib.Path(tempfile.gettempdir()) / "mile-cache" / "stores" / digest
    if is_complete(local) and json.dumps(read_manifest(local), sort_keys=True) == text:
        return local
    copying = local / "COPYING"  # the manifest this (partial) copy belongs to
    if not (copying.is_file() and copying.read_text() == text):
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        paths.write_text(copying, text)
    started = time.perf_counter()
    for name in sorted({n for split in manifest["splits"].values() for n in split["shards"]}):
        if not (local / name).is_file():
            paths.download(paths.join(directory, name), local / name)
    paths.download(paths.join(directory, MANIFEST), local / MANIFEST)
    print(f"copied {directory} to {local} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return local


class StoreSource:
    """One split of a store as a random-access sequence of documents (``str``, or int ids)."""

    def __init__(self, directory: str | os.PathLike, split: str):
        import grain  # reading only

        directory = readable_copy(directory)
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise ValueError(f"{directory} has no split {split!r} (has {sorted(manifest['splits'])}).")
        entry = manifest["splits"][split]
        self.directory, self.split = directory, split
        self.kind = manifest["kind"]
        self.dtype = None if manifest["dtype"] is None else np.dtype(manifest["dtype"])
        files = [str(directory / name) for name, n in zip(entry["shards"], entry["records"]) if n > 0]
        self._length = int(sum(entry["records"]))
        self._source = grain.sources.ArrayRecordDataSource(files) if files else None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} documents")
        return decode_record(self._source[index], self.dtype)

    def __getitems__(self, indices: Sequence[int]) -> list:
        return [decode_record(r, self.dtype) for r in self._source.__getitems__(list(indices))]

    _getitems = __getitems__  # grain's name for a batched read

    def __repr__(self) -> str:
        return f"StoreSource({str(self.directory)!r}, {self.split!r}, {self._length} {self.kind} documents)"


def iter_records(directory: str, name: str, chunk: int = 1024) -> Iterator[bytes]:
    """The records of one shard file, in order, read in chunks (bounded memory); a remote shard
    is read from a local copy."""
    from array_record.python.array_record_module import ArrayRecordReader

    with paths.local_copy(paths.join(directory, name)) as local:
        reader = ArrayRecordReader(str(local), "readahead_buffer_size:16777216")
        try:
            total = reader.num_records()
            for start in range(0, total, chunk):
                yield from reader.read(list(range(start, min(start + chunk, total))))
        finally:
            reader.close()


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
