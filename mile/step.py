"""The pure, sharded train and eval steps.

A step is `step(state, batch) -> (state, metrics)`: the loss terms of the batch through the LM
head (`batch_loss_terms`), gradients summed over micro-batches (`accumulate_gradients`), one
division by the exact normaliser, and an update that is kept only when everything is finite
(`update_if_finite`). The step receives a LossSpec and never looks at the loss's name.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mile import losses as L
from mile import sharding as msharding
from mile.fused import fused_loss_terms
from mile.state import learning_rate_schedule

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


def accumulate_gradients(grad_fn, params, batch, num_microbatches: int):
    """(numerator gradients, loss terms), each summed over `num_microbatches` slices of `batch`.

    `grad_fn(params, batch) -> ((numerator, terms), gradients)`. Sums, not means: the caller
    divides once by the whole batch's normaliser, so accumulation is exact for any loss."""
    if num_microbatches == 1:
        (_, terms), grads = grad_fn(params, batch)
        return grads, terms

    def add(carry, microbatch):
        grads_sum, terms_sum = carry
        (_, terms), grads = grad_fn(params, microbatch)
        return (jax.tree.map(jnp.add, grads_sum, grads), L.combine_terms(terms_sum, terms)), None

    microbatches = _split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], microbatches)
    rest = jax.tree.map(lambda x: x[1:], microbatches)
    (_, terms0), grads0 = grad_fn(params, first)
    (grads, terms), _ = jax.lax.scan(add, (grads0, terms0), rest)
    return grads, terms


def update_if_finite(model, optimizer, grads, finite):
    """(state after the optimiser update, finite): the update is kept only where `finite` and the
    updated parameters are finite too; otherwise the state stays as it was (the loop counts skips)."""
    # A snapshot of the arrays: nnx.state shares Variables, which update() changes in place.
    old_state = jax.tree.map(lambda x: x, nnx.state((model, optimizer)))
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    finite &= jnp.isfinite(optax.tree.norm(nnx.state(model, nnx.Param)))
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state), finite


def _step_metrics(loss, aux, grad_norm, learning_rate, finite) -> dict:
    return {
        "loss": loss,
        "ce": aux["nll"],
        "entropy": aux["entropy"],
        "weight_mean": aux["weight_mean"],
        "weight_min": aux["weight_min"],
        "weight_max": aux["weight_max"],
        "tokens": aux["num_tokens"],
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
        "finite": finite,
    }


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
    """A pure step(state, batch) -> (state, metrics). The loss normaliser is exact over the whole
    optimiser batch: micro-batches add their terms and numerator gradients, and the sum is divided
    once. A non-finite loss, gradient or update leaves the state unchanged."""
    terms_of = functools.partial(
        batch_loss_terms, spec=spec, mesh=mesh, chunk_size=chunk_size, head=head, vocab_axis=vocab_axis
    )

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        grad_fn, params = numerator_grad_fn(model, terms_of)
        grads, terms = accumulate_gradients(grad_fn, params, batch, num_microbatches)
        return apply_gradients(model, optimizer, grads, terms, schedule)

    return step


def numerator_grad_fn(model, terms_of):
    """(grad_fn, params) for `accumulate_gradients`: grad_fn(params, batch) -> ((numerator, terms),
    gradients of the numerator) with the model's other state held fixed."""
    model_def, params, rest = nnx.split(model, nnx.Param, ...)

    def numerator(p, microbatch):
        terms = terms_of(nnx.merge(model_def, p, rest), microbatch)
        return terms["numerator"], terms

    return jax.value_and_grad(numerator, has_aux=True), params


def apply_gradients(model, optimizer, grads, terms, schedule: optax.Schedule):
    """(state, metrics) after one update from summed numerator gradients and loss terms: one
    division by the exact normaliser, the global norm, and the update kept only if finite."""
    loss, aux = L.finalize_terms(terms)
    den = terms["denominator"]
    grads = jax.tree.map(lambda g: g / jnp.where(den > 0, den, 1.0), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    learning_rate = schedule(optimizer.step[...])  # before the update moves the step on
    new_state, finite = update_if_finite(model, optimizer, grads, finite)
    return new_state, _step_metrics(loss, aux, grad_norm, learning_rate, finite)


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


def jit_eval_step(cfg, graphdef, mesh, state_shardings):
    """The run's validation step under jax.jit with its shardings."""
    step = make_eval_step(
        graphdef, mesh=mesh, chunk_size=cfg.loss.chunk_size or None, vocab_axis=vocab_axis_of(cfg, mesh)
    )
    return jax.jit(step, in_shardings=(state_shardings, msharding.batch_sharding(mesh)))
