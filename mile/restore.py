"""Reading a run back from its checkpoints, in one place: which step a run resumes from, the
resume itself (setting damaged steps aside), and the readers' model load.

A step is usable when it reads and verifies (mile.checkpoint). `walk_back` is the one rule for
choosing: from the newest step back to the first usable one. The trainer's compatibility check
(`existing_checkpoint`) and its resume (`resume`) both use it; evaluation and export load one
step by name (no fallback: results must be labelled with the step they came from).

Evaluation and export load a trained model from here without importing the trainer. The state
is rebuilt with `mile.state.state_builder` from the config saved with the checkpoint, so the
restored tree is exactly the one that was trained.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, TypeVar

import jax
import ml_collections
from flax import nnx

from mile import paths
from mile import sharding as msharding
from mile.checkpoint import FINISH_MARKERS, Checkpointer, CorruptCheckpointError, checkpoint_dir
from mile.state import state_builder

T = TypeVar("T")


class Walked(NamedTuple):
    step: int
    value: Any  # what `read` returned for it
    rejected: list[CorruptCheckpointError]  # the newer steps that failed, newest first


def walk_back(checkpointer: Checkpointer, read: Callable[[int], T]) -> Walked | None:
    """The newest step whose `read(step)` succeeds, and the newer ones that raised
    CorruptCheckpointError. None when there are no steps; CorruptCheckpointError naming every
    step when none reads.

    A step older than the one returned is never read: a partly deleted old directory (a kill while
    orbax removed it) is not reported, while a damaged newest one is (orbax deletes only old steps).
    """
    rejected = []
    for step in reversed(checkpointer.steps()):
        try:
            return Walked(step, read(step), rejected)
        except CorruptCheckpointError as e:
            # A fresh error: the caught one's traceback would keep the rejected step's restored
            # arrays alive (on device) while older steps are read.
            rejected.append(CorruptCheckpointError(checkpointer.directory, e.step, e.problem, str(e)))
    if not rejected:
        return None
    problems = "; ".join(f"step {e.step} {e.problem}" for e in rejected)
    message = (
        f"no checkpoint in {checkpointer.directory} can be restored ({problems}); nothing was changed: "
        "repair them, or move that directory aside to start afresh"
    )
    raise CorruptCheckpointError(checkpointer.directory, rejected[0].step, problems, message)


def existing_checkpoint(ckpt_dir: str) -> tuple[int | None, dict | None]:
    """(latest step, the config of the newest step whose config reads and verifies), creating nothing.
    A directory whose every config is unreadable gives (latest step, None): the full check, with
    its message and fallback, comes at `resume`."""
    if not paths.isdir(ckpt_dir):
        return None, None
    with Checkpointer.reader(ckpt_dir) as checkpointer:
        try:
            walked = walk_back(checkpointer, checkpointer.saved_config)
        except CorruptCheckpointError:
            walked = None
        return checkpointer.latest_step(), None if walked is None else walked.value


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: dict
    rejected: list[CorruptCheckpointError]  # the newer steps that failed, newest first


def restore_latest_verified(directory, abstract_state) -> Restored | None:
    """The newest step of `directory` that reads and verifies, read into `abstract_state`'s
    shapes and shardings (`walk_back`). Nothing on disk is changed (see `set_aside`)."""
    if not paths.isdir(directory):
        return None
    with Checkpointer.reader(directory) as ck:
        walked = walk_back(ck, lambda step: ck.restore(step, abstract_state))
    if walked is None:
        return None
    state, data_state = walked.value
    return Restored(walked.step, state, data_state, walked.rejected)


def set_aside(directory, step: int) -> str:
    """Moves step directory `step` to `<directory>/../corrupt_checkpoints/` (never deletes it);
    returns its new path. Call on one process only.

    On GCS there is no rename: the objects are copied, then the originals deleted with orbax's
    finalisation markers last (mile.paths.move_tree), so a kill part way loses nothing and leaves
    at most an incomplete step directory, which the next resume sets aside again."""
    dest_root = paths.join(paths.path(directory).parent, "corrupt_checkpoints")
    paths.makedirs(dest_root)
    dest, n = paths.join(dest_root, str(int(step))), 1
    while paths.exists(dest):
        n += 1
        dest = paths.join(dest_root, f"{int(step)}.{n}")
    paths.move_tree(paths.join(directory, str(int(step))), dest, markers_last=FINISH_MARKERS)
    return dest


def resume(ckpt_dir: str, abstract, primary: bool) -> Restored | None:
    """The newest checkpoint that verifies, read into `abstract`'s shapes and shardings.

    Newer steps that fail their integrity check are moved to <workdir>/corrupt_checkpoints/ (never
    deleted) with one line each, so the run goes on from the previous verified step and later saves
    do not collide with them. When no step verifies, CorruptCheckpointError names each and nothing moves.
    """
    restored = restore_latest_verified(ckpt_dir, abstract)
    if restored is None:
        return None
    for bad in restored.rejected if primary else ():
        moved = set_aside(ckpt_dir, bad.step)
        print(
            f"warning: {bad}; resuming from step {restored.step} instead (moved it to {moved})",
            file=sys.stderr,
        )
    if restored.rejected and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mile_set_aside_corrupt_checkpoints")
    return restored


def trained_data(cfg):
    """The data and tokenizer of a run, from the config saved with its checkpoint (``mile.data.prepare``
    reads them from the cache). ValueError if that config's tokenizer is no longer the one the
    checkpoint recorded (a tokenizer file replaced since training, say)."""
    from mile import data as mdata

    return mdata.prepare(
        cfg.data, check=lambda tokenizer: mdata.check_fingerprint(tokenizer, cfg, "this checkpoint")
    )


def _choose_step(checkpointer: Checkpointer, workdir: str, step: int | None) -> tuple[int, str]:
    """(the step to load, a hint naming the others for error messages); ValueError if absent."""
    steps = checkpointer.steps()
    if not steps:
        raise ValueError(f"no checkpoints in {workdir}; train first with launch.py --workdir {workdir}")
    step = steps[-1] if step is None else int(step)
    others = ", ".join(str(s) for s in steps if s != step and not checkpointer.missing_parts(s))
    hint = f"; pass --step with one of {others}" if others else "; there is no other complete checkpoint"
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {workdir}{hint}")
    return step, hint


def load_trained_model(workdir: str, *, step: int | None = None, mesh=None):
    """(model, config, step) restored from a workdir's checkpoint (default: the latest).

    The config is the one saved with the checkpoint, so the model is rebuilt exactly as trained.
    Read-only: a missing step or one that fails its integrity check is a ValueError naming the
    steps there are (no fallback here: results must be labelled with the step they came from).
    """
    ckpt_dir = checkpoint_dir(workdir)
    if not paths.isdir(ckpt_dir):
        raise ValueError(f"no checkpoints in {workdir}; train first with launch.py --workdir {workdir}")
    with Checkpointer.reader(ckpt_dir) as checkpointer:
        step, hint = _choose_step(checkpointer, workdir, step)
        try:
            cfg = ml_collections.ConfigDict(checkpointer.saved_config(step))
            cfg.sharding_rules = tuple(tuple(r) for r in cfg.sharding_rules)
            if mesh is None:
                mesh = msharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
            graphdef, abstract = msharding.abstract_sharded(state_builder(cfg), mesh, cfg.sharding_rules)
            state, _ = checkpointer.restore(step, abstract)
        except CorruptCheckpointError as e:
            raise ValueError(f"{e}{hint}") from None
    model, _ = nnx.merge(graphdef, state)
    return model, cfg, step
