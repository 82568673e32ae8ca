"""bf16 policy of the fused LM head: with bf16 hidden states and unembedding, the logits, softmax,
entropy and weights are float32, while all three GEMMs (logits, dhidden, dunembedding) take bf16
operands and accumulate in float32. Checked in the HLO handed to XLA and in the HLO XLA compiles
for a TPU (libtpu, no TPU needed), where a float32 operand would make the MXU run at fp32 speed.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mile import losses as L
from mile.fused import fused_loss

HPARAMS = {"ce": {}, "focal": {"gamma": 0.7}, "mile": {"gamma": 1.3, "sigma": 0.8}}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[[\d,]*\]\S* (\w[\w\-]*)\(([^)]*)\)", re.M)


def _ops(hlo: str):
    """(opcode, result dtype, operand dtypes) of every array instruction in HLO text."""
    instructions = _INSTRUCTION.findall(hlo)
    dtypes = {name: dtype for name, dtype, _, _ in instructions}
    return [
        (op, dtype, tuple(dtypes.get(a.strip().lstrip("%")) for a in args.split(",") if a.strip()))
        for _, dtype, op, args in instructions
    ]


def _gemms(hlo: str):
    return [(out, operands) for op, out, operands in _ops(hlo) if op in ("dot", "convolution")]


def _fwd_bwd(loss, **kw):
    return jax.jit(
        jax.value_and_grad(lambda h, w, y: fused_loss(h, w, y, loss=loss, **kw)[0], argnums=(0, 1))
    )


def _shapes(n, d, v, dtype, sharding=None):
    return (
        jax.ShapeDtypeStruct((n, d), dtype, sharding=sharding and sharding[0]),
        jax.ShapeDtypeStruct((d, v), dtype, sharding=sharding and sharding[1]),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding and sharding[0]),
    )


@pytest.mark.parametrize("loss", ["ce", "mile"])
def test_gemms_take_bf16_operands_in_the_lowered_hlo(loss):
    hlo = _fwd_bwd(loss, chunk_size=64).lower(*_shapes(256, 64, 512, jnp.bfloat16)).as_text(dialect="hlo")
    gemms = _gemms(hlo)
    assert len(gemms) == 3, gemms  # logits, dhidden, dunembedding: no recomputation
    assert all(out == "f32" and operands == ("bf16", "bf16") for out, operands in gemms), gemms
    # The softmax runs on float32 logits.
    assert {dtype for op, dtype, _ in _ops(hlo) if op == "exponential"} == {"f32"}
    # Control: float32 inputs give float32 GEMMs, so the check sees the operand dtypes.
    hlo32 = _fwd_bwd(loss, chunk_size=64).lower(*_shapes(256, 64, 512, jnp.float32)).as_text(dialect="hlo")
    assert all(operands == ("f32", "f32") for _, operands in _gemms(hlo32))


def _tpu_devices():
    """The 4 chips of a v5p 2x2x1 slice as a compile-only topology, or skip without libtpu."""
    pytest.importorskip("libtpu", reason="libtpu (requirements-dev.txt) compiles for TPU topologies")
    from jax.experimental import topologies

    # Another process (a second test run, a notebook) may hold libtpu's lock file; compiling only
    # for a topology touches no chip, so loading it twice is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices


def test_tpu_compiled_vocab_parallel_head_keeps_bf16_gemms_and_gathers_nothing():
    """Compiled by XLA:TPU for 4 v5p chips (data=2 x tensor=2, vocabulary split over tensor):
    every GEMM still has bf16 operands and a float32 result, every exp is float32, and no
    all-gather has a vocabulary-sized dimension."""
    devices = _tpu_devices()
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
    n, d, v = 1024, 256, 4096
    shardings = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "tensor")))
    step = _fwd_bwd("mile", chunk_size=256, batch_axes=("data",), mesh=mesh, vocab_axis="tensor")
    hlo = step.lower(*_shapes(n, d, v, jnp.bfloat16, shardings)).compile().as_text()
    gemms = _gemms(hlo)
    assert len(gemms) >= 3, gemms
    assert all(out == "f32" and operands == ("bf16", "bf16") for out, operands in gemms), gemms
    assert {dtype for op, dtype, _ in _ops(hlo) if op == "exponential"} == {"f32"}
    gathers = re.findall(r"= \S*?\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    assert not [g for g in gathers if str(v) in g.split(",")], gathers


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
def test_bf16_value_and_gradients_against_float32(loss):
    """bf16 inputs vs the float32 materialised loss of the unrounded inputs. Stated tolerances:
    value within 5e-4 relative, gradients within 2e-2 of their largest entry (measured here:
    value <= 3.2e-5, gradients <= 7.7e-3, from rounding hidden and unembedding to bf16 and the
    per-tile gradient to bf16 before its GEMMs)."""
    rng = np.random.default_rng(7)
    n, d, v = 512, 128, 2000
    hidden = rng.standard_normal((n, d)).astype(np.float32)
    unembed = (rng.standard_normal((d, v)) * 3 / np.sqrt(d)).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    mask = rng.random(n) < 0.9
    spec = L.get_loss(loss, **HPARAMS[loss])

    def fused(h, w):
        return fused_loss(h, w, labels, mask, loss=spec, chunk_size=128)[0]

    def materialised(h, w):
        return L.apply_loss(spec, h @ w, labels, mask)[0]

    v16, (gh16, gw16) = jax.value_and_grad(fused, argnums=(0, 1))(
        jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
    )
    v32, (gh32, gw32) = jax.value_and_grad(materialised, argnums=(0, 1))(hidden, unembed)
    assert gh16.dtype == jnp.bfloat16 and gw16.dtype == jnp.bfloat16
    np.testing.assert_allclose(v16, v32, rtol=5e-4)
    for got, want in ((gh16, gh32), (gw16, gw32)):
        want = np.asarray(want, np.float64)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-2 * np.abs(want).max())
