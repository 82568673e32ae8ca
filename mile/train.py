"""Training: check and prepare a run, then the loop.

Data flows one way: config -> mesh -> (data, model, optimiser) -> step -> metrics/checkpoints.
`prepare_run` does everything that can fail before the workdir is touched (config checks,
compatibility with its checkpoints, data, state, resume); `train` is the loop. The step itself
(`mile.step`) receives a LossSpec chosen by the config and never looks at the loss's name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mile import fields, multihost, paths, profiler
from mile import data as mdata
from mile import losses as L
from mile import sharding as msharding
from mile.checkpoint import Checkpointer, checkpoint_dir, config_mismatch
from mile.preemption import Preempted, Preemption
from mile.restore import existing_checkpoint, resume
from mile.state import OptimConfig, build_state, state_builder
from mile.step import LOSS_HEADS, jit_eval_step, jit_train_step
from mile.steplog import LateMetrics, NonfiniteGuard, Throughput, TrainLog
from mile.steplog import TrainingError  # noqa: F401  launch.py catches it from here
from mile.watchdog import HangLimits, Watchdog


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run config's `train` section: how long, and how often each periodic action runs."""

    steps: int = 300  # optimiser updates in the whole run
    log_every: int = 10  # train metrics row (and progress bar) every N steps
    eval_every: int = 100  # validation every N steps, and at the last step
    eval_batches: int = 8  # global batches per validation
    checkpoint_every: int = 100  # a checkpoint every N steps, and where the run stops
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    max_nonfinite_steps: int = 3  # stop after this many consecutive non-finite steps
    distributed: str = "auto"  # "auto" | "yes" | "no": call jax.distributed.initialize()
    # A step, evaluation or save that takes longer is a hang (mile.watchdog): 0 = automatic.
    hang_timeout_s: float = 0.0
    startup_timeout_s: float = 3600.0  # the same for the first of each (compilation included)
    profile_steps: str = ""  # "START,END": a jax.profiler trace of those steps (mile.profiler)

    @classmethod
    def from_cfg(cls, cfg) -> "TrainConfig":
        return fields.section(cls, cfg)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.type in (int, "int"):  # a string while annotations are postponed
                why = " (0 would delete every checkpoint)" if f.name == "keep_checkpoints" else ""
                fields.whole_number(f"train.{f.name}", getattr(self, f.name), why=why)
        fields.one_of("train.distributed", self.distributed, ("auto", "yes", "no"))
        fields.finite_number("train.hang_timeout_s", self.hang_timeout_s, 0.0)
        fields.finite_number("train.startup_timeout_s", self.startup_timeout_s, 0.0, low_ok=False)
        profiler.parse_steps(self.profile_steps)


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps, and at step `last`."""
    return step % every == 0 or step == last


# ---------------------------------------------------------------------------------------------
# Checks: everything that can be known before touching the workdir.
# ---------------------------------------------------------------------------------------------


def data_parallel_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_fields(cfg) -> None:
    """Each section's own fields (types and ranges); ValueError naming the first bad one and its fix."""
    TrainConfig.from_cfg(cfg.train)
    OptimConfig.from_cfg(cfg.optim)
    mdata.DataConfig.from_cfg(cfg.data)


def check_config(cfg, mesh) -> L.LossSpec:
    """Raise ValueError (one line, naming the field and the fix) for an inconsistent config."""
    check_fields(cfg)
    spec = L.loss_from_config(cfg.loss)
    d, m = cfg.data, cfg.model
    if d.seq_len > m.max_seq_len:
        raise ValueError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
            f"lower --config.data.seq_len or raise --config.model.max_seq_len"
        )
    if d.get("tokenizer", "train") == "train" and d.vocab_size > m.vocab_size:
        raise ValueError(
            f"tokenizer vocab data.vocab_size={d.vocab_size} is larger than model.vocab_size={m.vocab_size}; "
            "raise --config.model.vocab_size or lower --config.data.vocab_size"
        )
    _check_batch_split(d, cfg.optim.num_microbatches, data_parallel_size(mesh))
    fields.one_of("loss.head", cfg.loss.head, LOSS_HEADS)
    return spec


def _check_batch_split(d, k: int, dp: int) -> None:
    """The global batch must split evenly over data-parallel shards, micro-batches and streams."""
    if d.global_batch_size % dp:
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by the data-parallel size "
            f"{dp} (mesh data x fsdp); use a multiple of {dp}"
        )
    if d.global_batch_size % (dp * k):
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} cannot be split into optim.num_microbatches={k} "
            f"micro-batches over {dp} data-parallel shards; use a multiple of {dp * k}"
        )
    if d.global_batch_size % (d.shards or jax.process_count()):
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} cannot be split into data.shards={d.shards} "
            f"streams ({jax.process_count()} processes if 0); set --config.data.shards to a divisor of it"
        )


def check_workdir(workdir: str) -> None:
    """ValueError unless `workdir` (and its checkpoints/) is a directory or can become one."""
    if paths.is_remote(workdir):
        # An object store has no files in the way of a directory; access is checked by the first read.
        return
    for path in (os.path.join(workdir, "checkpoints"), workdir):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path} is a file, not a directory; pass a directory as --workdir")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--workdir {workdir} lies under the file {parent}; pass a directory path")


def _check_compatible(workdir: str, ckpt_dir: str, config_dict: dict) -> tuple[int | None, dict | None]:
    """(the workdir's latest checkpoint step, its saved config), (None, None) if none; ValueError
    if it is from another model/data."""
    latest, saved = existing_checkpoint(ckpt_dir)
    # A recorded tokenizer fingerprint is the real check (after preparing the data): the file
    # may then move, say from a local disk to a bucket.
    ignore = ("data.tokenizer",) if saved is not None and mdata.FINGERPRINT_KEY in saved else ()
    diff = None if saved is None else config_mismatch(saved, config_dict, ignore=ignore)
    if diff:
        raise ValueError(
            f"workdir {workdir} holds a checkpoint from an incompatible config ({diff}); "
            "use a new --workdir or restore the old setting"
        )
    return latest, saved


# ---------------------------------------------------------------------------------------------
# Preparing a run.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """A checked run, its data prepared and its state built or restored; nothing written yet."""

    cfg: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    spec: L.LossSpec
    prepared: mdata.PreparedData
    graphdef: Any
    state: Any
    start_step: int  # the restored step; 0 for a fresh run
    data_state: dict | None  # the restored data position; None for a fresh run

    @property
    def ckpt_dir(self) -> str:
        return checkpoint_dir(self.workdir)

    @property
    def config_dict(self) -> dict:
        """The config saved with each checkpoint, with the fingerprint of the tokenizer in use."""
        saved = json.loads(self.cfg.to_json())
        saved[mdata.FINGERPRINT_KEY] = self.prepared.tokenizer.fingerprint
        return saved


def _prepare_data(cfg, saved: dict | None, workdir: str) -> mdata.PreparedData:
    """The run's data, built with every core of process 0 where missing (`python -m mile.prepare`
    does it ahead of time). The tokenizer is checked against the model and against the one the
    workdir's checkpoints recorded before any token store is built."""

    def check(tokenizer):
        mdata.check_fits(tokenizer, cfg.model, cfg.data)
        if saved is not None:
            mdata.check_fingerprint(tokenizer, saved, f"workdir {workdir}")

    builder = mdata.Builder(workers=os.cpu_count() or 1)
    # Process 0 builds the data caches; the others wait, then read them (a shared filesystem
    # would otherwise see every host write the same files at once).
    return multihost.primary_first(
        lambda: mdata.prepare(cfg.data, builder=builder, check=check), "prepare the data"
    )


def prepare_run(cfg: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks, compatibility with the workdir's checkpoints, data, state, resume: all before the
    workdir is created or written, so a run that cannot start changes nothing."""
    check_fields(cfg)
    check_workdir(workdir)
    mesh = msharding.make_mesh(cfg.mesh)
    spec = check_config(cfg, mesh)
    ckpt_dir = checkpoint_dir(workdir)
    latest, saved = _check_compatible(workdir, ckpt_dir, json.loads(cfg.to_json()))
    prepared = _prepare_data(cfg, saved, workdir)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    resumed = None
    if latest is not None:
        # Read straight into the abstract state: initialising one first would hold two copies.
        graphdef, abstract = msharding.abstract_sharded(state_builder(cfg), mesh, rules)
        resumed = resume(ckpt_dir, abstract, jax.process_index() == 0)
    if resumed is None:
        graphdef, state, _ = build_state(cfg, mesh, rules)
        return Run(cfg, workdir, mesh, spec, prepared, graphdef, state, 0, None)
    return Run(cfg, workdir, mesh, spec, prepared, graphdef, resumed.state, resumed.step, resumed.data_state)


def stream_batches(cfg, prepared, batch_shard, num_streams: int, *, eval_batches: int | None = None):
    """Global train batches (or, with eval_batches, a fresh validation pass) from the data streams."""

    def open_stream(s):
        if eval_batches is None:
            return mdata.train_iterator(cfg.data, prepared, process_index=s, process_count=num_streams)
        return mdata.eval_iterator(
            cfg.data, prepared, num_batches=eval_batches, process_index=s, process_count=num_streams
        )

    return multihost.StreamBatches(
        open_stream,
        num_streams=num_streams,
        sharding=batch_shard,
        global_batch_size=cfg.data.global_batch_size,
    )


def open_train_batches(run: Run) -> multihost.StreamBatches:
    """The training batches, positioned after the restored step."""
    # Checkpoints from before data streams hold one position per process under "processes":
    # process p read exactly what stream p of as many streams reads.
    saved = None if run.data_state is None else run.data_state.get("streams", run.data_state.get("processes"))
    num_streams = multihost.resolve_num_streams(run.cfg.data.shards, jax.process_count(), saved)
    batches = stream_batches(run.cfg, run.prepared, msharding.batch_sharding(run.mesh), num_streams)
    if saved is not None:
        batches.set_state(saved)
        logging.info("resumed from step %d in %s", run.start_step, run.ckpt_dir)
    if jax.process_count() > 1:
        shared = "" if batches.whole else " (shared with other processes: more shards would avoid re-reading)"
        print(
            f"process {jax.process_index()}: data streams {batches.streams} of {num_streams}{shared}",
            flush=True,
        )
    return batches


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """A global array from each process's rows (every process passes its own slice)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def evaluate(eval_step, state, run: Run, num_streams: int) -> dict[str, float]:
    """Validation CE, perplexity and entropy over `train.eval_batches` fresh batches."""
    batch_shard = msharding.batch_sharding(run.mesh)
    batches = stream_batches(
        run.cfg, run.prepared, batch_shard, num_streams, eval_batches=run.cfg.train.eval_batches
    )
    total = None
    for batch in batches:
        terms = eval_step(state, batch)
        total = terms if total is None else L.combine_terms(total, terms)
    _, aux = L.finalize_terms(total)
    ce = float(aux["nll"])
    return {
        "ce": ce,
        "perplexity": float(np.exp(min(ce, 80.0))),
        "entropy": float(aux["entropy"]),
        "tokens": float(aux["num_tokens"]),
    }


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def _save_config_once(cfg, workdir: str) -> None:
    path = paths.join(workdir, "config.json")
    if not paths.exists(path):
        paths.write_text(path, cfg.to_json_best_effort(indent=2))


def _hang_report(workdir: str):
    """Where the watchdog leaves its report: one file per process in the workdir."""
    path = paths.join(workdir, f"hang.process{jax.process_index()}.txt")
    return lambda text: paths.write_text(path, text)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the last metrics.

    `stop_at` ends the run after that step with a checkpoint; running again resumes exactly where
    it stopped. SIGTERM or SIGINT stops every process at one agreed step, saves it and raises
    `Preempted` (mile.preemption); a region that hangs ends the process (mile.watchdog).
    """
    run = prepare_run(cfg, workdir)
    t = TrainConfig.from_cfg(cfg.train)
    last_step = t.steps if stop_at is None else min(stop_at, t.steps)
    primary = jax.process_index() == 0
    # Everything checked: only now may the workdir be created or written.
    checkpointer = Checkpointer(run.ckpt_dir, max_to_keep=t.keep_checkpoints)
    batches = open_train_batches(run)
    if run.data_state is None and primary:
        _save_config_once(cfg, workdir)
    state, config_dict = run.state, run.config_dict
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = jit_train_step(cfg, run.graphdef, run.spec, run.mesh, state_shardings)
    eval_step = jit_eval_step(cfg, run.graphdef, run.mesh, state_shardings)
    log = TrainLog(workdir, t.steps, run.start_step, enabled=primary)
    late, guard, rate = LateMetrics(), NonfiniteGuard(t.max_nonfinite_steps, log.say), Throughput(cfg)
    profile = profiler.StepProfiler(
        profiler.parse_steps(t.profile_steps), paths.join(workdir, "profile"), enabled=primary
    )
    limits = HangLimits(t.hang_timeout_s, t.startup_timeout_s)

    def record(step: int, m: dict[str, float]) -> None:
        guard.check(step, m)  # raises after too many non-finite steps in a row
        rate.count()
        m = {k: v for k, v in m.items() if k != "finite"}
        if due(step, t.log_every, t.steps):
            m.update(rate.rates())
            log.train(step, m)
        log.last = m

    def save(step: int) -> None:
        log.flush()  # the rows up to a saved step are at the workdir before the step is
        checkpointer.save(step, state, data_state={"streams": batches.get_state()}, config=config_dict)

    watchdog = Watchdog(_hang_report(workdir))
    try:
        with jax.set_mesh(run.mesh), Preemption() as preemption:
            for step in range(run.start_step + 1, last_step + 1):
                started = time.perf_counter()
                with watchdog.watch(f"step {step}", limits.limit("step")):
                    profile.before(step)
                    state, metrics = train_step(state, next(batches))
                    stop = preemption.reached(step)  # every process answers the same for a step
                    # Validation belongs to the end of training; a checkpoint also to where this run stops.
                    eval_due = due(step, t.eval_every, t.steps)
                    save_due = due(step, t.checkpoint_every, last_step) or stop
                    previous = late.push(step, metrics)  # read one step late: the device stays busy
                    if previous is not None:
                        record(*previous)
                    if eval_due or save_due:
                        record(*late.take())  # this step's own metrics: the save rule below needs them
                    profile.after(step, metrics)
                limits.record_step(time.perf_counter() - started)
                if eval_due:
                    with watchdog.watch(f"evaluation at step {step}", limits.limit("evaluation")):
                        log.eval(step, evaluate(eval_step, state, run, batches.num_streams))
                # Only a state reached by a finite step is saved: a non-finite step was skipped,
                # and its state must not pass for the step's result.
                if save_due and guard.finite:
                    with watchdog.watch(f"checkpoint save at step {step}", limits.limit("save")):
                        save(step)
                if stop and step < last_step:  # stopping at the last step is just the end
                    log.say(
                        f"preempted ({preemption.signal_name or 'another process'}): stopping after step {step}"
                    )
                    with watchdog.watch(f"preemption save of step {step}", limits.limit("final save")):
                        checkpointer.wait()
                    raise Preempted(step, saved=guard.finite)
            previous = late.take()
            if previous is not None:
                record(*previous)
            with watchdog.watch("the last checkpoint save", limits.limit("final save")):
                checkpointer.wait()
    finally:
        profile.stop()
        checkpointer.close()
        log.close()
        watchdog.close()
    return log.last
