"""Raw text corpora: fetch the King James Bible offline and read local document files.

A corpus is a sequence of documents (strings) read from files in any format of
``mile.data.sources``; this module applies the one rule for records that are not documents.

``fetch_kjv`` writes JSONL with one document per chapter (1,189 documents); each
document is that chapter's verses, one verse per line, without verse references.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from typing import Iterator, Sequence

from mile import atomic
from mile.data import sources
from mile.data.config import BAD_RECORDS

KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")


class CorpusError(ValueError):
    """The corpus cannot be obtained here; the message says what to do instead."""


KJV_RANGE = "gen1:1-rev22:21"
# "Ge1:1 In the beginning ..." / "1Sa3:4 ..." -> (book, chapter, verse text).
_VERSE_LINE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):\d+ (.*)$")


def fetch_kjv(cache_dir: str | os.PathLike) -> pathlib.Path:
    """Returns ``<cache_dir>/corpora/kjv.jsonl``, building it from Debian packages if missing.

    Needs ``apt-get`` and ``dpkg-deb`` (Debian/Ubuntu) and access to a Debian mirror the
    first time; later calls return the cached file without touching the network.
    """
    out = pathlib.Path(cache_dir) / "corpora" / "kjv.jsonl"
    if out.exists() and out.stat().st_size > 0:
        return out
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(
                f"fetch_kjv needs `{tool}` (Debian/Ubuntu); use data.source='text' with your own files instead."
            )
    with tempfile.TemporaryDirectory(prefix="kjv-") as tmp:
        tmp = pathlib.Path(tmp)
        _apt_download(tmp)
        root = tmp / "root"
        for deb in sorted(tmp.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(root)])
        verses = _run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), KJV_RANGE])
        chapters = _chapters_from_bible_output(verses)
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl_atomically(out, chapters)
    return out


def _apt_download(dest: pathlib.Path) -> None:
    """`apt-get download` the KJV packages into dest, refreshing apt lists once if root."""
    cmd = ["apt-get", "download", *KJV_PACKAGES]
    try:
        _run(cmd, cwd=dest)
        return
    except CorpusError as first_error:
        # The usual cause is a container with no apt lists ("Unable to locate package").
        if os.geteuid() != 0:
            raise CorpusError(
                f"`apt-get download {' '.join(KJV_PACKAGES)}` failed ({first_error}); run `sudo apt-get update` and retry."
            ) from None
    _run(["apt-get", "update"])
    _run(cmd, cwd=dest)


def _run(cmd: Sequence[str], cwd: pathlib.Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CorpusError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {last}")
    return proc.stdout


def _chapters_from_bible_output(text: str) -> list[str]:
    """Groups `bible -f` verse lines into one document per (book, chapter)."""
    chapters: list[list[str]] = []
    current = None
    for line in text.splitlines():
        match = _VERSE_LINE.match(line)
        if match is None:
            continue  # blank lines or banners; every verse line matches.
        book, chapter, verse = match.groups()
        if (book, chapter) != current:
            current = (book, chapter)
            chapters.append([])
        chapters[-1].append(verse.strip())
    if not chapters:
        raise CorpusError(
            "the extracted `bible` program printed no verses; the package format may have changed."
        )
    return ["\n".join(c) for c in chapters]


def _write_jsonl_atomically(path: pathlib.Path, docs: Sequence[str], key: str = "text") -> None:
    # An interrupted run never leaves a half-written cache file.
    with atomic.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc}, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, docs: Sequence[str], key: str = "text") -> pathlib.Path:
    """Writes documents as JSONL (handy for tests and for converting corpora)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl_atomically(path, docs, key)
    return path


class Counts:
    """What reading a corpus kept and dropped: ``documents``, ``empty`` (whitespace-only text),
    ``malformed`` (skipped under ``data.bad_records="skip"``) and the first few malformed records."""

    def __init__(self):
        self.documents = self.empty = self.malformed = 0
        self.examples: list[str] = []

    def as_dict(self) -> dict[str, int]:
        return {"documents": self.documents, "empty": self.empty, "malformed": self.malformed}


def iter_documents(
    path: str | os.PathLike, text_key: str = "text", bad_records: str = "error", counts: Counts | None = None
) -> Iterator[str]:
    """The documents of one file (any format of ``mile.data.sources``), in order.

    A malformed record stops the read with a ValueError naming its file and line, unless
    ``bad_records="skip"``: then it is skipped and counted in ``counts`` (its place is kept in
    the first ten ``counts.examples``). Empty documents are counted and skipped.
    """
    if bad_records not in BAD_RECORDS:
        raise ValueError(f"data.bad_records={bad_records!r} is not one of {BAD_RECORDS}.")
    counts = counts if counts is not None else Counts()
    for record in sources.read_file(os.fspath(path), text_key):
        if isinstance(record, str):
            counts.documents += 1
            yield record
        elif isinstance(record, sources.Malformed):
            if bad_records == "error":
                raise ValueError(
                    f"{record}; fix the record, set data.text_key, or set data.bad_records=skip to skip "
                    "and count malformed records."
                )
            counts.malformed += 1
            if len(counts.examples) < 10:
                counts.examples.append(str(record))
        else:
            counts.empty += 1


def read_documents(paths: Sequence[str | os.PathLike], text_key: str = "text") -> list[str]:
    """Every document of the given files (patterns allowed), in order; for small corpora and tests."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no corpus files given; set data.text_files to files, directories or globs.")
    files = sources.expand([os.fspath(p) for p in paths])
    docs = [doc for f in files for doc in iter_documents(f, text_key)]
    if not docs:
        names = ", ".join(str(p) for p in paths)
        raise ValueError(
            f"corpus {names} contains no documents; add text (see mile.data.sources for the formats)."
        )
    return docs
