"""Training: state, a pure sharded train step, evaluation, and the loop.

Data flows one way: config -> mesh -> (data, model, optimiser) -> step -> metrics/checkpoints.
The step receives a LossSpec chosen by the config and never looks at the loss's name.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from mile import atomic
from mile import data as mdata
from mile import flops as mflops
from mile import losses as L
from mile import multihost
from mile import sharding as msharding
from mile.checkpoint import Checkpointer, checkpoint_dir, config_mismatch
from mile.fused import fused_loss_terms
from mile.metrics import MetricsWriter, ProgressBar
from mile.restore import existing_checkpoint, resume
from mile.state import build_state, learning_rate_schedule


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. repeated non-finite losses); the message says why."""


# ---------------------------------------------------------------------------------------------
# Configuration checks: everything that can be known before touching the workdir.
# ---------------------------------------------------------------------------------------------


def data_parallel_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


# Fields that must be whole numbers >= 1, and the extra reason some of them give.
_AT_LEAST_ONE = {
    "train.steps": "",
    "train.log_every": "",
    "train.eval_every": "",
    "train.eval_batches": "",
    "train.checkpoint_every": "",
    "train.keep_checkpoints": " (0 would delete every checkpoint)",
    "train.max_nonfinite_steps": "",
    "optim.num_microbatches": "",
    "data.global_batch_size": "",
    "data.seq_len": "",
}
# Float fields: (lowest allowed, whether the lowest itself is allowed, upper bound excluded or None).
_NUMBERS = {
    "optim.learning_rate": (0.0, True, None),
    "optim.end_learning_rate": (0.0, True, None),
    "optim.weight_decay": (0.0, True, None),
    "optim.clip_norm": (0.0, False, None),
    "optim.eps": (0.0, False, None),
    "optim.b1": (0.0, True, 1.0),
    "optim.b2": (0.0, True, 1.0),
}


def _field(cfg, dotted: str):
    section, name = dotted.split(".")
    return cfg[section][name]


def check_fields(cfg) -> None:
    """Ranges of the numeric run settings; ValueError naming the first bad field and its fix."""
    for key, why in _AT_LEAST_ONE.items():
        v = _field(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(
                f"{key}={v!r} must be a whole number >= 1{why}; pass --config.{key}=N with N >= 1"
            )
    warmup = cfg.optim.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise ValueError(f"optim.warmup_steps={warmup!r} must be a whole number >= 0; pass 0 or more")
    for key, (low, low_ok, high) in _NUMBERS.items():
        v = _field(cfg, key)
        number = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
        ok = number and np.isfinite(v) and (v >= low if low_ok else v > low) and (high is None or v < high)
        if not ok:
            bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise ValueError(f"{key}={v!r} must be a finite number {bound}; set --config.{key} in that range")


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
    if d.vocab_size > m.vocab_size:
        raise ValueError(
            f"tokenizer vocab data.vocab_size={d.vocab_size} is larger than model.vocab_size={m.vocab_size}; "
            "raise --config.model.vocab_size or lower --config.data.vocab_size"
        )
    dp = data_parallel_size(mesh)
    k = cfg.optim.num_microbatches
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
    if d.shards < 0 or d.global_batch_size % (d.shards or jax.process_count()):
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} cannot be split into data.shards={d.shards} "
            f"streams ({jax.process_count()} processes if 0); set --config.data.shards to a divisor of it"
        )
    if cfg.loss.head not in LOSS_HEADS:
        raise ValueError(f"loss.head={cfg.loss.head!r}; use one of {', '.join(LOSS_HEADS)}")
    return spec


# ---------------------------------------------------------------------------------------------
# Model, optimiser, state.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


LOSS_HEADS = ("fused", "materialised")  # config loss.head


def batch_loss_terms(
    model, batch, spec: L.LossSpec, *, mesh, chunk_size: int | None, head: str = "fused", vocab_axis=None
):
    """The loss terms of a token batch: the model's hidden states through the LM head.

    "fused" (the default) tiles the head matmul and loss on each device's own rows (and, with
    `vocab_axis`, its vocabulary slice), never holding the logits. "materialised" is the reference
    code's way, kept to measure what fusion saves: the full [batch, seq, vocab] logits, then
    softmax and entropy over them."""
    hidden = model(batch["inputs"])
    if head == "materialised":
        # Each device holds the logits of its own rows, as each data-parallel rank does in the
        # reference code (left alone, GSPMD may shard the matmul's hidden axis and gather rows).
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(msharding.BATCH_AXES))
        logits = jax.lax.with_sharding_constraint(hidden @ model.unembedding(), rows)
        return L.loss_terms(spec, logits, batch["targets"], batch["mask"])
    return fused_loss_terms(
        spec,
        hidden,
        model.unembedding(),
        batch["targets"],
        batch["mask"],
        chunk_size=chunk_size,
        batch_axes=msharding.BATCH_AXES,
        mesh=mesh,
        vocab_axis=vocab_axis,
    )


def _split_microbatches(batch, k: int):
    """[G, ...] -> [k, G/k, ...] taking every k-th row, so each micro-batch spans all shards."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
    graphdef,
    spec: L.LossSpec,
    *,
    mesh,
    chunk_size: int | None,
    num_microbatches: int,
    schedule: optax.Schedule,
    head: str = "fused",
    vocab_axis: str | None = None,
):
    """A pure step(state, batch) -> (state, metrics). The loss normaliser is exact over the
    whole optimiser batch: micro-batches add their terms and numerator gradients, and the sum
    is divided once. A non-finite loss or gradient leaves the state unchanged (the loop counts
    and stops)."""

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)

        def numerator(p, mb):
            terms = batch_loss_terms(
                nnx.merge(model_def, p, rest),
                mb,
                spec,
                mesh=mesh,
                chunk_size=chunk_size,
                head=head,
                vocab_axis=vocab_axis,
            )
            return terms["numerator"], terms

        grad_fn = jax.value_and_grad(numerator, has_aux=True)
        if num_microbatches == 1:
            (_, terms), grads = grad_fn(params, batch)
        else:

            def accumulate(carry, mb):
                grads_acc, terms_acc = carry
                (_, t), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, grads_acc, g), L.combine_terms(terms_acc, t)), None

            mbs = _split_microbatches(batch, num_microbatches)
            first = jax.tree.map(lambda x: x[0], mbs)
            rest_mbs = jax.tree.map(lambda x: x[1:], mbs)
            (_, terms0), grads0 = grad_fn(params, first)
            (grads, terms), _ = jax.lax.scan(accumulate, (grads0, terms0), rest_mbs)

        loss, aux = L.finalize_terms(terms)
        den = terms["denominator"]
        grads = jax.tree.map(lambda g: g / jnp.where(den > 0, den, 1.0), grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lr = schedule(optimizer.step[...])

        # A snapshot of the arrays: nnx.state shares Variables, which update() changes in place.
        old_state = jax.tree.map(lambda x: x, nnx.state((model, optimizer)))
        optimizer.update(model, grads)
        new_state = nnx.state((model, optimizer))
        finite &= jnp.isfinite(optax.tree.norm(nnx.state(model, nnx.Param)))
        # Skip a step whose loss, gradient or update is non-finite: keep the last good state.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
        metrics = {
            "loss": loss,
            "ce": aux["nll"],
            "entropy": aux["entropy"],
            "weight_mean": aux["weight_mean"],
            "weight_min": aux["weight_min"],
            "weight_max": aux["weight_max"],
            "tokens": aux["num_tokens"],
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "finite": finite,
        }
        return new_state, metrics

    return step


def vocab_axis_of(cfg, mesh) -> str | None:
    """The mesh axis the rule table splits the head's vocabulary over (the fused loss then splits
    its softmax the same way), or None."""
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    return msharding.vocab_parallel_axis(mesh, rules, cfg.model.embed_dim, cfg.model.vocab_size)


def jit_train_step(cfg, graphdef, spec: L.LossSpec, mesh, state_shardings):
    """The run's train step under jax.jit with its shardings and donation: what the loop calls and
    what `mile.aot` compiles for a TPU slice."""
    step = make_train_step(
        graphdef,
        spec,
        mesh=mesh,
        chunk_size=cfg.loss.chunk_size or None,
        num_microbatches=cfg.optim.num_microbatches,
        schedule=learning_rate_schedule(cfg.optim, cfg.train.steps),
        head=cfg.loss.head,
        vocab_axis=vocab_axis_of(cfg, mesh),
    )
    batch_shard = msharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(graphdef, *, mesh, chunk_size: int | None, vocab_axis: str | None = None):
    """Validation terms under plain cross-entropy (comparable across losses)."""
    ce = L.get_loss("ce")

    def step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        return batch_loss_terms(model, batch, ce, mesh=mesh, chunk_size=chunk_size, vocab_axis=vocab_axis)

    return step


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """A global array from each process's rows (every process passes its own slice)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def _to_float(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def stream_batches(cfg, prepared, batch_shard, num_streams: int, *, eval_batches: int | None = None):
    """Global train batches (or, with eval_batches, a fresh validation pass) from the data streams."""

    def open_stream(s):
        common = dict(
            seq_len=cfg.data.seq_len,
            global_batch_size=cfg.data.global_batch_size,
            process_index=s,
            process_count=num_streams,
        )
        if eval_batches is None:
            return mdata.train_iterator(cfg.data, prepared, **common)
        return mdata.eval_iterator(cfg.data, prepared, num_batches=eval_batches, **common)

    return multihost.StreamBatches(
        open_stream,
        num_streams=num_streams,
        sharding=batch_shard,
        global_batch_size=cfg.data.global_batch_size,
    )


def evaluate(eval_step, state, cfg, prepared, batch_shard, num_streams: int) -> dict[str, float]:
    total = None
    for batch in stream_batches(cfg, prepared, batch_shard, num_streams, eval_batches=cfg.train.eval_batches):
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


def check_workdir(workdir: str) -> None:
    """ValueError unless `workdir` (and its checkpoints/) is a directory or can become one."""
    for path in (os.path.join(workdir, "checkpoints"), workdir):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{path} is a file, not a directory; pass a directory as --workdir")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--workdir {workdir} lies under the file {parent}; pass a directory path")


def train(cfg: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the last metrics.

    `stop_at` ends the run after that step with a checkpoint, as a preempted job would; running
    again resumes exactly where it stopped.
    """
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    check_fields(cfg)
    check_workdir(workdir)
    mesh = msharding.make_mesh(cfg.mesh)
    spec = check_config(cfg, mesh)
    primary = jax.process_index() == 0
    config_dict = json.loads(cfg.to_json())

    ckpt_dir = checkpoint_dir(workdir)
    latest, saved = existing_checkpoint(ckpt_dir)
    if saved is not None:
        diff = config_mismatch(saved, config_dict)
        if diff:
            raise ValueError(
                f"workdir {workdir} holds a checkpoint from an incompatible config ({diff}); "
                "use a new --workdir or restore the old setting"
            )

    # Process 0 builds the data caches; the others wait, then read them (a shared filesystem
    # would otherwise see every host write the same files at once).
    prepared = multihost.primary_first(lambda: mdata.prepare(cfg.data), "prepare the data")
    if prepared.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {prepared.tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            "raise --config.model.vocab_size or lower --config.data.vocab_size"
        )

    graphdef, state, build = build_state(cfg, mesh, rules)
    start_step, data_state = 0, None
    if latest is not None:
        _, abstract = msharding.abstract_sharded(build, mesh, rules)
        start_step, restored, data_state = resume(ckpt_dir, abstract, primary)
        state = restored if restored is not None else state
    # Everything checked: only now may the workdir be created or written.
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=cfg.train.keep_checkpoints)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shard = msharding.batch_sharding(mesh)
    # Checkpoints from before data streams hold one position per process under "processes":
    # process p read exactly what stream p of as many streams reads.
    stream_states = None if data_state is None else data_state.get("streams", data_state.get("processes"))
    num_streams = multihost.resolve_num_streams(cfg.data.shards, jax.process_count(), stream_states)
    train_it = stream_batches(cfg, prepared, batch_shard, num_streams)
    if stream_states is not None:
        train_it.set_state(stream_states)
        logging.info("resumed from step %d in %s", start_step, ckpt_dir)
    if jax.process_count() > 1:
        shared = (
            "" if train_it.whole else " (shared with other processes: more shards would avoid re-reading)"
        )
        print(
            f"process {jax.process_index()}: data streams {train_it.streams} of {num_streams}{shared}",
            flush=True,
        )
    if data_state is None and primary:
        os.makedirs(workdir, exist_ok=True)
        config_path = os.path.join(workdir, "config.json")
        if not os.path.exists(config_path):
            atomic.write_text(config_path, cfg.to_json_best_effort(indent=2))

    chunk = cfg.loss.chunk_size or None
    step_fn = jit_train_step(cfg, graphdef, spec, mesh, state_shardings)
    vocab_axis = vocab_axis_of(cfg, mesh)
    eval_fn = jax.jit(
        make_eval_step(graphdef, mesh=mesh, chunk_size=chunk, vocab_axis=vocab_axis),
        in_shardings=(state_shardings, batch_shard),
    )

    # Rows past the restored step describe steps that are about to be redone: drop them.
    writer = MetricsWriter(workdir, enabled=primary, resume_step=start_step)
    bar = ProgressBar(cfg.train.steps, initial_step=start_step, enabled=primary)
    if writer.dropped_rows:
        bar.write(
            f"metrics.jsonl: dropped {writer.dropped_rows} rows past step {start_step} (they are redone)"
        )
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    # Model FLOPs utilisation: achieved model TFLOP/s per device, and MFU against the device kind's
    # published peak where mile.flops knows it (accelerators; not the CPU).
    flops_per_token = mflops.model_flops_per_token(cfg.model, cfg.data.seq_len)
    chip = mflops.chip_for_device_kind(jax.devices()[0].device_kind)

    def save(step):
        checkpointer.save(step, state, data_state={"streams": train_it.get_state()}, config=config_dict)

    nonfinite = 0
    last: dict[str, float] = {}
    pending = None  # (step, metrics) dispatched but not yet read: keeps the device busy
    window_start, window_steps = time.perf_counter(), 0

    def consume(step, metrics):
        nonlocal nonfinite, last, window_start, window_steps
        m = _to_float(metrics)
        if m.pop("finite") < 1:
            nonfinite += 1
            bar.write(
                f"step {step}: non-finite loss ({m['loss']}), gradient or update; step skipped "
                f"({nonfinite}/{cfg.train.max_nonfinite_steps})"
            )
            if nonfinite >= cfg.train.max_nonfinite_steps:
                raise TrainingError(
                    f"{nonfinite} consecutive non-finite steps ending at step {step}; stopped without "
                    "saving (the last good checkpoint is kept). Lower --config.optim.learning_rate or "
                    "raise --config.train.max_nonfinite_steps"
                )
        else:
            nonfinite = 0
        window_steps += 1
        last = m
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            m["tokens_per_s"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
            m["tflops_per_device"] = m["tokens_per_s"] * flops_per_token / jax.device_count() / 1e12
            if chip is not None:
                m["mfu"] = m["tflops_per_device"] * 1e12 / chip.peak_bf16_flops
            writer.write(step, m, prefix="train")
            bar.update(step, loss=m["loss"], ce=m["ce"], tokens_per_s=m["tokens_per_s"], mfu=m.get("mfu"))
            window_start, window_steps = time.perf_counter(), 0

    last_step = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step + 1, last_step + 1):
                batch = next(train_it)
                state, metrics = step_fn(state, batch)
                if pending is not None:
                    consume(*pending)
                pending = (step, metrics)
                if (
                    step % cfg.train.eval_every == 0
                    or step % cfg.train.checkpoint_every == 0
                    or step == last_step
                ):
                    consume(*pending)
                    pending = None
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    ev = evaluate(eval_fn, state, cfg, prepared, batch_shard, num_streams)
                    writer.write(step, ev, prefix="eval")
                    bar.write(f"step {step}: validation CE {ev['ce']:.4f}, perplexity {ev['perplexity']:.2f}")
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                # Only a state reached by a finite step is worth keeping.
                if (step % cfg.train.checkpoint_every == 0 or step == last_step) and nonfinite == 0:
                    save(step)
            if pending is not None:
                consume(*pending)
    finally:
        checkpointer.close()
        bar.close()
        writer.close()
    return last
