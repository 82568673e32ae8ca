"""Tests for the kv-cache decode path (mile.model) and greedy generation (mile.generate)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mile.generate import greedy_generate
from mile.model import Llama
from model_helpers import tiny_model_config

VOCAB = 50


@functools.lru_cache(maxsize=None)
def tiny_model(scan_layers=False, seed=0):
    # init_std 0.3 so logits are far apart and argmax is not decided by rounding.
    cfg = tiny_model_config(vocab_size=VOCAB, max_seq_len=64, init_std=0.3, scan_layers=scan_layers)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def decode(model, tokens, cache, start_pos):
    return model.decode(tokens, cache, start_pos)


@pytest.fixture(scope="module", params=[False, True], ids=["list", "scan"])
def model(request):
    return tiny_model(scan_layers=request.param)


def test_decode_matches_full_forward(model):
    """Prefill 5 tokens, then 1, then 3 (per-row offsets) == the full forward's hidden."""
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, VOCAB, dtype=jnp.int32)
    full = forward(model, tokens)
    cache = model.init_cache(2, 16)
    pieces = []
    for start, stop in [(0, 5), (5, 6), (6, 9)]:
        hidden, cache = decode(model, tokens[:, start:stop], cache, jnp.full((2,), start, jnp.int32))
        pieces.append(hidden)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full[:, :9], rtol=1e-5, atol=1e-5)


def test_decode_rows_at_different_positions(model):
    """Rows decoding at different start positions each match their own full forward."""
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB, dtype=jnp.int32)
    full = forward(model, tokens)
    cache = model.init_cache(2, 16)
    # Fill row 0 to length 4 and row 1 to length 7; junk beyond a row's length must be ignored.
    _, cache = decode(model, tokens[:, :7], cache, jnp.zeros((2,), jnp.int32))
    start = jnp.array([4, 7], jnp.int32)
    step = jnp.stack([tokens[0, 4:6], tokens[1, 7:9]])
    hidden, _ = decode(model, step, cache, start)
    np.testing.assert_allclose(hidden[0], full[0, 4:6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden[1], full[1, 7:9], rtol=1e-5, atol=1e-5)


def test_cache_too_long_rejected(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        model.init_cache(1, 65)


def test_cache_matches_no_cache(model):
    prompts = random_prompts([3, 7, 5, 1], seed=3)
    cached = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0)
    reference = greedy_generate(model, prompts, max_new_tokens=10, pad_id=0, use_cache=False)
    assert cached == reference
    assert all(len(row) == 10 for row in cached)
    assert len({tuple(row) for row in cached}) > 1  # not degenerate


def test_batched_equals_single_and_padding_invariance(model):
    prompts = random_prompts([2, 9, 4], seed=4)
    batched = greedy_generate(model, prompts, max_new_tokens=8, pad_id=0)
    singles = [greedy_generate(model, [p], max_new_tokens=8, pad_id=0)[0] for p in prompts]
    assert batched == singles
    # A much longer neighbour (a different buffer bucket) and another pad id change nothing.
    longer = prompts + random_prompts([30], seed=5)
    assert greedy_generate(model, longer, max_new_tokens=8, pad_id=VOCAB - 1)[:3] == batched


def test_stop_tokens_respected():
    model = tiny_model()
    prompts = random_prompts([4, 6], seed=6)
    free = greedy_generate(model, prompts, max_new_tokens=12)
    stop = free[0][3]
    out = greedy_generate(model, prompts, max_new_tokens=12, stop_ids={stop})
    for row, ref in zip(out, free):
        # Each row is the unconstrained continuation up to and including its first stop id.
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]
    assert out[0][-1] == stop and len(out[0]) <= 4
    # A callable sees the ids generated so far.
    out = greedy_generate(model, prompts, max_new_tokens=12, stop_ids=lambda ids: len(ids) == 2)
    assert out == [ref[:2] for ref in free]


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy_generate(model, [[1] * 60], max_new_tokens=5)
    assert greedy_generate(model, [[1, 2]], max_new_tokens=0) == [[]]
