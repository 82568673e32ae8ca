"""loss.head: the materialised LM head (full logits, as the reference code) trains exactly like the
fused one; it exists so mile.aot can show what fusion saves."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mile import sharding as msharding
from mile import state as mstate
from mile import step as mstep
from mile import train as T
from train_helpers import tiny_config


def _one_step(cfg, mesh, batch):
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    graphdef, state, _ = mstate.build_state(cfg, mesh, rules)
    spec = T.check_config(cfg, mesh)
    step = mstep.jit_train_step(cfg, graphdef, spec, mesh, jax.tree.map(lambda x: x.sharding, state))
    with jax.set_mesh(mesh):
        state, metrics = step(state, T.global_batch(batch, msharding.batch_sharding(mesh)))
    model, _ = nnx.merge(graphdef, state)
    return jax.device_get(metrics), jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_materialised_head_gives_the_fused_step(tmp_path):
    mesh = msharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    rng = np.random.default_rng(0)
    out = {}
    for head in ("fused", "materialised"):
        cfg = tiny_config(tmp_path, **{"loss.head": head, "optim.num_microbatches": 2})
        if not out:
            tokens = rng.integers(0, cfg.model.vocab_size, (cfg.data.global_batch_size, cfg.data.seq_len + 1))
            batch = {
                "inputs": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "mask": (rng.random(tokens[:, 1:].shape) < 0.9).astype(np.float32),
            }
        out[head] = _one_step(cfg, mesh, batch)
    (mf, pf), (mm, pm) = out["fused"], out["materialised"]
    for key in ("loss", "ce", "entropy", "weight_mean", "grad_norm"):
        np.testing.assert_allclose(mm[key], mf[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), pm, pf)


def test_unknown_head_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, **{"loss.head": "sparse"})
    with pytest.raises(ValueError, match="loss.head='sparse'; use one of fused, materialised"):
        T.check_config(cfg, msharding.make_mesh(cfg.mesh))
