"""Reading a run back from its checkpoints: the trainer's resume and the readers' model load.

Evaluation and export load a trained model from here without importing the trainer. The state
is rebuilt with `mile.state.state_builder` from the config saved with the checkpoint, so the
restored tree is exactly the one that was trained.
"""

from __future__ import annotations

import sys

import jax
import ml_collections
from flax import nnx

from mile import paths
from mile import sharding as msharding
from mile.checkpoint import (
    Checkpointer,
    CorruptCheckpointError,
    Restored,
    checkpoint_dir,
    restore_latest_verified,
    set_aside,
)
from mile.state import state_builder


def existing_checkpoint(ckpt_dir: str) -> tuple[int | None, dict | None]:
    """(latest step, the config of the newest step whose config reads and verifies), creating nothing."""
    if not paths.isdir(ckpt_dir):
        return None, None
    with Checkpointer.reader(ckpt_dir) as checkpointer:
        steps = checkpointer.finalized_steps()
        for step in reversed(steps):
            try:
                return steps[-1], checkpointer.saved_config(step)
            except CorruptCheckpointError:
                continue  # the full check, with its message and fallback, comes at restore
        return (steps[-1] if steps else None), None


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

    prepared = mdata.prepare(cfg.data)
    mdata.check_fingerprint(prepared, cfg, "this checkpoint")
    return prepared


def _choose_step(checkpointer: Checkpointer, workdir: str, step: int | None) -> tuple[int, str]:
    """(the step to load, a hint naming the others for error messages); ValueError if absent."""
    steps = checkpointer.finalized_steps()
    if not steps:
        raise ValueError(f"no checkpoints in {workdir}; train first with launch.py --workdir {workdir}")
    step = steps[-1] if step is None else int(step)
    others = ", ".join(str(s) for s in checkpointer.all_steps() if s != step)
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
