"""A small wrapper over orbax-checkpoint's `CheckpointManager`.

One checkpoint per step under `<workdir>/checkpoints/<step>/`, a composite of three items:

  state       StandardSave: the pytree of jax arrays (model parameters, optimiser state and step).
  data_state  JsonSave: the data iterator's JSON-serialisable state.
  config      JsonSave: the run config as a plain dict (ConfigDict.to_dict()).

Choices:
  * Saves are asynchronous by default. Orbax copies the arrays to host memory before `save`
    returns, so the caller may donate / overwrite the device buffers straight away; only the
    file writes happen in the background. `wait()` blocks until they are done.
  * The caller decides the cadence: the manager is built with `save_interval_steps=1`, so every
    `save` call writes (orbax's own policy never silently drops one).
  * Nothing on disk is ever overwritten: saving a step that already exists is skipped with a
    warning and `save` returns False (e.g. the final save of a run resumed at its last step).
  * Multi-process: every process calls `save` / `restore` / `wait` / `close`; orbax coordinates
    the directory creation, barriers and which process writes which shards.
  * Typed PRNG keys (`jax.random.key(0)`) are saved and restored as such (orbax 0.12 stores the
    key data and re-wraps it on restore).

Integrity (mile.integrity): every save adds a fourth item, `integrity`, with a checksum of each
state array and a SHA-256 of the data state and config, written in the same atomic orbax save.
`restore` recomputes and compares them. A checkpoint that cannot be read (truncated file, missing
item) or whose checksums differ raises `CorruptCheckpointError`, one line saying which step and why.
A checkpoint saved before checksums existed restores with a warning.

Steps: `steps()` lists the step directories orbax finalised; a step is usable when it reads and
verifies. A directory missing orbax's `_CHECKPOINT_METADATA` or an item directory (a kill while
orbax deletes an old step, or damage) is a CorruptCheckpointError at the first read. Choosing
which step to resume from (walking back past the unusable ones) is mile.restore's job.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable

import orbax.checkpoint as ocp

from mile import integrity, paths

log = logging.getLogger(__name__)

_ITEMS = ("state", "data_state", "config", "integrity")
_REQUIRED = ("state", "data_state", "config")  # "integrity" is absent from older checkpoints
_ORBAX_METADATA = "_CHECKPOINT_METADATA"
# What orbax writes last to say a step is finished (the second one on GCS, where it cannot rename).
FINISH_MARKERS = (_ORBAX_METADATA, "commit_success.txt")


class CorruptCheckpointError(ValueError):
    """A checkpoint step that cannot be read or fails its integrity check; the message says which."""

    def __init__(self, directory, step: int, problem: str, message: str | None = None):
        super().__init__(message or f"checkpoint step {step} in {directory} {problem}")
        self.step, self.problem = int(step), problem


def _reason(e: BaseException) -> str:
    """The innermost cause of an exception, as one short line."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _is_read_failure(e: Exception) -> bool:
    # Orbax reports a failed array read as a bare `Exception` wrapping tensorstore's error; a
    # missing item is a KeyError; a damaged JSON item a ValueError; a missing file an OSError.
    return type(e) is Exception or isinstance(e, (KeyError, ValueError, OSError))


def _is_abandoned_read_noise(unraisable) -> bool:
    e, obj = unraisable.exc_value, unraisable.object
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return True
    return getattr(getattr(obj, "cr_code", None), "co_name", "") == "_read_array_index_and_device_put"


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's reports about an abandoned tensorstore read: its exception never retrieved,
    or (when the machine is busy and the read had not finished when orbax gave up) its task
    destroyed while still pending. Which of them appears depends on timing, so all are dropped."""

    _KINDS = (
        "Future exception was never retrieved",
        "Task exception was never retrieved",
        "Task was destroyed but it is pending",
    )
    _ABANDONED_READ = ("tensorstore_spec", "_read_array_index_and_device_put", "_read_and_create_array")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        text = message + str(record.exc_info[1] if record.exc_info else "")
        return not (message.startswith(self._KINDS) and any(m in text for m in self._ABANDONED_READ))


def _quiet_abandoned_reads() -> None:
    """When a restore fails, orbax gives up on its other array reads: tensorstore still finishes
    them and their callbacks raise "Event loop is closed", and their coroutines are collected with
    their own read errors unretrieved. Both reach sys.unraisablehook, and a collected future with
    such an error reaches asyncio's logger; either would print tracebacks around our one-line
    message. Drop exactly those kinds; every other unraisable exception still goes to the previous
    hook, and every other asyncio record is logged. Installed once, before any read."""
    previous = sys.unraisablehook
    if getattr(previous, "_mile_quiet", False):
        return
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())

    def hook(unraisable):
        if not _is_abandoned_read_noise(unraisable):
            previous(unraisable)

    hook._mile_quiet = True
    sys.unraisablehook = hook


def checkpoint_dir(workdir) -> str:
    """Where a run in `workdir` keeps its checkpoints."""
    return paths.join(workdir, "checkpoints")


class Checkpointer:
    """Save / restore (state pytree, data iterator state, config) by step."""

    @classmethod
    def reader(cls, directory) -> "Checkpointer":
        """One that only reads: never creates, saves or deletes anything."""
        return cls(directory, max_to_keep=None, read_only=True)

    def __init__(
        self, directory, *, max_to_keep: int | None, async_save: bool = True, read_only: bool = False
    ):
        """`read_only`: for readers (evaluate, export, the trainer's checks): never creates,
        saves or deletes anything."""
        self.directory = paths.path(directory)
        # Readers never save, so nothing is ever deleted; create=False keeps them from making the
        # directory. (orbax's own read_only option logs a warning on every use.)
        self._read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=1,
            create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    # -- queries ---------------------------------------------------------------------------------
    def _step_dir(self, step: int) -> str:
        return paths.join(self.directory, str(int(step)))

    def missing_parts(self, step: int) -> list[str]:
        """What a finalised step directory lacks (orbax's metadata file, item directories)."""
        d = self._step_dir(step)
        missing = [] if paths.exists(paths.join(d, _ORBAX_METADATA)) else [_ORBAX_METADATA]
        return missing + [f"{item}/" for item in _REQUIRED if not paths.isdir(paths.join(d, item))]

    def steps(self) -> list[int]:
        """Every step directory orbax finalised, ascending. Whether a step is usable is known only
        by reading it: `restore` and `saved_config` raise CorruptCheckpointError for one that is
        incomplete or fails its checks (mile.restore walks back past those)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_state: dict, config: dict, force: bool = False) -> bool:
        """Starts saving `step` (asynchronously unless async_save=False). Returns whether it saved.

        A step that already exists on disk is never overwritten: the call logs a warning and
        returns False. `force` is passed to orbax (bypasses its save-interval policy, which with
        `save_interval_steps=1` already accepts every step).
        """
        step = int(step)
        if self._read_only:
            raise RuntimeError("this Checkpointer was opened read_only")
        if step in self._mngr.all_steps():
            log.warning(
                "checkpoint for step %d already exists in %s; not overwriting it", step, self.directory
            )
            return False
        checksums = {
            "format": 1,
            "state": integrity.tree_checksums(state),
            "data_state": integrity.json_digest(dict(data_state)),
            "config": integrity.json_digest(dict(config)),
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(dict(config)),
            integrity=ocp.args.JsonSave(checksums),
        )
        return bool(self._mngr.save(step, args=args, force=force))

    def wait(self) -> None:
        """Blocks until every pending (async) save has been written and finalised."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager's resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restore ---------------------------------------------------------------------------------
    def _read(self, step: int, **items) -> dict:
        """Orbax restore of some items of `step`; any read failure -> CorruptCheckpointError."""
        if step not in self._mngr.all_steps():
            raise CorruptCheckpointError(self.directory, step, "does not exist")
        missing = self.missing_parts(step)
        if missing:
            raise CorruptCheckpointError(self.directory, step, f"is incomplete (no {', '.join(missing)})")
        if paths.isdir(paths.join(self._step_dir(step), "integrity")):
            items["integrity"] = ocp.args.JsonRestore()
        _quiet_abandoned_reads()  # before the read: the callbacks can fire before we see its error
        try:
            return dict(self._mngr.restore(int(step), args=ocp.args.Composite(**items)))
        except Exception as e:  # narrowed by _is_read_failure: anything else is a bug, re-raised
            if not _is_read_failure(e):
                raise
            raise CorruptCheckpointError(self.directory, step, f"cannot be read ({_reason(e)})") from e

    def _check_json(self, step: int, out: dict, name: str) -> None:
        expected = (out.get("integrity") or {}).get(name)
        if expected is not None and integrity.json_digest(out[name]) != expected:
            raise CorruptCheckpointError(
                self.directory, step, f"failed its integrity check ({name} differs from its checksum)"
            )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, data_state) at `step` and checks them against the saved checksums.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set: arrays come
        back directly in that sharding (which may differ from the one they were saved with).
        Raises CorruptCheckpointError when the step cannot be read or does not verify.
        """
        step = int(step)
        out = self._read(
            step, state=ocp.args.StandardRestore(abstract_state), data_state=ocp.args.JsonRestore()
        )
        if "integrity" not in out:
            log.warning(
                "checkpoint step %d in %s has no checksums (saved by an older version); "
                "restoring it unverified",
                step,
                self.directory,
            )
            return out["state"], out["data_state"]
        mismatch = integrity.first_mismatch(out["integrity"]["state"], integrity.tree_checksums(out["state"]))
        if mismatch:
            raise CorruptCheckpointError(self.directory, step, f"failed its integrity check ({mismatch})")
        self._check_json(step, out, "data_state")
        return out["state"], out["data_state"]

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config stored with checkpoint `step` (default: the latest), or None if none.
        Raises CorruptCheckpointError when it cannot be read or does not match its checksum."""
        if step is None:
            step = self.latest_step()
        if step is None:
            return None
        out = self._read(int(step), config=ocp.args.JsonRestore())
        self._check_json(int(step), out, "config")
        return out["config"]


# -- config compatibility ------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    flat = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                flat.update(_flatten(v, key + "."))
            else:
                flat[key] = v
    return flat


def _norm(v: Any) -> Any:
    # JSON round trips turn tuples into lists; compare them as equal.
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


# Compatibility fields added after checkpoints already existed, with the value every older run
# implicitly had. A checkpoint that lacks one of them matches a config that keeps that value.
ADDED_FIELDS = {
    "data.shards": 0,  # one data stream per process, as before streams existed
    "data.tokenizer": "train",
    "data.bad_records": "error",
    "data.read_workers": 0,
}
# Model fields that change how the step computes, never the parameters: free to change on resume.
_SAME_PARAMETERS = ("model.attention", "model.remat", "model.dtype")
# Data fields that change how batches are read, never which: free to change on resume.
_SAME_BATCHES = ("data.pretokenize", "data.read_threads", "data.cache_dir")


def config_mismatch(
    saved: dict, new: dict, prefixes: Iterable[str] = ("model.", "data.", "seed"), ignore: Iterable[str] = ()
) -> str | None:
    """First compatibility-relevant difference between two nested config dicts, or None.

    Both dicts are flattened to dotted keys; only keys starting with one of `prefixes` are
    compared (in sorted order). Returns e.g. "model.num_layers: checkpoint has 4, config has 6",
    or "model.foo: checkpoint has 1, config lacks it" for a key present in one only (a key in
    ADDED_FIELDS that the checkpoint lacks counts as holding its old implicit value). Keys in
    `ignore` are not compared.
    """
    prefixes, ignore = tuple(prefixes), set(ignore)
    fs, fn = _flatten(saved), _flatten(new)
    for key in sorted(set(fs) | set(fn)):
        if not key.startswith(prefixes) or key in _SAME_PARAMETERS or key in _SAME_BATCHES or key in ignore:
            continue
        if key not in fn:
            return f"{key}: checkpoint has {fs[key]!r}, config lacks it"
        if key not in fs and key in ADDED_FIELDS and _norm(ADDED_FIELDS[key]) == _norm(fn[key]):
            continue
        if key not in fs:
            return f"{key}: checkpoint lacks it, config has {fn[key]!r}"
        if _norm(fs[key]) != _norm(fn[key]):
            return f"{key}: checkpoint has {fs[key]!r}, config has {fn[key]!r}"
    return None
