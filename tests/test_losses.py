"""The loss library against an independent float64 NumPy reference and against its own invariants."""

import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mile import losses as L
from reference import loss_hparams, random_inputs, reference_loss

LOSS_FNS = {"ce": L.cross_entropy_loss, "focal": L.focal_loss, "mile": L.mile_loss}
RTOL = 1e-5


CASES = [
    (loss, norm, gamma, sigma)
    for loss in ("ce", "focal", "mile")
    for norm in ("global", "paper")
    for gamma, sigma in ((1.0, 1.0), (0.5, 1.0), (2.0, 0.5))
    if not (loss == "ce" and gamma != 1.0)
]


@pytest.mark.parametrize("loss,norm,gamma,sigma", CASES)
def test_value_gradient_and_aux_match_float64_reference(loss, norm, gamma, sigma):
    # A stable seed: Python salts str hashes per process, so hash() would not reproduce a failure.
    logits, labels, mask = random_inputs(seed=zlib.crc32(f"{loss}-{norm}-{gamma}-{sigma}".encode()))
    hp = loss_hparams(loss, gamma, sigma)
    fn = LOSS_FNS[loss]

    def value(z):
        return fn(z, labels, mask, normalization=norm, **hp)

    (got, aux), grad = jax.value_and_grad(value, has_aux=True)(jnp.asarray(logits))
    want, want_grad, want_aux = reference_loss(
        logits, labels, mask, loss=loss, gamma=gamma, sigma=sigma, normalization=norm
    )
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(grad, want_grad, rtol=RTOL, atol=RTOL * np.abs(want_grad).max())
    for key in want_aux:
        np.testing.assert_allclose(aux[key], want_aux[key], rtol=RTOL, err_msg=key)


def test_paper_mode_differs_from_global_when_masked():
    logits, labels, mask = random_inputs(seed=3)
    g, _ = L.mile_loss(logits, labels, mask)
    p, _ = L.mile_loss(logits, labels, mask, normalization="paper")
    assert abs(float(g) - float(p)) > 1e-3  # masked positions enter the paper normaliser


def test_paper_ce_is_the_mean_over_non_ignored_positions():
    """The reference code's CE baseline is torch's CrossEntropyLoss with ignore_index: the mean
    of -log p(label) over the positions not ignored (hand-written here in float64)."""
    logits, labels, mask = random_inputs(seed=4)
    z = logits.astype(np.float64)
    log_p = z - z.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    want = nll[mask].mean()
    assert mask.sum() < mask.size  # some positions are ignored, so dividing by all would differ
    got, aux = L.cross_entropy_loss(logits, labels, mask, normalization="paper")
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert float(aux["denominator"]) == mask.sum()


def test_loss_spec_equality_includes_the_weight_rule():
    double = lambda nll, entropy: 2.0 * jnp.ones_like(nll)  # noqa: E731
    triple = lambda nll, entropy: 3.0 * jnp.ones_like(nll)  # noqa: E731
    a = L.LossSpec("custom", double, "paper", {"k": 1.0})
    b = L.LossSpec("custom", triple, "paper", {"k": 1.0})
    assert a != b and hash(a) != hash(b)
    assert a == L.LossSpec("custom", double, "paper", {"k": 1.0})
    # Bound hyperparameters are part of the rule: equal specs from get_loss, different gammas not.
    assert L.get_loss("mile", gamma=0.5) == L.get_loss("mile", gamma=0.5)
    assert hash(L.get_loss("mile", gamma=0.5)) == hash(L.get_loss("mile", gamma=0.5))
    assert L.get_loss("mile", gamma=0.5) != L.get_loss("mile", gamma=1.0)
    # A jit cache keyed on the spec (a static argument) must not reuse the other rule's trace.
    logits, labels, _ = random_inputs(seed=5)
    labels = np.abs(labels) % logits.shape[-1]
    weight_mean = jax.jit(lambda spec, z: L.apply_loss(spec, z, labels)[1]["weight_mean"], static_argnums=0)
    assert float(weight_mean(a, logits)) == 2.0 and float(weight_mean(b, logits)) == 3.0


@pytest.mark.parametrize("loss", ["focal", "mile"])
@pytest.mark.parametrize("norm", ["global", "paper"])
def test_gamma_zero_is_exactly_cross_entropy(loss, norm):
    """gamma = 0 makes focal and MiLe CE. In paper mode the reference's reweighted path still
    divides by every position, ignored ones included, so there it is CE x (kept / all positions)."""
    logits, labels, mask = random_inputs(seed=5)
    fn = LOSS_FNS[loss]
    ce = jax.value_and_grad(lambda z: L.cross_entropy_loss(z, labels, mask, normalization=norm)[0])
    other = jax.value_and_grad(lambda z: fn(z, labels, mask, gamma=0.0, normalization=norm)[0])
    (v_ce, g_ce), (v, g) = ce(logits), other(logits)
    if norm == "global":
        assert float(v) == float(v_ce)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ce))
    else:
        kept = mask.sum() / mask.size
        np.testing.assert_allclose(float(v), float(v_ce) * kept, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ce) * kept, rtol=1e-5, atol=1e-9)


def test_cross_entropy_matches_optax_on_valid_positions():
    logits, labels, mask = random_inputs(seed=7)
    got, _ = L.cross_entropy_loss(logits, labels, mask)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[mask], labels[mask])
    np.testing.assert_allclose(got, per_token.mean(), rtol=RTOL)
    got_all, _ = L.cross_entropy_loss(logits, np.where(mask, labels, 0))
    want_all = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(mask, labels, 0)).mean()
    np.testing.assert_allclose(got_all, want_all, rtol=RTOL)


def test_registry_selects_loss_with_hyperparameters():
    logits, labels, mask = random_inputs(seed=11)
    spec = L.get_loss("mile", gamma=0.5, sigma=2.0)
    assert spec.name == "mile" and spec.hparams == {"gamma": 0.5, "sigma": 2.0}
    a, _ = L.apply_loss(spec, logits, labels, mask)
    b, _ = L.mile_loss(logits, labels, mask, gamma=0.5, sigma=2.0)
    assert float(a) == float(b)
    assert L.get_loss("ce") == L.get_loss("ce")
    assert set(L.LOSS_NAMES) == {"ce", "focal", "mile"}


@pytest.mark.parametrize("norm", ["global", "paper"])
@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
def test_terms_accumulate_exactly_over_micro_batches(loss, norm):
    logits, labels, mask = random_inputs(seed=13, shape=(6, 5))
    spec = L.get_loss(loss, normalization=norm)
    whole, _ = L.apply_loss(spec, logits, labels, mask)
    terms = [L.loss_terms(spec, logits[i : i + 2], labels[i : i + 2], mask[i : i + 2]) for i in (0, 2, 4)]
    acc = terms[0]
    for t in terms[1:]:
        acc = L.combine_terms(acc, t)
    accumulated, aux = L.finalize_terms(acc)
    np.testing.assert_allclose(accumulated, whole, rtol=1e-6)
    _, whole_aux = L.apply_loss(spec, logits, labels, mask)
    for key in whole_aux:
        np.testing.assert_allclose(aux[key], whole_aux[key], rtol=1e-6, err_msg=key)


def test_sharded_batch_gives_the_same_loss_and_gradients():
    assert jax.device_count() == 8
    logits, labels, mask = random_inputs(seed=17, shape=(8, 6), vocab=40)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    for loss in ("ce", "focal", "mile"):
        step = jax.jit(jax.value_and_grad(lambda z, y, m: LOSS_FNS[loss](z, y, m)[0]))
        v1, g1 = step(logits, labels, mask)
        args = [jax.device_put(x, batch) for x in (logits, labels, mask)]
        v8, g8 = step(*args)
        assert len(args[0].sharding.device_set) == 8
        np.testing.assert_allclose(v8, v1, rtol=1e-6)
        np.testing.assert_allclose(g8, g1, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
def test_extreme_logits_stay_finite(loss):
    rng = np.random.default_rng(0)
    logits = rng.choice([-1e4, 1e4, 0.0], size=(4, 5, 23)).astype(np.float32)
    labels = rng.integers(0, 23, (4, 5))
    v, g = jax.value_and_grad(lambda z: LOSS_FNS[loss](z, labels)[0])(logits)
    _, aux = LOSS_FNS[loss](logits, labels)
    assert np.isfinite(v) and np.all(np.isfinite(g))
    assert all(np.isfinite(x) for x in aux.values())
    # A single logit at +1e4 makes the distribution one-hot: entropy 0, nll 0 or ~2e4.
    want, _, _ = reference_loss(logits, labels, None, loss=loss)
    np.testing.assert_allclose(v, want, rtol=RTOL)


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("norm", ["global", "paper"])
def test_all_masked_batch_is_zero_with_finite_gradients(loss, norm):
    logits, labels, _ = random_inputs(seed=19)
    mask = np.zeros(labels.shape, bool)
    (v, aux), g = jax.value_and_grad(
        lambda z: LOSS_FNS[loss](z, labels, mask, normalization=norm), has_aux=True
    )(logits)
    assert float(v) == 0.0
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)
    assert float(aux["num_tokens"]) == 0 and all(np.isfinite(x) for x in aux.values())


def test_bf16_logits_compute_in_float32():
    logits, labels, mask = random_inputs(seed=23)
    bf = jnp.asarray(logits, jnp.bfloat16)
    got, _ = L.mile_loss(bf, labels, mask)
    want, _, _ = reference_loss(np.asarray(bf.astype(jnp.float32)), labels, mask, loss="mile")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=RTOL)


# --- bad input: one clear ValueError naming the argument ------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda z, y, m: L.mile_loss(z, y[:, :-1]), "labels shape"),
        (lambda z, y, m: L.mile_loss(z, y, m[:, :-1]), "mask shape"),
        (lambda z, y, m: L.mile_loss(z.astype(np.int32), y), "logits must be a floating"),
        (lambda z, y, m: L.mile_loss(z, y.astype(np.float32)), "labels must be integers"),
        (lambda z, y, m: L.mile_loss(z, y, gamma=-1.0), "gamma must be"),
        (lambda z, y, m: L.focal_loss(z, y, gamma=-0.5), "gamma must be"),
        (lambda z, y, m: L.mile_loss(z, y, sigma=-1.0), "sigma must be"),
        (lambda z, y, m: L.mile_loss(z, y, normalization="mean"), "unknown normalization"),
        (lambda z, y, m: L.cross_entropy_loss(z, y, normalization="tokens"), "unknown normalization"),
        (lambda z, y, m: L.get_loss("mse"), "unknown loss 'mse'"),
        (lambda z, y, m: L.get_loss("ce", gamma=1.0), "bad hyperparameters for loss 'ce'"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    logits, labels, mask = random_inputs(seed=29)
    with pytest.raises(ValueError, match=match):
        call(logits, labels, mask)


def test_bad_input_fails_at_trace_time_under_jit():
    logits, labels, _ = random_inputs(seed=31)
    with pytest.raises(ValueError, match="labels shape"):
        jax.jit(lambda z, y: L.mile_loss(z, y)[0])(logits, labels[:, 1:])


def test_importing_losses_pulls_in_no_training_stack():
    code = (
        "import sys, mile.losses, mile.fused; "
        "bad = [m for m in ('flax', 'tensorflow_datasets', 'grain', 'orbax', 'tensorflow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
