"""normalization="paper" is the reference code's MiLe, entropy clamp included, in every path.

The reference clamps the probabilities before the entropy, p~ = clip(p, 1e-8, 1), and uses p~ in
both factors of -sum p~ ln p~. With peaked logits over a large vocabulary most entries fall below
the floor, which is where clamping only the log differs. Each path (materialised logits, the
fused head, the vocabulary-parallel fused head) is checked in value and gradients against the
float64 formula in tests/reference.py, with peaked and with flat logits, masked positions present.
"""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mile import losses as L
from mile import sharding as msharding
from mile.fused import fused_loss
from reference import reference_loss

HP = {"gamma": 2.0, "sigma": 0.5, "normalization": "paper"}
VALUE_RTOL, GRAD_RTOL = 2e-6, 2e-5  # clamping only the log is off by ~6e-5 and ~3e-4 here
SCALES = {"peaked": 8.0, "flat": 0.3}  # std of the logits


def _inputs(seed, scale, lead=(4, 16), dim=16, vocab=4099):
    """hidden, unembedding (logits hidden @ unembedding have std `scale`), labels, mask."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal(lead + (dim,)).astype(np.float32)
    unembed = (rng.standard_normal((dim, vocab)) * scale / np.sqrt(dim)).astype(np.float32)
    labels = rng.integers(0, vocab, lead).astype(np.int32)
    mask = rng.random(lead) < 0.7
    mask.flat[0] = True
    return hidden, unembed, np.where(mask, labels, -100), mask


def _reference(hidden, unembed, labels, mask):
    h64, w64 = hidden.astype(np.float64), unembed.astype(np.float64)
    value, dlogits, _ = reference_loss(h64 @ w64, labels, mask, loss="mile", **HP)
    return value, np.einsum("btv,dv->btd", dlogits, w64), np.einsum("btd,btv->dv", h64, dlogits), dlogits


def _assert_close(got, want, rtol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=what)


def test_peaked_inputs_exercise_the_floor():
    """The peaked case must be one where the two clamps differ, or the tests below prove nothing."""
    hidden, unembed, labels, mask = _inputs(1, SCALES["peaked"])
    z = (hidden @ unembed).astype(np.float64)
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    below = np.exp(log_p) < 1e-8
    assert below.mean() > 0.3, below.mean()
    log_clamp_only = -(np.exp(log_p) * np.maximum(log_p, np.log(1e-8))).sum(-1)
    both_clamped = -(np.maximum(np.exp(log_p), 1e-8) * np.maximum(log_p, np.log(1e-8))).sum(-1)
    assert np.max(np.abs(log_clamp_only - both_clamped)) > 1e-4


@pytest.mark.parametrize("kind", list(SCALES))
def test_materialised_paper_mile_is_the_reference(kind):
    hidden, unembed, labels, mask = _inputs(2, SCALES[kind])
    logits = hidden @ unembed
    (value, _), grad = jax.value_and_grad(lambda z: L.mile_loss(z, labels, mask, **HP), has_aux=True)(logits)
    want, _, _, dlogits = _reference(hidden, unembed, labels, mask)
    np.testing.assert_allclose(value, want, rtol=VALUE_RTOL)
    _assert_close(grad, dlogits, GRAD_RTOL, "dlogits")


@pytest.mark.parametrize("kind", list(SCALES))
def test_fused_paper_mile_is_the_reference(kind):
    hidden, unembed, labels, mask = _inputs(3, SCALES[kind])
    loss = lambda h, w: fused_loss(h, w, labels, mask, loss="mile", chunk_size=16, **HP)[0]  # noqa: E731
    value, (gh, gw) = jax.value_and_grad(loss, argnums=(0, 1))(hidden, unembed)
    want, want_gh, want_gw, _ = _reference(hidden, unembed, labels, mask)
    np.testing.assert_allclose(value, want, rtol=VALUE_RTOL)
    _assert_close(gh, want_gh, GRAD_RTOL, "dhidden")
    _assert_close(gw, want_gw, GRAD_RTOL, "dunembedding")


@pytest.mark.parametrize("kind", list(SCALES))
def test_vocab_parallel_paper_mile_is_the_reference(kind):
    mesh = msharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=4)))
    hidden, unembed, labels, mask = _inputs(4, SCALES[kind], vocab=4100)  # divides over 4 shards
    rows, head = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "tensor"))

    def loss(h, w, y, m):
        return fused_loss(
            h, w, y, m, loss="mile", chunk_size=8, batch_axes=("data",), vocab_axis="tensor", **HP
        )[0]

    with jax.set_mesh(mesh):
        args = [jax.device_put(x, s) for x, s in zip((hidden, unembed, labels, mask), (rows, head, rows, rows))]
        value, (gh, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(*args)
    want, want_gh, want_gw, _ = _reference(hidden, unembed, labels, mask)
    np.testing.assert_allclose(value, want, rtol=VALUE_RTOL)
    _assert_close(gh, want_gh, GRAD_RTOL, "dhidden")
    _assert_close(gw, want_gw, GRAD_RTOL, "dunembedding")


def test_paper_ce_skips_the_clamped_entropy():
    """The reference's CE baseline uses no entropy: its paper mode computes none."""
    assert not L.get_loss("ce", normalization="paper").paper_reweighted
    assert L.get_loss("mile", normalization="paper").paper_reweighted
    assert not L.get_loss("mile").paper_reweighted


def test_config_hyperparameter_a_loss_ignores_is_refused():
    """loss_from_config passes each loss what it takes; a non-default value it would drop is an error."""
    from configs import base

    cfg = base.get_config().loss
    for name in ("ce", "focal", "mile"):  # the shipped defaults work for every loss
        cfg.name = name
        assert L.loss_from_config(cfg).name == name
    cfg.name, cfg.gamma = "ce", 2.0
    with pytest.raises(ValueError, match=r"^loss.gamma=2.0 has no effect on loss 'ce' \(only focal, mile take"):
        L.loss_from_config(cfg)
    cfg.name, cfg.gamma, cfg.sigma = "focal", 2.0, 0.5
    with pytest.raises(ValueError, match=r"^loss.sigma=0.5 has no effect on loss 'focal' \(only mile takes sigma"):
        L.loss_from_config(cfg)
    cfg.name = "mile"
    assert L.loss_from_config(cfg).hparams == {"gamma": 2.0, "sigma": 0.5}
