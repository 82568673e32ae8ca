"""A small wrapper over orbax-checkpoint's `CheckpointManager`.

One checkpoint per step under `<workdir>/checkpoints/<step>/`, a composite of three items:

  state       StandardSave: the pytree of jax arrays (params, optimiser state, rng key, step).
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
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

_ITEMS = ("state", "data_state", "config")


class Checkpointer:
    """Save / restore (state pytree, data iterator state, config) by step."""

    def __init__(self, directory, *, max_to_keep: int, async_save: bool = True):
        self.directory = epath.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_state: dict, config: dict, force: bool = False) -> bool:
        """Starts saving `step` (asynchronously unless async_save=False). Returns whether it saved.

        A step that already exists on disk is never overwritten: the call logs a warning and
        returns False. `force` is passed to orbax (bypasses its save-interval policy, which with
        `save_interval_steps=1` already accepts every step).
        """
        step = int(step)
        if step in self._mngr.all_steps():
            log.warning(
                "checkpoint for step %d already exists in %s; not overwriting it", step, self.directory
            )
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(dict(data_state)),
            config=ocp.args.JsonSave(dict(config)),
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
    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, data_state) at `step`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set: arrays come
        back directly in that sharding (which may differ from the one they were saved with).
        """
        out = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_state=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data_state"]

    def saved_config(self, step: int | None = None) -> dict | None:
        """The config stored with checkpoint `step` (default: the latest), or None if none."""
        if step is None:
            step = self.latest_step()
        if step is None:
            return None
        out = self._mngr.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
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


# Model fields that change how the step computes, never the parameters: free to change on resume.
_SAME_PARAMETERS = ("model.attention",)


def config_mismatch(
    saved: dict, new: dict, prefixes: Iterable[str] = ("model.", "data.", "seed")
) -> str | None:
    """First compatibility-relevant difference between two nested config dicts, or None.

    Both dicts are flattened to dotted keys; only keys starting with one of `prefixes` are
    compared (in sorted order). Returns e.g. "model.num_layers: checkpoint has 4, config has 6",
    or "model.foo: checkpoint has 1, config lacks it" for a key present in one only.
    """
    prefixes = tuple(prefixes)
    fs, fn = _flatten(saved), _flatten(new)
    for key in sorted(set(fs) | set(fn)):
        if not key.startswith(prefixes) or key in _SAME_PARAMETERS:
            continue
        if key not in fn:
            return f"{key}: checkpoint has {fs[key]!r}, config lacks it"
        if key not in fs:
            return f"{key}: checkpoint lacks it, config has {fn[key]!r}"
        if _norm(fs[key]) != _norm(fn[key]):
            return f"{key}: checkpoint has {fs[key]!r}, config has {fn[key]!r}"
    return None
