"""fused_loss == the materialised loss on hidden @ unembedding, in value and in both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mile import losses as L
from mile.fused import default_chunk_size, fused_loss
from reference import reference_loss

LOSS_FNS = {"ce": L.cross_entropy_loss, "focal": L.focal_loss, "mile": L.mile_loss}
HPARAMS = {"ce": {}, "focal": {"gamma": 0.7}, "mile": {"gamma": 1.3, "sigma": 0.8}}


def _inputs(seed, lead=(3, 7), dim=16, vocab=53, dtype=np.float32, keep=0.75):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal(lead + (dim,)).astype(dtype)
    unembed = (rng.standard_normal((dim, vocab)) * 0.6).astype(dtype)
    labels = rng.integers(0, vocab, lead).astype(np.int32)
    mask = rng.random(lead) < keep
    mask.flat[0] = True
    return hidden, unembed, np.where(mask, labels, -100), mask


def _value_and_grads(fn, hidden, unembed):
    return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(hidden, unembed)


def _assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("norm", ["global", "paper"])
@pytest.mark.parametrize("chunk_size", [4, 8, None])  # 21 tokens: ragged for 4 and 8
def test_fused_equals_materialised(loss, norm, chunk_size):
    hidden, unembed, labels, mask = _inputs(seed=len(loss) * 10 + (chunk_size or 0))
    hp = dict(HPARAMS[loss], normalization=norm)

    def materialised(h, w):
        return LOSS_FNS[loss](h @ w, labels, mask, **hp)

    def fused(h, w):
        return fused_loss(h, w, labels, mask, loss=loss, chunk_size=chunk_size, **hp)

    (v_m, aux_m), (gh_m, gw_m) = _value_and_grads(materialised, hidden, unembed)
    (v_f, aux_f), (gh_f, gw_f) = _value_and_grads(fused, hidden, unembed)
    np.testing.assert_allclose(v_f, v_m, rtol=1e-5)
    _assert_close(gh_f, gh_m, 1e-5)
    _assert_close(gw_f, gw_m, 1e-5)
    for key in aux_m:
        np.testing.assert_allclose(aux_f[key], aux_m[key], rtol=1e-5, err_msg=key)
    # And the value without differentiation (the stats-only primal path) is the same.
    np.testing.assert_allclose(jax.jit(lambda h, w: fused(h, w)[0])(hidden, unembed), v_m, rtol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
def test_fused_matches_float64_reference(loss):
    hidden, unembed, labels, mask = _inputs(seed=41, lead=(2, 9))
    v, (gh, gw) = jax.value_and_grad(
        lambda h, w: fused_loss(h, w, labels, mask, loss=loss, chunk_size=5, **HPARAMS[loss])[0],
        argnums=(0, 1),
    )(hidden, unembed)
    h64, w64 = hidden.astype(np.float64), unembed.astype(np.float64)
    want, dlogits, _ = reference_loss(h64 @ w64, labels, mask, loss=loss, **HPARAMS[loss])
    np.testing.assert_allclose(v, want, rtol=1e-5)
    _assert_close(gh, dlogits @ w64.T, 1e-5)
    _assert_close(gw, np.einsum("btd,btv->dv", h64, dlogits), 1e-5)


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
def test_fused_bf16_inputs(loss):
    """bf16 hidden/unembedding: products are exact in the float32 accumulator, so the value
    matches the float32 loss of the same (rounded) inputs to 1e-5; the gradient matmuls take
    the tile gradient in bf16 (as autodiff of a bf16 matmul does), so gradients match to 2e-2."""
    hidden, unembed, labels, mask = _inputs(seed=43, lead=(4, 6), dim=32, vocab=61)
    h_bf, w_bf = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
    (v, _), (gh, gw) = _value_and_grads(
        lambda h, w: fused_loss(h, w, labels, mask, loss=loss, chunk_size=8, **HPARAMS[loss]), h_bf, w_bf
    )
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    h32, w32 = h_bf.astype(jnp.float32), w_bf.astype(jnp.float32)
    (v_m, _), (gh_m, gw_m) = _value_and_grads(
        lambda h, w: LOSS_FNS[loss](h @ w, labels, mask, **HPARAMS[loss]), h32, w32
    )
    np.testing.assert_allclose(v, v_m, rtol=1e-5)
    _assert_close(gh.astype(jnp.float32), gh_m, 2e-2)
    _assert_close(gw.astype(jnp.float32), gw_m, 2e-2)


@pytest.mark.parametrize("per_shard", [False, True])
def test_fused_sharded_batch_equals_single_device(per_shard):
    """8 fake devices, batch sharded 8 ways (4 x 2 mesh): the same loss and gradients as one
    device, both as plain GSPMD code and with per-shard tiling (batch_axes)."""
    assert jax.device_count() == 8
    hidden, unembed, labels, mask = _inputs(seed=47, lead=(8, 5), vocab=40)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    axes = ("data", "fsdp") if per_shard else None
    for loss in ("ce", "focal", "mile"):

        def value(h, w, y, m, axes):
            return fused_loss(h, w, y, m, loss=loss, chunk_size=8, batch_axes=axes, **HPARAMS[loss])[0]

        single = jax.jit(jax.value_and_grad(lambda *a: value(*a, None), argnums=(0, 1)))
        v1, (gh1, gw1) = single(hidden, unembed, labels, mask)
        with jax.set_mesh(mesh):
            step = jax.jit(jax.value_and_grad(lambda *a: value(*a, axes), argnums=(0, 1)))
            sharded = [jax.device_put(x, batch) for x in (hidden, labels, mask)]
            args = (sharded[0], unembed, sharded[1], sharded[2])
            v8, (gh8, gw8) = step(*args)
            hlo = step.lower(*args).compile().as_text()
        np.testing.assert_allclose(v8, v1, rtol=1e-6)
        _assert_close(gh8, gh1, 1e-6)
        _assert_close(gw8, gw1, 1e-6)
        if per_shard:  # each device tiles its own rows: nothing is gathered
            assert "all-gather" not in hlo


def test_batch_axes_need_a_mesh():
    hidden, unembed, labels, mask = _inputs(seed=61)
    with pytest.raises(ValueError, match="batch_axes"):
        fused_loss(hidden, unembed, labels, mask, loss="ce", batch_axes=("data",))


def test_loss_must_be_named():
    hidden, unembed, labels, mask = _inputs(seed=62)
    with pytest.raises(TypeError, match="required keyword-only argument: 'loss'"):
        fused_loss(hidden, unembed, labels, mask)


def test_fused_never_holds_the_full_logits():
    n, d, v = 4096, 64, 8000
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temp_bytes(fn):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    chunk = 64  # one [chunk, V] tile is 1/64 of the logits, so holding more shows up clearly
    fused = temp_bytes(lambda h, w, y: fused_loss(h, w, y, loss="mile", chunk_size=chunk)[0])
    logits_bytes = n * v * 4
    # Measured on CPU (jax 0.10.2): 5,178,056 bytes = 0.0395 of the logits' 131 MB, i.e. one float32
    # [64, V] tile (2.0 MB) plus the [D, V] and [N, D] gradient accumulators (3.1 MB). The bound
    # leaves 1.5x of that: one more tile still passes (0.055), a 10x regression (0.40) or any
    # [N, V] buffer, even in bf16 (0.5), fails.
    assert fused <= 0.06 * logits_bytes, (fused, fused / logits_bytes)


def test_default_chunk_size():
    assert default_chunk_size(10**6, 32000) == 128
    assert default_chunk_size(100, 32000) == 100
    assert default_chunk_size(10**6, 10**8) == 8


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"unembedding": np.zeros((15, 53), np.float32)}, "hidden has D=16"),
        ({"unembedding": np.zeros((16,), np.float32)}, "unembedding must have at least 2"),
        ({"hidden": np.zeros((3, 7, 16), np.int32)}, "hidden must be a floating"),
        ({"labels": np.zeros((3, 6), np.int32)}, "labels shape"),
        ({"labels": np.zeros((3, 7), np.float32)}, "labels must be integers"),
        ({"mask": np.ones((7, 3), bool)}, "mask shape"),
        ({"loss": "xent"}, "unknown loss 'xent'"),
        ({"gamma": -1.0}, "gamma must be"),
        ({"normalization": "batch"}, "unknown normalization"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ],
)
def test_fused_bad_input(kwargs, match):
    hidden, unembed, labels, mask = _inputs(seed=53)
    args = {"hidden": hidden, "unembedding": unembed, "labels": labels, "mask": mask, "loss": "mile"}
    hp = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fused_loss(**args, **hp)


def test_fused_token_statistics_match_float64():
    from mile.fused import fused_token_statistics

    hidden, unembed, labels, _ = _inputs(seed=59, lead=(2, 11))
    labels = np.abs(labels) % unembed.shape[1]
    stats = fused_token_statistics(hidden, unembed, labels, chunk_size=6)
    z = hidden.astype(np.float64) @ unembed.astype(np.float64)
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(
        stats["nll"], -np.take_along_axis(log_p, labels[..., None], -1)[..., 0], rtol=1e-5
    )
    np.testing.assert_allclose(stats["entropy"], -(np.exp(log_p) * log_p).sum(-1), rtol=1e-5)
