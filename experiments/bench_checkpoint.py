"""Benchmark: what the checkpoint checksums (mile.integrity) add to save and restore time.

Compares, on the same state and directory type, a plain orbax save/restore of the checkpoint items
with mile's Checkpointer, which also computes the checksums at save and verifies them at restore.
Saves are synchronous here so the whole cost is timed (the trainer saves asynchronously; the
checksum pass is on its critical path either way, the file writes are not).

  python experiments/bench_checkpoint.py                 # the CPU default model + AdamW state
  python experiments/bench_checkpoint.py --extra-mib 256 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from configs import cpu
from mile import integrity
from mile import sharding as msharding
from mile import state as mstate
from mile.checkpoint import Checkpointer

DATA_STATE = {"processes": [{"position": 123, "epoch": 0}]}


def _cpu_state():
    cfg = cpu.get_config()
    mesh = msharding.make_mesh(cfg.mesh)
    _, state, build = mstate.build_state(cfg, mesh, tuple(tuple(r) for r in cfg.sharding_rules))
    _, abstract = msharding.abstract_sharded(build, mesh, tuple(tuple(r) for r in cfg.sharding_rules))
    return state, abstract, cfg.to_dict()


def _synthetic_state(mib: int):
    rng = np.random.default_rng(0)
    n = mib * 2**20 // 4 // 16
    state = {f"w{i}": jnp.asarray(rng.standard_normal(n, dtype=np.float32)) for i in range(16)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return state, abstract, {"synthetic": mib}


def _median(fn, repeats):
    """Median time of fn(1), ..., fn(repeats) (orbax only saves steps above the latest one)."""
    times = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench(state, abstract, config, repeats, root):
    plain_dir, mile_dir = os.path.join(root, "plain"), os.path.join(root, "mile")
    opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
    plain = ocp.CheckpointManager(plain_dir, options=opts, item_names=("state", "data_state", "config"))
    ours = Checkpointer(mile_dir, max_to_keep=None, async_save=False)

    def plain_save(i):
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_state=ocp.args.JsonSave(DATA_STATE),
            config=ocp.args.JsonSave(config),
        )
        plain.save(i, args=args)
        plain.wait_until_finished()

    def mile_save(i):
        ours.save(i, state, data_state=DATA_STATE, config=config)
        ours.wait()

    def plain_restore(i):
        out = plain.restore(
            i,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data_state=ocp.args.JsonRestore()
            ),
        )
        jax.block_until_ready(out["state"])

    def mile_restore(i):
        jax.block_until_ready(ours.restore(i, abstract)[0])

    integrity.tree_checksums(state)  # compile once, outside the timings
    for warm_up in (plain_save, mile_save, plain_restore, mile_restore):
        warm_up(0)
    row = {
        "checksum": _median(lambda i: integrity.tree_checksums(state), repeats),
        "save plain": _median(plain_save, repeats),
        "save mile": _median(mile_save, repeats),
        "restore plain": _median(plain_restore, repeats),
        "restore mile": _median(mile_restore, repeats),
    }
    plain.close()
    ours.close()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-mib", type=int, default=0, help="also a synthetic state of this size")
    args = ap.parse_args()
    cases = [("CPU default model + AdamW", _cpu_state())]
    if args.extra_mib:
        cases.append((f"synthetic {args.extra_mib} MiB", _synthetic_state(args.extra_mib)))
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); median of {args.repeats}; seconds")
    print(
        "| state                      |    MiB | checksum | save plain | save mile | overhead "
        "| restore plain | restore mile | overhead |"
    )
    print("|" + "|".join("-" * w for w in (28, 8, 10, 12, 11, 10, 15, 14, 10)) + "|")
    for name, (state, abstract, config) in cases:
        mib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2**20
        root = tempfile.mkdtemp(prefix="bench_checkpoint_")
        try:
            r = bench(state, abstract, config, args.repeats, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        save_over = r["save mile"] / r["save plain"] - 1
        restore_over = r["restore mile"] / r["restore plain"] - 1
        print(
            f"| {name:<26} | {mib:6.1f} | {r['checksum']:8.3f} | {r['save plain']:10.3f} | "
            f"{r['save mile']:9.3f} | {save_over:+7.1%} | {r['restore plain']:13.3f} | "
            f"{r['restore mile']:12.3f} | {restore_over:+7.1%} |"
        )


if __name__ == "__main__":
    main()
