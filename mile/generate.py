"""Batched greedy generation with a kv cache (and a no-cache reference path).

Prompts are right-padded into a fixed [B, P + max_new_tokens] buffer and every row keeps
its own length, so row b's token at step s sits at position len_b + s whatever the other
rows look like: padding never changes a row's output (pads sit after the row's last real
token, where the causal mask hides them, and are overwritten before they are attended to).

Prefill and the one-token step are jitted on (graphdef, shapes); P is rounded up to a
multiple of `_LENGTH_BUCKET` so batches with similar prompt lengths reuse one compilation.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Prompt buffers are rounded up to a multiple of this many tokens (fewer recompilations).
_LENGTH_BUCKET = 16


def _next_tokens(model, hidden, lengths):
    """Greedy token from the hidden state at position lengths[b] - 1 of each row."""
    rows = jnp.arange(hidden.shape[0])
    last = hidden[rows, lengths - 1].astype(jnp.float32)
    logits = last @ model.unembedding().astype(jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _prefill(graphdef, state, tokens, cache, lengths):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.decode(tokens, cache, jnp.zeros_like(lengths))
    return _next_tokens(model, hidden, lengths), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode_step(graphdef, state, token, cache, positions):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.decode(token[:, None], cache, positions)
    return _next_tokens(model, hidden, jnp.ones_like(positions)), cache


@functools.partial(jax.jit, static_argnums=0)
def _full_forward_step(graphdef, state, tokens, lengths):
    # Reference path: the whole buffer through the ordinary forward, every step.
    model = nnx.merge(graphdef, state)
    return _next_tokens(model, model(tokens), lengths)


def _stopper(stop_ids) -> Callable[[list[int]], bool]:
    if callable(stop_ids):
        return stop_ids
    stop_set = frozenset(int(t) for t in stop_ids)
    return lambda generated: generated[-1] in stop_set


def _check_lengths(prompts, max_new_tokens: int, max_seq_len: int) -> np.ndarray:
    """int32[rows] prompt lengths; ValueError for a negative budget, an empty prompt or no room."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative; pass 0 or more")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(
            "an empty prompt has no position to predict from; give every prompt at least one token"
        )
    if max_new_tokens and lengths.max() + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt length {lengths.max()} + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_seq_len={max_seq_len}; truncate prompts or generate fewer tokens"
        )
    return lengths


def _prompt_buffer(prompts, lengths, max_new_tokens: int, max_seq_len: int, pad_id: int):
    """(int32[rows, prompt_len + max_new_tokens] buffer holding the prompts, prompt_len). The
    prompt part is rounded up to a bucket, so prompts of similar length share a compiled prefill."""
    bucketed = -(-int(lengths.max()) // _LENGTH_BUCKET) * _LENGTH_BUCKET
    prompt_len = min(bucketed, max_seq_len - max_new_tokens)
    buffer = np.full((len(prompts), prompt_len + max_new_tokens), pad_id, np.int32)
    for b, prompt in enumerate(prompts):
        buffer[b, : len(prompt)] = prompt
    return buffer, prompt_len


def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids=frozenset(),
    pad_id: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation of each prompt; returns the generated ids per row.

    stop_ids: a set of ids (a row stops once it produces one) or a callable
      `stop(generated_ids_so_far: list[int]) -> bool` checked after every new token.
    The token that triggered the stop is kept as the row's last element. A row also stops
    after max_new_tokens. use_cache=False re-runs `model(tokens)` on the full buffer at each
    step (slow reference path); both paths give the same tokens up to float rounding.
    """
    if not prompts:
        return []
    lengths = _check_lengths(prompts, max_new_tokens, model.config.max_seq_len)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    buffer, prompt_len = _prompt_buffer(prompts, lengths, max_new_tokens, model.config.max_seq_len, pad_id)
    batch, total = buffer.shape

    graphdef, state = nnx.split(model)
    should_stop = _stopper(stop_ids)
    generated = [[] for _ in prompts]
    active = np.ones(batch, bool)
    cur = lengths.copy()  # tokens of each row in the buffer so far
    cache = model.init_cache(batch, total) if use_cache else None
    for step in range(max_new_tokens):
        if use_cache and step == 0:
            token, cache = _prefill(
                graphdef, state, jnp.asarray(buffer[:, :prompt_len]), cache, jnp.asarray(lengths)
            )
        elif use_cache:
            # Feed the previous token at its position; finished rows feed a harmless pad.
            prev = np.where(active, buffer[np.arange(batch), cur - 1], pad_id).astype(np.int32)
            token, cache = _decode_step(graphdef, state, jnp.asarray(prev), cache, jnp.asarray(cur - 1))
        else:
            token = _full_forward_step(graphdef, state, jnp.asarray(buffer), jnp.asarray(cur))
        token = np.asarray(token)
        for b in np.flatnonzero(active):
            generated[b].append(int(token[b]))
            buffer[b, cur[b]] = token[b]
            cur[b] += 1
            if should_stop(generated[b]) or len(generated[b]) == max_new_tokens:
                active[b] = False
        if not active.any():
            break
    return generated
