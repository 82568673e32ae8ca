"""One path layer for every file mile reads or writes: a local path or a cloud URL (gs://).

Why etils.epath (with fsspec/gcsfs underneath): orbax already reads and writes checkpoints through
epath, so checkpoints and every other file share one notion of a path, one gcsfs client and its
credentials; a local path stays on epath's os backend (where a rename is atomic), a gs:// URL goes
to fsspec/gcsfs (TensorFlow is not installed). Plain fsspec would work too, but then two layers
would decide what a path is.

"A file that exists is complete" holds on both. Locally a file is written beside its target and
os.replace'd over it. GCS has no atomic rename, but one object upload is atomic (a reader sees no
object, the old one or the whole new one), so a remote file is written to a local temporary file
and uploaded in one request. A directory is moved remotely by copying every object, then deleting
the originals, markers last (`move_tree`): a kill part way leaves two copies, never none.

The API, for every caller (data preparation included):
  is_remote(p)                 a URL (scheme://) rather than a local path
  path(p) / join(p, *parts)    an epath.Path / a str; local ones made absolute
  exists, isdir, isfile, listdir, makedirs, read_text, read_bytes, open(p, mode)
  version(p), versions(files)  size and modification time of files, for cache keys
  glob(pattern), files_under(p) the files a pattern or a directory names
  replacing(p)                 a local temporary file to write; becomes `p` whole, or not at all
  write_text, write_bytes      whole files, atomically
  local_copy(p)                a local file holding `p` (for libraries that need a real file)
  download(p, local)           `p` copied to a local path, atomically
  upload_tree(local_dir, p)    every file under a local directory to `p`, each atomically
  move_tree(src, dst)          a directory moved without ever losing a file

Emulator: gcsfs honours STORAGE_EMULATOR_HOST; set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false there too,
or gcsfs first spends 60 s per bucket probing a gRPC bucket-type API the emulator lacks.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import IO, Iterator

from etils import epath

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """An epath.Path: a URL as given, a local path made absolute."""
    s = os.fspath(p)
    return epath.Path(s if is_remote(s) else os.path.abspath(s))


def join(p: PathLike, *parts: str) -> str:
    return os.fspath(path(p).joinpath(*parts))


def _fs(p: PathLike):
    """The fsspec filesystem of a URL, without a listings cache: objects written by another
    process (or by tensorstore, orbax's array store) must show up at the next look."""
    import fsspec  # only remote paths need it

    return fsspec.core.url_to_fs(os.fspath(p), use_listings_cache=False)[0]


def exists(p: PathLike) -> bool:
    return _fs(p).exists(os.fspath(p)) if is_remote(p) else os.path.exists(p)


def isdir(p: PathLike) -> bool:
    return _fs(p).isdir(os.fspath(p)) if is_remote(p) else os.path.isdir(p)


def isfile(p: PathLike) -> bool:
    return _fs(p).isfile(os.fspath(p)) if is_remote(p) else os.path.isfile(p)


def listdir(p: PathLike) -> list[str]:
    """The names in directory `p`, sorted."""
    if not is_remote(p):
        return sorted(os.listdir(p))
    return sorted(os.path.basename(e.rstrip("/")) for e in _fs(p).ls(os.fspath(p), detail=False))


def version(p: PathLike) -> str:
    """Size and modification time of a file: what changes when it is rewritten (a cache key that
    costs one metadata read, not a read of the contents)."""
    if not is_remote(p):
        st = os.stat(p)
        return f"{st.st_size}:{st.st_mtime_ns}"
    info = _fs(p).info(os.fspath(p))
    stamp = info.get("generation") or info.get("updated") or info.get("mtime") or info.get("etag") or ""
    return f"{info.get('size')}:{stamp}"


def glob(pattern: str) -> list[str]:
    """Paths matching a glob (``*``, ``?``, ``[...]``, ``**`` for any depth), sorted."""
    if not is_remote(pattern):
        import glob as _glob

        return sorted(_glob.glob(os.path.abspath(pattern), recursive=True))
    proto = pattern.split("://", 1)[0] + "://"
    return sorted(f if "://" in f else proto + f for f in _fs(pattern).glob(pattern))


def files_under(p: PathLike) -> list[str]:
    """Every file below directory `p`, at any depth, sorted."""
    if not is_remote(p):
        root = os.path.abspath(p)
        return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    proto = os.fspath(p).split("://", 1)[0] + "://"
    return sorted(f if "://" in f else proto + f for f in _fs(p).find(os.fspath(p)))


def versions(files: list[str]) -> list[str]:
    """`version` of each file; remote ones from one listing per directory (one request per
    directory, not one per file, for corpora of thousands of shards)."""
    remote_dirs = {os.path.dirname(f) for f in files if is_remote(f)}
    listed: dict[str, dict] = {}
    for d in remote_dirs:
        proto = d.split("://", 1)[0] + "://"
        for info in _fs(d).ls(d, detail=True):
            name = info["name"] if "://" in info["name"] else proto + info["name"]
            listed[name] = info
    out = []
    for f in files:
        info = listed.get(f)
        if info is None:
            out.append(version(f))
        else:
            stamp = (
                info.get("generation") or info.get("updated") or info.get("mtime") or info.get("etag") or ""
            )
            out.append(f"{info.get('size')}:{stamp}")
    return out


def makedirs(p: PathLike) -> None:
    """Creates a local directory (and its parents); a no-op on object stores, which have none."""
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)


def open(p: PathLike, mode: str = "r") -> IO:  # noqa: A001 (the layer's open)
    """For reading; write through `replacing` or `write_*`, which keep a file whole."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"paths.open({os.fspath(p)!r}, {mode!r}): write with paths.replacing instead")
    text = {} if "b" in mode else {"encoding": "utf-8"}
    if is_remote(p):
        return _fs(p).open(os.fspath(p), mode, **text)
    return builtins.open(p, mode, **text)


def read_text(p: PathLike) -> str:
    with open(p) as f:
        return f.read()


def read_bytes(p: PathLike) -> bytes:
    with open(p, "rb") as f:
        return f.read()


@contextlib.contextmanager
def replacing(p: PathLike) -> Iterator[pathlib.Path]:
    """Yields a local temporary path to write; on success it becomes `p` whole (local: renamed over
    it, atomic on POSIX; remote: uploaded as one object, atomic on GCS). On an exception `p` is left
    as it was.

    The temporary name keeps the suffix (`x.tmp123.npy`), so writers that append one (np.save,
    np.savez) write exactly the yielded path; it carries the pid, so processes never share it.
    """
    s = os.fspath(p)
    if is_remote(s):
        with tempfile.TemporaryDirectory(prefix="mile-upload-") as d:
            tmp = pathlib.Path(d) / os.path.basename(s)
            yield tmp
            _upload(tmp, s)
        return
    target = pathlib.Path(s)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _upload(local: PathLike, url: str) -> None:
    # One request (gcsfs: a simple or resumable upload): the object appears only when complete.
    _fs(url).put_file(os.fspath(local), url)


def write_text(p: PathLike, text: str) -> None:
    """`text` to `p` (UTF-8), atomically."""
    with replacing(p) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(p: PathLike, data: bytes) -> None:
    with replacing(p) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[pathlib.Path]:
    """A local file with the contents of `p` (the file itself when `p` is local)."""
    if not is_remote(p):
        yield pathlib.Path(os.path.abspath(p))
        return
    with tempfile.TemporaryDirectory(prefix="mile-download-") as d:
        local = pathlib.Path(d) / os.path.basename(os.fspath(p))
        _fs(p).get_file(os.fspath(p), os.fspath(local))
        yield local


def download(p: PathLike, local: PathLike) -> None:
    """`p` (local or remote) copied to the local path `local`, which appears only when complete."""
    with replacing(local) as tmp:
        if is_remote(p):
            _fs(p).get_file(os.fspath(p), os.fspath(tmp))
        else:
            shutil.copyfile(p, tmp)


def upload_tree(local_dir: PathLike, dest: PathLike) -> None:
    """Every file under `local_dir` to the same relative place under `dest`, each one atomically
    (a local `dest` gets copies). Re-uploading replaces the objects with the newer contents."""
    local_dir = pathlib.Path(local_dir)
    for f in sorted(x for x in local_dir.rglob("*") if x.is_file()):
        target = join(dest, *f.relative_to(local_dir).parts)
        if is_remote(dest):
            _upload(f, target)
        else:
            with replacing(target) as tmp:
                shutil.copyfile(f, tmp)


def move_tree(src: PathLike, dst: PathLike, *, markers_last: tuple[str, ...] = ()) -> None:
    """Moves directory `src` to `dst` (which must not exist) without ever losing a file.

    Locally one rename. Remotely every object is copied (server side), then the originals are
    deleted, the files named in `markers_last` (e.g. a commit marker) after all the others: a kill
    part way leaves the complete copy at `dst` and at `src` either everything or a directory
    without some of its files but with its markers, which readers treat as incomplete.
    """
    if not is_remote(src):
        os.rename(src, dst)
        return
    fs = _fs(src)
    src_s, dst_s = os.fspath(src).rstrip("/"), os.fspath(dst).rstrip("/")
    if fs.exists(dst_s):
        raise FileExistsError(f"{dst_s} exists; not moving {src_s} over it")
    proto = src_s.split("://", 1)[0] + "://"
    files = [proto + f if "://" not in f else f for f in fs.find(src_s)]
    for f in files:
        fs.copy(f, dst_s + f[len(src_s) :])
    markers = [f for f in files if os.path.basename(f) in markers_last]
    others = [f for f in files if f not in markers]
    if others:
        fs.rm(others)
    if markers:
        fs.rm(markers)
    fs.invalidate_cache()
