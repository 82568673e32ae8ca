"""Analytic parameter and FLOP counts against the real model and XLA's own count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper, tiny
from mile import attention, flops
from mile.model import Llama
from model_helpers import tiny_model_config


def _real_param_sizes(model_cfg) -> dict[str, int]:
    """Parameter sizes of the actual Flax model, built abstractly (nothing allocated)."""
    model = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
    sizes = {"total": 0}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = int(np.prod(value.get_value().shape))
        sizes["total"] += size
        sizes[path[0]] = sizes.get(path[0], 0) + size
    return sizes


@pytest.mark.parametrize(
    "cfg", [tiny.get_config(), paper.get_config("468m,mile"), paper.get_config("6.7b,ce")]
)
def test_param_counts_match_the_model(cfg):
    real = _real_param_sizes(cfg.model)
    counts = flops.param_counts(cfg.model)
    assert counts["total"] == real["total"]
    assert counts["embedding"] == real["embedding"] and counts["head"] == real["head"]
    assert counts["non_embedding"] == real["total"] - real["embedding"]


def test_paper_sizes_are_what_the_paper_calls_them():
    for size, billions in (("468m", 0.468), ("1.2b", 1.2), ("6.7b", 6.7)):
        total = flops.param_counts(paper.get_config(f"{size},mile").model)["total"]
        assert abs(total / 1e9 - billions) / billions < 0.06, (size, total)


def _xla_flops_per_token(model_cfg, seq, batch=2) -> float:
    """XLA's FLOP count of one forward + backward of the model with a materialised head, divided
    by the tokens. Layers are unrolled (no scan), so cost_analysis sees every matmul."""
    model = Llama(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, tokens):
        m = nnx.merge(graphdef, params)
        logits = m(tokens).astype(jnp.float32) @ m.head[...]
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    cost = jax.jit(jax.grad(loss)).lower(params, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / (batch * seq)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_flops_per_token_match_xla_count(remat, monkeypatch):
    # The formula counts the whole causal score matrix, the program TPUs and GPUs run; on CPU the
    # XLA attention skips the blocks above the diagonal, so compile that whole-matrix program here.
    monkeypatch.setattr(attention, "CPU_QUERY_BLOCKS", 1)
    # The tests' tiny model made wide enough that matmuls dominate XLA's count (it also counts
    # norms, softmax, RoPE): 2 unrolled layers, 4 heads, no grouped-query attention.
    seq = 128
    model_cfg = tiny_model_config(
        vocab_size=4096,
        embed_dim=512,
        num_kv_heads=4,
        head_dim=128,
        mlp_dim=1536,
        max_seq_len=seq,
        remat=remat,
    )
    expected = flops.hardware_flops_per_token(model_cfg, seq)
    measured = _xla_flops_per_token(model_cfg, seq)
    assert measured == pytest.approx(expected, rel=0.01)
    if remat == "full":  # the recompute (~20% here) is counted by the hardware figure only
        assert measured > 1.15 * flops.model_flops_per_token(model_cfg, seq)
    else:  # the CPU program's 8 query blocks do 9/16 of the score work
        monkeypatch.setattr(attention, "CPU_QUERY_BLOCKS", 8)
        monkeypatch.setattr(attention, "CPU_MIN_BLOCK_ROWS", 16)
        skipped = 7 / 16 * flops.attention_flops_per_token(model_cfg, seq)
        assert _xla_flops_per_token(model_cfg, seq) == pytest.approx(expected - skipped, rel=0.01)


def test_chip_table_lookup_by_device_kind():
    assert flops.chip_for_device_kind("TPU v5 lite") is flops.CHIPS["v5e"]
    assert flops.chip_for_device_kind("TPU v5") is flops.CHIPS["v5p"]
    assert flops.chip_for_device_kind("TPU v6 lite") is flops.CHIPS["v6e"]
    assert flops.chip_for_device_kind("NVIDIA H100 80GB HBM3") is flops.CHIPS["h100"]
    assert flops.chip_for_device_kind("NVIDIA A100-SXM4-40GB") is flops.CHIPS["a100"]
    assert flops.chip_for_device_kind("cpu") is None
