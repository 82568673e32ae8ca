"""Input formats: one file in, its documents out, in file order, streamed (never the whole file).

Each reader yields, for every record of the file, either the document (``str``) or a
``Malformed`` naming the file and line (or row) and what is wrong with it; what to do with a
malformed record (stop, or skip and count) is the caller's rule (``mile.data.corpus``). Formats,
chosen by the file name:

  ``.txt``                      documents separated by blank lines
  ``.jsonl`` ``.jsonl.gz`` ``.jsonl.zst``   one JSON object per line, the text in ``text_key``
  ``.parquet``                  one row per document, the text in column ``text_key``

A record whose text is empty (or only whitespace) is not malformed: it is an empty document,
counted apart and not trained on. Paths may be local or gs:// (read through ``mile.paths``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import sys
import zlib
from typing import IO, Callable, Iterator

from mile import paths


@dataclasses.dataclass(frozen=True)
class Malformed:
    """A record that is not a document: ``where`` is ``file:line`` (or ``file:row N``)."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


class Empty:
    """A record whose text is empty or whitespace only."""


EMPTY = Empty()
Record = str | Malformed | Empty


def _lines(raw: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for lineno, line in enumerate(raw, 1):
        yield lineno, line


def _decoded_lines(name: str, raw: IO[bytes]) -> Iterator[tuple[int, str | Malformed]]:
    for lineno, line in _lines(raw):
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, Malformed(f"{name}:{lineno}", f"is not UTF-8 ({e.reason} at byte {e.start})")


def read_txt(name: str, raw: IO[bytes], text_key: str) -> Iterator[Record]:
    """Blank-line separated documents; a line that is not UTF-8 is malformed (the rest of its
    document is kept)."""
    del text_key
    lines: list[str] = []
    for _, line in _decoded_lines(name, raw):
        if isinstance(line, Malformed):
            yield line
            continue
        line = line.replace("\r\n", "\n")
        if line.strip(" \t\n") == "":  # a separator: only spaces and tabs
            if lines:
                yield _txt_document(lines)
                lines = []
            continue
        lines.append(line)
    if lines:
        yield _txt_document(lines)


def _txt_document(lines: list[str]) -> Record:
    doc = "".join(lines).strip("\n")
    return doc if doc.strip() else EMPTY


def read_jsonl(name: str, raw: IO[bytes], text_key: str) -> Iterator[Record]:
    """One JSON object per line with a string ``text_key``; blank lines are skipped silently (they
    hold no record)."""
    for lineno, line in _decoded_lines(name, raw):
        if isinstance(line, Malformed):
            yield line
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Malformed(f"{name}:{lineno}", f"is not JSON ({e.msg})")
            continue
        if not isinstance(obj, dict) or text_key not in obj:
            yield Malformed(f"{name}:{lineno}", f"is not a JSON object with a {text_key!r} field")
            continue
        text = obj[text_key]
        if not isinstance(text, str):
            yield Malformed(f"{name}:{lineno}", f"field {text_key!r} is {type(text).__name__}, not a string")
            continue
        if "\\u" in line and not _is_unicode(text):  # only a \u escape can make a lone surrogate
            yield Malformed(
                f"{name}:{lineno}", f"field {text_key!r} holds a lone surrogate (not Unicode text)"
            )
            continue
        yield text if text.strip() else EMPTY


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_parquet(name: str, raw: IO[bytes], text_key: str) -> Iterator[Record]:
    """One row per document, the text in column ``text_key`` (rows counted from 1)."""
    import pyarrow.parquet as pq  # only parquet needs it

    try:
        table = pq.ParquetFile(raw)
    except Exception as e:  # pyarrow's errors vary by what is wrong with the file
        raise ValueError(
            f"{name} is not a parquet file ({str(e).splitlines()[0]}); fix or remove it."
        ) from None
    columns = table.schema_arrow.names
    if text_key not in columns:
        raise ValueError(f"{name} has no column {text_key!r} (has {columns}); set data.text_key.")
    row = 0
    for batch in table.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                what = "null" if text is None else type(text).__name__
                yield Malformed(f"{name}:row {row}", f"column {text_key!r} is {what}, not a string")
                continue
            yield text if text.strip() else EMPTY


def _gunzip(raw: IO[bytes]) -> IO[bytes]:
    return gzip.GzipFile(fileobj=raw)


class _ZstdReader(io.RawIOBase):
    """A .zst stream of one or more frames, decompressed as it is read. zstandard's own stream
    reader ends quietly at a truncated frame; this raises EOFError there instead. Input is fed
    64 KiB at a time, so what waits to be read stays bounded by that times the compression ratio."""

    _INPUT = 1 << 16

    def __init__(self, raw: IO[bytes]):
        import zstandard  # only .zst needs it

        self._raw, self._zstd = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending, self._offset = b"", 0  # decompressed bytes, and how many were read
        self._in_frame = False  # bytes of the current frame were read and it has not ended

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._offset == len(self._pending):
            chunk = self._raw.read(self._INPUT)
            if not chunk:
                if self._in_frame:
                    raise EOFError("compressed data ended before the end of a zstd frame")
                return 0
            out = []
            while chunk:
                self._in_frame = True
                out.append(self._frame.decompress(chunk))
                chunk = b""
                if self._frame.eof:  # a frame ended; what follows starts the next one
                    chunk = self._frame.unused_data
                    self._frame = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
            self._pending, self._offset = b"".join(out), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        return n


def _unzstd(raw: IO[bytes]) -> IO[bytes]:
    return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)


Reader = Callable[[str, IO[bytes], str], Iterator[Record]]
# suffix -> (decompression, reader); the longest matching suffix wins.
FORMATS: dict[str, tuple[Callable[[IO[bytes]], IO[bytes]] | None, Reader]] = {
    ".txt": (None, read_txt),
    ".jsonl": (None, read_jsonl),
    ".jsonl.gz": (_gunzip, read_jsonl),
    ".jsonl.zst": (_unzstd, read_jsonl),
    ".parquet": (None, read_parquet),
}


def format_of(path: str) -> str | None:
    """The FORMATS suffix of ``path`` (case-insensitive), or None."""
    lower = path.lower()
    matches = [suffix for suffix in FORMATS if lower.endswith(suffix)]
    return max(matches, key=len) if matches else None


def read_file(path: str, text_key: str = "text") -> Iterator[Record]:
    """Every record of one file, in order (see the module docstring)."""
    suffix = format_of(path)
    if suffix is None:
        raise ValueError(f"corpus file {path} has an unsupported name; use one of {', '.join(FORMATS)}.")
    if not paths.isfile(path):
        raise ValueError(f"corpus file {path} does not exist; check data.text_files.")
    decompress, reader = FORMATS[suffix]
    with paths.open(path, "rb") as raw:
        stream = decompress(raw) if decompress else raw
        try:
            yield from reader(path, stream, text_key)
        except Exception as e:
            if not _is_damaged_stream(e):
                raise
            raise ValueError(
                f"{path} cannot be read to the end ({type(e).__name__}: {e}); the file is damaged: fetch it again."
            ) from None


def _is_damaged_stream(e: Exception) -> bool:
    """A truncated or corrupt gzip/zstd stream (gzip: EOFError, OSError, zlib.error; zstd: ZstdError)."""
    return isinstance(e, (EOFError, OSError, zlib.error)) or type(e).__name__ == "ZstdError"


def expand(patterns: tuple[str, ...] | list[str], report=None) -> list[str]:
    """Files named by ``patterns``, each a file, a directory (every supported file under it) or a
    glob (``*``, ``?``, ``[...]``, ``**``); sorted within each pattern, in pattern order, each once.
    Files a directory or glob holds in other formats are not read: ``report`` (default: stderr)
    gets one line naming how many and the first few."""
    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        found, skipped = _expand_one(str(pattern))
        if skipped:
            names = ", ".join(os.path.basename(f) for f in skipped[:3])
            line = (
                f"data.text_files entry {pattern!r}: {len(skipped)} file(s) not in a supported format "
                f"are not read ({names}{', ...' if len(skipped) > 3 else ''})"
            )
            (report or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
        if not found:
            raise ValueError(
                f"data.text_files entry {pattern!r} matches no {'/'.join(FORMATS)} file; check the path or glob."
            )
        for f in found:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out


def _expand_one(pattern: str) -> tuple[list[str], list[str]]:
    """(the supported files a pattern names, the other files it matched)."""
    if any(c in pattern for c in "*?["):
        matched = [m for m in paths.glob(pattern) if paths.isfile(m)]
    elif paths.isdir(pattern):
        matched = paths.files_under(pattern)
    else:
        if format_of(pattern) is None:
            raise ValueError(
                f"corpus file {pattern} has an unsupported name; use one of {', '.join(FORMATS)}."
            )
        if not paths.isfile(pattern):
            raise ValueError(f"corpus file {pattern} does not exist; check data.text_files.")
        return [paths.join(pattern)], []
    return [m for m in matched if format_of(m)], [m for m in matched if not format_of(m)]
