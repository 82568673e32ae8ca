"""Write-then-rename: a file that exists is always complete, whatever kills the writer."""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` to write; on success it is renamed over `path`
    (atomic on POSIX), on an exception it is removed and `path` is left as it was.

    The temporary name keeps the suffix (`x.tmp123.npy`), so writers that append one (np.save,
    np.savez) write exactly the yielded path; it carries the pid, so processes never share it.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` to `path` (UTF-8), atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
