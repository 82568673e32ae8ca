"""The public API: `mile` names, `__all__`, and `mile.losses.per_token` against a float64 NumPy
per-token formula and against the reduced losses it must add up to."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mile
from mile import fused as F
from mile import losses as L
from reference import loss_hparams, paper_clamped_entropy, random_inputs

RTOL = 1e-5


def _numpy_per_token(logits, labels, mask, *, loss, gamma, sigma, normalization):
    """float64, straight from the paper's definitions: per-position nll, H, w, and normaliser share."""
    z = np.asarray(logits, np.float64)
    m = np.asarray(mask, np.float64)
    y = np.where(m > 0, labels, 0)
    shifted = z - z.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    p = np.exp(log_p)
    nll = -np.take_along_axis(log_p, y[..., None], -1)[..., 0]
    entropy = -(p * log_p).sum(-1)
    paper = normalization == "paper" and loss != "ce"  # the reference's CE is a plain masked mean
    if paper:  # ignore_index gives nll = 0; entropy from p clamped to [1e-8, 1]
        nll_w, h_w = nll * m, paper_clamped_entropy(p)
    else:
        nll_w, h_w = nll, entropy
    w = {
        "ce": np.ones_like(nll),
        "focal": (1.0 - np.exp(-nll_w)) ** gamma,
        "mile": (sigma + h_w) ** gamma,
    }[loss]
    denominator = w if paper else m * w
    grad = (m * w / denominator.sum())[..., None] * (p - np.eye(z.shape[-1])[y])
    return {
        "mask": m,
        "nll": m * nll,
        "entropy": m * entropy,
        "weight": m * w,
        "numerator": m * w * nll,
        "denominator": denominator,
    }, grad


def _formula(loss, norm, gamma, sigma):
    return {"loss": loss, "normalization": norm, "gamma": gamma, "sigma": sigma}


CASES = [
    (loss, norm, gamma, sigma)
    for loss in ("ce", "focal", "mile")
    for norm in ("global", "paper")
    for gamma, sigma in ((1.0, 1.0), (0.5, 1.0), (2.0, 0.5), (1.0, 0.0))
    if not (loss == "ce" and (gamma, sigma) != (1.0, 1.0))
    and not (loss == "focal" and sigma != 1.0)
]


@pytest.mark.parametrize("loss,norm,gamma,sigma", CASES)
def test_per_token_matches_float64_formula(loss, norm, gamma, sigma):
    logits, labels, mask = random_inputs(seed=len(CASES) + CASES.index((loss, norm, gamma, sigma)))
    hp = loss_hparams(loss, gamma, sigma)
    got = L.per_token(loss, logits, labels, mask, normalization=norm, **hp)
    want, _ = _numpy_per_token(logits, labels, mask, **_formula(loss, norm, gamma, sigma))
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == labels.shape and got[key].dtype == jnp.float32, key
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("loss,norm,gamma,sigma", CASES)
def test_per_token_sums_to_the_loss_with_its_gradient(loss, norm, gamma, sigma):
    logits, labels, mask = random_inputs(seed=CASES.index((loss, norm, gamma, sigma)))
    spec = L.get_loss(loss, normalization=norm, **loss_hparams(loss, gamma, sigma))

    def from_per_token(z):
        t = L.per_token(spec, z, labels, mask)
        return jnp.sum(t["numerator"]) / jnp.sum(t["denominator"])

    def from_terms(z):
        return L.finalize_terms(L.loss_terms(spec, z, labels, mask))[0]

    z = jnp.asarray(logits)
    value, grad = jax.value_and_grad(from_per_token)(z)
    want_value, want_grad = jax.value_and_grad(from_terms)(z)
    # Same operations on the same arrays: equal to the last bit when run op by op.
    np.testing.assert_array_equal(value, want_value)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)
    terms = L.loss_terms(spec, z, labels, mask)
    t = L.per_token(spec, z, labels, mask)
    np.testing.assert_array_equal(jnp.sum(t["denominator"]), terms["denominator"])
    np.testing.assert_array_equal(jnp.sum(t["numerator"]), terms["numerator"])
    # ... and both against the float64 gradient (m w / N)(p - e_y).
    _, np_grad = _numpy_per_token(logits, labels, mask, **_formula(loss, norm, gamma, sigma))
    np.testing.assert_allclose(grad, np_grad, rtol=RTOL, atol=RTOL * np.abs(np_grad).max())
    jit_value = jax.jit(from_per_token)(z)
    np.testing.assert_allclose(jit_value, want_value, rtol=1e-6)


def test_per_token_with_a_custom_normaliser():
    """A trainer's own reduction (here: mean over sequences of each sequence's weighted mean)
    gets MiLe's weights as constants: its gradient is the CE gradient with the scale it chose."""
    logits, labels, mask = random_inputs(seed=7)

    def per_sequence(z):
        t = L.per_token("mile", z, labels, mask, gamma=1.0, sigma=1.0)
        seq_norm = jnp.sum(t["mask"] * t["weight"], axis=-1)
        return jnp.mean(jnp.sum(t["numerator"], axis=-1) / seq_norm)

    grad = jax.grad(per_sequence)(jnp.asarray(logits))
    want, _ = _numpy_per_token(logits, labels, mask, **_formula("mile", "global", 1.0, 1.0))
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    scale = want["weight"] / want["weight"].sum(-1, keepdims=True) / logits.shape[0]
    y = np.where(mask, labels, 0)
    want_grad = scale[..., None] * (p - np.eye(logits.shape[-1])[y])
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=RTOL * np.abs(want_grad).max())


def test_per_token_masked_positions_and_stop_gradients():
    logits, labels, mask = random_inputs(seed=11)
    t = L.per_token("mile", logits, labels, mask, normalization="paper")
    masked = ~mask
    for key in ("mask", "nll", "entropy", "weight", "numerator"):
        np.testing.assert_array_equal(np.asarray(t[key])[masked], 0.0, err_msg=key)
    # paper MiLe: a masked position still adds its entropy weight to the normaliser
    assert np.all(np.asarray(t["denominator"])[masked] >= 1.0)

    z = jnp.asarray(logits)
    for key in ("entropy", "weight", "denominator"):  # constants, as in the loss
        g = jax.grad(lambda z, k=key: jnp.sum(L.per_token("mile", z, labels, mask)[k]))(z)
        np.testing.assert_array_equal(g, 0.0, err_msg=key)
    g = jax.grad(lambda z: jnp.sum(L.per_token("mile", z, labels, mask)["nll"]))(z)
    np.testing.assert_array_equal(np.asarray(g)[masked], 0.0)
    assert np.all(np.abs(np.asarray(g)[mask]).sum(-1) > 0)


def test_per_token_gamma_zero_is_ce_and_mask_none_counts_all():
    logits, labels, _ = random_inputs(seed=13, keep=1.0)
    ce = L.per_token("ce", logits, labels)
    for loss in ("focal", "mile"):
        t = L.per_token(loss, logits, labels, gamma=0.0)
        np.testing.assert_array_equal(t["weight"], 1.0)
        np.testing.assert_array_equal(t["numerator"], ce["numerator"])
    np.testing.assert_array_equal(ce["mask"], 1.0)


def test_per_token_and_resolve_loss_reject_bad_arguments():
    logits, labels, mask = random_inputs(seed=17)
    spec = L.get_loss("mile", gamma=2.0)
    assert L.resolve_loss(spec) is spec
    assert L.resolve_loss("focal", gamma=0.5) == L.get_loss("focal", gamma=0.5)
    with pytest.raises(ValueError, match="not both"):
        L.per_token(spec, logits, labels, mask, gamma=1.0)
    with pytest.raises(ValueError, match="unknown loss"):
        L.per_token("mle", logits, labels, mask)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        L.per_token("ce", logits, labels, mask, gamma=1.0)
    with pytest.raises(ValueError, match="labels shape"):
        L.per_token("mile", logits, labels[:, 1:], mask[:, 1:])
    with pytest.raises(ValueError, match="not both"):
        F.fused_loss(logits[..., :4], np.ones((4, 5), np.float32), labels % 5, mask, loss=spec, gamma=1.0)


def test_safe_labels_is_public():
    labels = jnp.array([3, -100, 7])
    np.testing.assert_array_equal(L.safe_labels(labels, jnp.array([1.0, 0.0, 1.0])), [3, 0, 7])
    assert not hasattr(L, "_safe_labels")


@pytest.mark.parametrize("module", [L, F])
def test_all_names_exist_and_are_documented(module):
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name
        assert name in module.__doc__, f"{name} missing from the {module.__name__} docstring"


def test_package_exposes_the_loss_library_lazily():
    for name in mile.__all__:
        value = getattr(mile, name)
        if name in ("losses", "fused"):
            assert value is {"losses": L, "fused": F}[name]
        else:
            owner = L if name in L.__all__ else F
            assert value is getattr(owner, name), name
    assert set(mile.__all__) <= set(dir(mile))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mile.nope  # noqa: B018
    code = (
        "import sys, mile; "
        "heavy = [m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "mile.per_token; assert 'jax' in sys.modules and 'flax' not in sys.modules; "
        "from mile import jsonl; assert mile.jsonl is jsonl"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
