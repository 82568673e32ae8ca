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

from mile import data as mdata
from mile import losses as L
from mile import sharding as msharding
from mile.checkpoint import Checkpointer, config_mismatch
from mile.fused import fused_loss_terms
from mile.metrics import MetricsWriter, ProgressBar
from mile.model import Llama


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. repeated non-finite losses); the message says why."""


# ---------------------------------------------------------------------------------------------
# Configuration checks: everything that can be known before touching the workdir.
# ---------------------------------------------------------------------------------------------


def data_parallel_size(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_config(cfg, mesh) -> L.LossSpec:
    """Raise ValueError (one line, naming the field and the fix) for an inconsistent config."""
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
    if k < 1:
        raise ValueError(f"optim.num_microbatches={k} must be >= 1")
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
    if d.global_batch_size % jax.process_count():
        raise ValueError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by the {jax.process_count()} processes"
        )
    if cfg.train.max_nonfinite_steps < 1:
        raise ValueError("train.max_nonfinite_steps must be >= 1")
    return spec


# ---------------------------------------------------------------------------------------------
# Model, optimiser, state.
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to end_learning_rate."""
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.end_learning_rate,
    )


def _decay_mask(params: nnx.State, no_decay) -> Any:
    """True for parameters that get weight decay: none whose path contains a `no_decay` string."""

    def decays(path, _):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        return not any(word in name for word in no_decay)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    no_decay = tuple(optim_cfg.no_decay)
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=lambda p: _decay_mask(p, no_decay),
        ),
    )


def build_state(cfg, mesh, rules):
    """(graphdef, sharded state) of model + optimiser, created directly with target shardings."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    def build():
        model = Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = msharding.create_sharded(build, mesh, rules)
    graphdef, state = nnx.split((model, optimizer))
    return graphdef, state, build


# ---------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------


def batch_loss_terms(model, batch, spec: L.LossSpec, *, mesh, chunk_size: int | None, vocab_axis=None):
    """The loss terms of a token batch: the model's hidden states through the fused LM head,
    each device tiling its own rows of the batch (and, with `vocab_axis`, its vocabulary slice)."""
    return fused_loss_terms(
        spec,
        model(batch["inputs"]),
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


def make_eval_step(graphdef, *, mesh, chunk_size: int | None, vocab_axis: str | None = None):
    """Validation terms under plain cross-entropy (comparable across losses)."""
    ce = L.get_loss("ce")

    def step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        return batch_loss_terms(model, batch, ce, mesh=mesh, chunk_size=chunk_size, vocab_axis=vocab_axis)

    return step


# ---------------------------------------------------------------------------------------------
# Multi-process helpers.
# ---------------------------------------------------------------------------------------------


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """A global array from each process's rows (every process passes its own slice)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def gather_data_states(state: dict) -> list[dict]:
    """Every process's iterator state (JSON), gathered so the primary can save them all."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    raw = json.dumps(state).encode()
    buf = np.zeros(4096, np.uint8)
    if len(raw) > len(buf):
        raise TrainingError(f"data iterator state is {len(raw)} bytes; at most {len(buf)} supported")
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def _to_float(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(eval_step, state, cfg, prepared, batch_shard) -> dict[str, float]:
    it = mdata.eval_iterator(
        cfg.data,
        prepared,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.data.global_batch_size,
        num_batches=cfg.train.eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total = None
    for local in it:
        terms = eval_step(state, global_batch(local, batch_shard))
        total = terms if total is None else L.combine_terms(total, terms)
    _, aux = L.finalize_terms(total)
    ce = float(aux["nll"])
    return {
        "ce": ce,
        "perplexity": float(np.exp(min(ce, 80.0))),
        "entropy": float(aux["entropy"]),
        "tokens": float(aux["num_tokens"]),
    }


def _existing_checkpoint(ckpt_dir: str) -> tuple[int | None, dict | None]:
    """(latest step, its config) of a checkpoint directory, creating nothing."""
    if not os.path.isdir(ckpt_dir):
        return None, None
    with Checkpointer(ckpt_dir, max_to_keep=1000, async_save=False) as checkpointer:
        latest = checkpointer.latest_step()
        return latest, (checkpointer.saved_config(latest) if latest is not None else None)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) training in `workdir`; returns the last metrics.

    `stop_at` ends the run after that step with a checkpoint, as a preempted job would; running
    again resumes exactly where it stopped.
    """
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    mesh = msharding.make_mesh(cfg.mesh)
    spec = check_config(cfg, mesh)
    primary = jax.process_index() == 0
    config_dict = json.loads(cfg.to_json())

    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    latest, saved = _existing_checkpoint(ckpt_dir)
    if latest is not None:
        diff = config_mismatch(saved or {}, config_dict)
        if diff:
            raise ValueError(
                f"workdir {workdir} holds a checkpoint from an incompatible config ({diff}); "
                "use a new --workdir or restore the old setting"
            )

    prepared = mdata.prepare(cfg.data)
    if prepared.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {prepared.tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            "raise --config.model.vocab_size or lower --config.data.vocab_size"
        )

    # Everything checked: only now may the workdir be created or written.
    checkpointer = Checkpointer(ckpt_dir, max_to_keep=cfg.train.keep_checkpoints)
    graphdef, state, build = build_state(cfg, mesh, rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shard = msharding.batch_sharding(mesh)
    train_it = mdata.train_iterator(
        cfg.data,
        prepared,
        seq_len=cfg.data.seq_len,
        global_batch_size=cfg.data.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    start_step = 0
    if latest is not None:
        _, abstract = msharding.abstract_sharded(build, mesh, rules)
        state, data_state = checkpointer.restore(latest, abstract)
        states = data_state["processes"]
        if len(states) != jax.process_count():
            raise ValueError(
                f"checkpoint was written by {len(states)} processes but this run has {jax.process_count()}; "
                "resume with the same number of hosts"
            )
        train_it.set_state(states[jax.process_index()])
        start_step = latest
        logging.info("resumed from step %d in %s", latest, ckpt_dir)
    elif primary:
        os.makedirs(workdir, exist_ok=True)
        config_path = os.path.join(workdir, "config.json")
        if not os.path.exists(config_path):
            with open(config_path, "w") as f:
                f.write(cfg.to_json_best_effort(indent=2))

    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    chunk = cfg.loss.chunk_size or None
    # The fused loss splits its softmax over the axis the rule table shards the head's vocabulary on.
    vocab_axis = msharding.vocab_parallel_axis(mesh, rules, cfg.model.embed_dim, cfg.model.vocab_size)
    step_fn = jax.jit(
        make_train_step(
            graphdef,
            spec,
            mesh=mesh,
            chunk_size=chunk,
            num_microbatches=cfg.optim.num_microbatches,
            schedule=schedule,
            vocab_axis=vocab_axis,
        ),
        in_shardings=(state_shardings, batch_shard),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        make_eval_step(graphdef, mesh=mesh, chunk_size=chunk, vocab_axis=vocab_axis),
        in_shardings=(state_shardings, batch_shard),
    )

    writer = MetricsWriter(workdir, enabled=primary)
    bar = ProgressBar(cfg.train.steps, initial_step=start_step, enabled=primary)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len

    def save(step):
        states = gather_data_states(train_it.get_state())
        checkpointer.save(step, state, data_state={"processes": states}, config=config_dict)

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
            writer.write(step, m, prefix="train")
            bar.update(step, loss=m["loss"], ce=m["ce"], tokens_per_s=m["tokens_per_s"])
            window_start, window_steps = time.perf_counter(), 0

    last_step = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step + 1, last_step + 1):
                batch = global_batch(next(train_it), batch_shard)
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
                    ev = evaluate(eval_fn, state, cfg, prepared, batch_shard)
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


def load_trained_model(workdir: str, *, step: int | None = None, mesh=None):
    """(model, config, step) restored from a workdir's checkpoint (default: the latest).

    The config is the one saved with the checkpoint, so the model is rebuilt exactly as trained.
    """
    ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"no checkpoints in {workdir}; train first with launch.py --workdir {workdir}")
    with Checkpointer(ckpt_dir, max_to_keep=1000, async_save=False) as checkpointer:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoints in {workdir}; train first with launch.py --workdir {workdir}")
        cfg = ml_collections.ConfigDict(checkpointer.saved_config(step))
        cfg.sharding_rules = tuple(tuple(r) for r in cfg.sharding_rules)
        if mesh is None:
            mesh = msharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
        rules = cfg.sharding_rules
        tx = make_optimizer(cfg.optim, cfg.train.steps)

        def build():
            model = Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))
            return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        graphdef, abstract = msharding.abstract_sharded(build, mesh, rules)
        state, _ = checkpointer.restore(step, abstract)
    model, _ = nnx.merge(graphdef, state)
    return model, cfg, step
