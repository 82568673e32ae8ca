"""Per-chip memory of the paper's train step with XLA vs splash attention, compiled for a TPU slice.

Nothing runs and no TPU is needed: libtpu compiles the real train step (model, fused MiLe loss,
AdamW) for a TPU topology, and `memory_analysis()` of the compiled step gives the bytes per chip.

  python experiments/attention_memory.py                          # 6.7B, seq 2048, v5p 2x2x1
  python experiments/attention_memory.py --size 468m --seq 1024 --topology v5p:2x2x1
  python experiments/attention_memory.py --attention-only     # one layer's attention alone (fast)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; the TPU is only a target
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is claimed

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from configs import paper
from mile import sharding as msharding
from mile import state as mstate
from mile import step as mstep
from mile import train as T
from mile.model import Llama


def compiled_memory(size: str, attention: str, seq: int, batch_per_chip: int, devices, mesh_shape):
    cfg = paper.get_config(f"{size},mile")
    cfg.model.attention = attention
    cfg.data.seq_len = seq
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq)
    cfg.data.global_batch_size = batch_per_chip * len(devices)
    cfg.mesh.update(mesh_shape)
    mesh = msharding.make_mesh(cfg.mesh, devices=devices)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    spec = T.check_config(cfg, mesh)
    tx = mstate.make_optimizer(cfg.optim, cfg.train.steps)

    def build():
        model = Llama(cfg.model, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, state = msharding.abstract_sharded(build, mesh, rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = msharding.batch_sharding(mesh)
    shape = (cfg.data.global_batch_size, seq)
    batch = {
        "inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
        "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
        "mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding),
    }
    step = jax.jit(
        mstep.make_train_step(
            graphdef,
            spec,
            mesh=mesh,
            chunk_size=None,
            num_microbatches=cfg.optim.num_microbatches,
            schedule=mstate.learning_rate_schedule(cfg.optim, cfg.train.steps),
            vocab_axis=msharding.vocab_parallel_axis(mesh, rules, cfg.model.embed_dim, cfg.model.vocab_size),
        ),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    return compiled.memory_analysis(), seconds, hlo.count("tpu_custom_call")


def attention_only_memory(size: str, attention: str, seq: int, batch_per_chip: int, device):
    """Temp bytes of one layer's attention (q, k, v -> out, fwd+bwd, bf16) on one chip."""
    from mile.attention import causal_attention

    m = paper.get_config(f"{size},mile").model
    q = jax.ShapeDtypeStruct((batch_per_chip, seq, m.num_heads, m.head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch_per_chip, seq, m.num_kv_heads, m.head_dim), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, attention).astype(jnp.float32))

    mesh = jax.sharding.Mesh([device], ("data",))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="6.7b", choices=["468m", "1.2b", "6.7b"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch-per-chip", type=int, default=1, help="sequences per chip per micro-batch")
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--fsdp", type=int, default=-1)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--attention-only", action="store_true", help="skip the (slow) whole-step compiles")
    args = ap.parse_args()

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh_shape = {"data": 1, "fsdp": args.fsdp, "tensor": args.tensor}
    print(
        f"jax {jax.__version__}; {args.size}, seq {args.seq}, {args.batch_per_chip} sequence(s) per chip, "
        f"{args.topology} ({len(devices)} x {devices[0].device_kind}), mesh {mesh_shape}, bf16, full remat"
    )
    gib = 2.0**30
    print("\n| attention | one layer's attention alone, fwd+bwd: temp (GiB/chip) |\n|---|---|")
    for attention in ("xla", "splash"):
        temp = attention_only_memory(args.size, attention, args.seq, args.batch_per_chip, devices[0])
        print(f"| {attention} | {temp / gib:.3f} |")
    if args.attention_only:
        return
    rows = {}
    for attention in ("xla", "splash"):
        mem, seconds, kernels = compiled_memory(
            args.size, attention, args.seq, args.batch_per_chip, devices, mesh_shape
        )
        rows[attention] = (mem, seconds, kernels)
    print(
        "\n| attention | temp (GiB/chip) | arguments (GiB/chip) | outputs (GiB/chip) | peak est. (GiB/chip) | Pallas calls | compile (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for attention, (mem, seconds, kernels) in rows.items():
        peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        peak -= mem.alias_size_in_bytes
        print(
            f"| {attention} | {mem.temp_size_in_bytes / gib:.2f} | {mem.argument_size_in_bytes / gib:.2f} | "
            f"{mem.output_size_in_bytes / gib:.2f} | {peak / gib:.2f} | {kernels} | {seconds:.0f} |"
        )
    print("\npeak est. = temp + arguments + outputs - aliased (donated state is updated in place)")


if __name__ == "__main__":
    main()
