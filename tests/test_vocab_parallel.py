"""Vocabulary-parallel fused loss: each tensor shard holds a slice of the unembedding's vocabulary.

Exact against the float64 reference (value, dhidden, dunembedding) on 8 fake devices, and the
compiled train step gathers neither the unembedding nor the logits.
"""

import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mile import sharding as msharding
from mile import state as mstate
from mile import train as T
from mile.fused import fused_loss
from reference import reference_loss
from train_helpers import jit_step, tiny_config

HPARAMS = {"ce": {}, "focal": {"gamma": 0.7}, "mile": {"gamma": 1.3, "sigma": 0.8}}


def _mesh(data, fsdp, tensor):
    return msharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def _inputs(seed, lead=(4, 6), dim=16, vocab=48):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal(lead + (dim,)).astype(np.float32)
    # A wide spread of logits, so the shards' maxima differ by a lot and the merge is exercised.
    unembed = (rng.standard_normal((dim, vocab)) * np.linspace(0.2, 2.0, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, lead).astype(np.int32)
    mask = rng.random(lead) < 0.75
    mask.flat[0] = True
    return hidden, unembed, np.where(mask, labels, -100), mask


def _assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("sizes", [(2, 2, 2), (2, 1, 4)], ids=["tensor2", "tensor4"])
@pytest.mark.parametrize("norm", ["global", "paper"])
def test_vocab_parallel_equals_float64_reference(sizes, norm):
    mesh = _mesh(*sizes)
    hidden, unembed, labels, mask = _inputs(seed=sizes[2] * 7 + len(norm))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    head = NamedSharding(mesh, P(None, "tensor"))
    h64, w64 = hidden.astype(np.float64), unembed.astype(np.float64)
    for loss, hp in HPARAMS.items():

        def value(h, w, y, m):
            return fused_loss(
                h, w, y, m, loss=loss, chunk_size=4, batch_axes=("data", "fsdp"), vocab_axis="tensor",
                normalization=norm, **hp,
            )  # fmt: skip

        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))
            args = [
                jax.device_put(x, s)
                for x, s in zip((hidden, unembed, labels, mask), (rows, head, rows, rows))
            ]
            (v, aux), (gh, gw) = step(*args)
        want, dlogits, want_aux = reference_loss(h64 @ w64, labels, mask, loss=loss, normalization=norm, **hp)
        np.testing.assert_allclose(v, want, rtol=1e-5, err_msg=loss)
        _assert_close(gh, np.einsum("btv,dv->btd", dlogits, w64), 1e-5)
        _assert_close(gw, np.einsum("btd,btv->dv", h64, dlogits), 1e-5)
        for key in ("nll", "entropy", "weight_mean", "weight_min", "weight_max", "num_tokens"):
            np.testing.assert_allclose(aux[key], want_aux[key], rtol=1e-5, err_msg=f"{loss} {key}")
        # The unembedding's gradient comes back split over the vocabulary like the unembedding.
        assert gw.sharding.spec == P(None, "tensor"), gw.sharding


def test_vocab_parallel_statistics_only_path():
    """No gradient taken (evaluation): the same value through the statistics-only primal."""
    mesh = _mesh(2, 1, 4)
    hidden, unembed, labels, mask = _inputs(seed=3)
    with jax.set_mesh(mesh):
        v = jax.jit(
            lambda h, w: fused_loss(
                h, w, labels, mask, loss="mile", batch_axes=("data",), vocab_axis="tensor"
            )[0]
        )(hidden, unembed)
    want, _, _ = reference_loss(hidden @ unembed, labels, mask, loss="mile")
    np.testing.assert_allclose(v, want, rtol=1e-5)


def test_vocab_parallel_bad_input():
    hidden, unembed, labels, mask = _inputs(seed=5, vocab=50)
    with jax.set_mesh(_mesh(2, 1, 4)):
        with pytest.raises(ValueError, match="vocabulary 50 does not divide over the 4 shards"):
            fused_loss(hidden, unembed, labels, mask, loss="ce", batch_axes=("data",), vocab_axis="tensor")
        with pytest.raises(ValueError, match="vocab_axis 'data' is also a batch axis"):
            fused_loss(
                hidden, unembed[:, :48], labels % 48, mask, loss="ce", batch_axes=("data",), vocab_axis="data"
            )
    with pytest.raises(ValueError, match="not all axes of the current mesh"):
        fused_loss(hidden, unembed, labels, mask, loss="ce", vocab_axis="tensor")


def test_vocab_parallel_axis_follows_the_rule_table():
    rules = msharding.DEFAULT_RULES
    assert msharding.vocab_parallel_axis(_mesh(2, 2, 2), rules, 32, 320) == "tensor"
    assert msharding.vocab_parallel_axis(_mesh(8, 1, 1), rules, 32, 320) is None  # one tensor shard
    assert msharding.vocab_parallel_axis(_mesh(2, 1, 4), rules, 32, 322) is None  # head not split
    replicated = [r if r[0] != "vocab" else ("vocab", None) for r in rules]
    assert msharding.vocab_parallel_axis(_mesh(2, 1, 4), replicated, 32, 320) is None


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every all-gather in compiled HLO text."""
    shapes = []
    for match in re.finditer(r"= (\S+) all-gather(?:-start)?\(", hlo):
        for dims in re.findall(r"\[([\d,]*)\]", match.group(1)):
            shapes.append(tuple(int(d) for d in dims.split(",") if d))
    return shapes


def test_all_gather_check_sees_a_gathered_unembedding():
    """The HLO check above can fail: with the head split over tensor but no vocab axis given,
    the fused loss gathers the whole unembedding to every device."""
    mesh = _mesh(2, 1, 4)
    hidden, unembed, labels, mask = _inputs(seed=9)
    rows, head = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "tensor"))
    gathered = {}
    for axis in (None, "tensor"):

        def value(h, w, axis=axis):
            return fused_loss(h, w, labels, mask, loss="mile", batch_axes=("data",), vocab_axis=axis)[0]

        with jax.set_mesh(mesh):
            args = (jax.device_put(hidden, rows), jax.device_put(unembed, head))
            hlo = jax.jit(jax.grad(value, argnums=(0, 1))).lower(*args).compile().as_text()
        gathered[axis] = [s for s in _all_gather_shapes(hlo) if unembed.shape[1] in s]
    assert gathered == {None: [unembed.shape], "tensor": []}, gathered


def _compiled_train_step(cfg, graphdef, state, mesh, batch, vocab_axis):
    assert cfg.optim.num_microbatches == 1
    step = jit_step(cfg, graphdef, state, mesh, vocab_axis=vocab_axis)
    with jax.set_mesh(mesh):
        return step.lower(state, batch).compile()


def test_train_step_vocab_parallel_equals_one_device_and_gathers_no_vocabulary(tmp_path):
    """The trainer's step on data=2 x tensor=4 with the vocab-parallel head: same loss, gradient
    norm and updated parameters as one device, and no all-gather with a vocabulary-sized
    dimension (unembedding or logits) in the compiled step."""
    cfg = tiny_config(tmp_path, **{"loss.name": "mile"})
    vocab = cfg.model.vocab_size
    rng = np.random.default_rng(0)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    tokens = rng.integers(0, vocab, (shape[0], shape[1] + 1)).astype(np.int32)
    mask = (rng.random(shape) < 0.9).astype(np.float32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
    rules = tuple(tuple(r) for r in cfg.sharding_rules)

    results = {}
    one = msharding.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1]
    )
    mesh = _mesh(2, 1, 4)
    vocab_axis = msharding.vocab_parallel_axis(mesh, rules, cfg.model.embed_dim, vocab)
    assert vocab_axis == "tensor"
    for name, m, axis in (("one", one, None), ("vocab", mesh, vocab_axis)):
        graphdef, state, _ = mstate.build_state(cfg, m, rules)
        sharded = T.global_batch(batch, msharding.batch_sharding(m))
        step = _compiled_train_step(cfg, graphdef, state, m, sharded, axis)
        new_state, metrics = step(state, sharded)
        params = nnx.state(nnx.merge(graphdef, new_state)[0], nnx.Param)
        results[name] = (jax.device_get(metrics), jax.tree.map(np.asarray, params))
    hlo = step.as_text()
    (m1, p1), (m8, p8) = results["one"], results["vocab"]
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m8["entropy"], m1["entropy"], rtol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p8, p1)

    assert not [s for s in _all_gather_shapes(hlo) if vocab in s], _all_gather_shapes(hlo)
