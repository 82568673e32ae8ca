"""The first accelerator numbers: the fused loss, the 468M train step and the reference stack.

    bash experiments/device_check.sh            # on a machine with one NVIDIA GPU (installs first)
    python experiments/device_check.py --tiny   # every size shrunk: runs end to end on a CPU

Prints three tables, each measured side by side in this one process:
  1. loss: fused MiLe vs materialised CE at N=32768, D=4096, V=32000 in bf16, fwd+bwd w.r.t.
     hidden and unembedding: median time and peak memory (compiled arguments + outputs + temp;
     the device's own peak where it reports one);
  2. train step: the paper's 468M model at the largest batch that fits the device (found from
     compiled memory: two compiles fit memory = fixed + per-sequence x batch, a third confirms),
     with model.attention = xla and cudnn: tokens/s, MFU from mile.flops, peak memory;
  3. the reference stack (HF Llama, sdpa, bf16 autocast, the reference MiLe loss, torch AdamW)
     at the same batch (in micro-batches if the full batch does not fit), and the ratio.
Every phase keeps to a time budget; a phase that cannot run says why on its row.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_loss  # noqa: E402
import bench_step  # noqa: E402
from mile import flops  # noqa: E402

FULL = {"loss": (32768, 4096, 32000), "config": "468m,mile", "max_batch": 512, "steps": 5}
TINY = {"loss": (1024, 64, 1024), "config": None, "max_batch": 4, "steps": 2}


def _median_s(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _compiled_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def _gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.2f}"


def loss_table(n, d, v, repeats: int) -> None:
    variants = bench_loss._variants(gamma=1.0, chunk_size=None)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((n, d)) * 0.1, jnp.bfloat16)
    unembed = jnp.asarray(rng.standard_normal((d, v)) * 0.02, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    print(f"\n1. loss, fwd+bwd: N={n} D={d} V={v}, bf16 inputs (median of {repeats})\n")
    print("| variant | time (ms) | vs materialised CE | compiled memory GiB | device peak GiB (cumulative) |")
    print("|---|---|---|---|---|")
    rows = {}
    for name in ("fused MiLe", "materialised CE (optax)"):  # smaller first: the device peak only grows
        fn = jax.jit(jax.grad(variants[name], argnums=(0, 1)))
        compiled = fn.lower(hidden, unembed, labels).compile()
        rows[name] = (_median_s(fn, hidden, unembed, labels, repeats=repeats), _compiled_bytes(compiled))
        rows[name] += (_peak_device_bytes(),)
    base = rows["materialised CE (optax)"][0]
    for name, (secs, compiled, peak) in rows.items():
        print(f"| {name} | {secs * 1e3:.2f} | {secs / base:.2f}x | {_gib(compiled)} | {_gib(peak)} |")


def _config(args, attention: str, batch: int):
    if args.tiny:
        from configs import tiny

        cfg = tiny.get_config()
        cfg.model.dtype = "bfloat16"  # as the paper's models, so cudnn is refused only for the device
    else:
        from configs import paper

        cfg = paper.get_config(FULL["config"])
    cfg.model.attention = attention
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    cfg.data.global_batch_size = batch
    cfg.optim.num_microbatches = 1
    return cfg


@functools.lru_cache(maxsize=None)
def _batch_bytes(tiny: bool, attention: str, batch: int) -> int:
    return _step_bytes(_config(argparse.Namespace(tiny=tiny), attention, batch))


def _step_bytes(cfg) -> int:
    """Compiled memory of the train step at cfg's batch, never allocated."""
    from mile import aot
    from mile import sharding as msharding
    from mile import state as mstate
    from mile import step as mstep
    from mile import train

    mesh = msharding.make_mesh(cfg.mesh)
    spec = train.check_config(cfg, mesh)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    graphdef, abstract = msharding.abstract_sharded(mstate.state_builder(cfg), mesh, rules)
    step = mstep.jit_train_step(cfg, graphdef, spec, mesh, jax.tree.map(lambda x: x.sharding, abstract))
    batch = aot._abstract_batch(mesh, cfg.data.global_batch_size, cfg.data.seq_len)
    with jax.set_mesh(mesh):
        return _compiled_bytes(step.lower(abstract, batch).compile())


def largest_batch(args, attention: str, limit_bytes: float) -> tuple[int, int]:
    """(sequences, compiled bytes): the largest power of two <= max_batch that fits `limit_bytes`."""
    small, large = 2, 4
    a, b = _batch_bytes(args.tiny, attention, small), _batch_bytes(args.tiny, attention, large)
    per_sequence = max((b - a) / (large - small), 1.0)
    fixed = a - per_sequence * small
    guess = int(2 ** np.floor(np.log2(max((limit_bytes - fixed) / per_sequence, 1))))
    batch = min(max(guess, 1), TINY["max_batch"] if args.tiny else FULL["max_batch"])
    while batch > 1:
        used = _batch_bytes(args.tiny, attention, batch)
        if used <= limit_bytes:
            return batch, used
        batch //= 2
    return 1, _batch_bytes(args.tiny, attention, 1)


def _device_limit_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.9 * stats["bytes_limit"]  # leave room for the runtime and fragmentation
    return 2 * 2**30  # CPU: a budget, not a device


def step_table(args, steps: int) -> int | None:
    """The mile step per attention kernel; returns the batch used (for the reference stack)."""
    kind = jax.devices()[0].device_kind
    chip = flops.chip_for_device_kind(kind)
    print(f"\n2. train step on one {kind}: {'tiny model' if args.tiny else 'paper 468M'}, MiLe, fused head\n")
    print("| attention | batch (seq x len) | tokens/s | MFU | compiled memory GiB | device peak GiB |")
    print("|---|---|---|---|---|---|")
    limit = _device_limit_bytes()
    batch_used = None
    for attention in ("xla", "cudnn"):
        try:
            batch, used = largest_batch(args, attention, limit)
            cfg = _config(args, attention, batch)
            times = bench_step.time_mile(cfg, "mile", warmup=2, steps=steps)
        except ValueError as e:  # e.g. cudnn without an NVIDIA GPU
            print(f"| {attention} | skipped: {str(e).splitlines()[0]} | | | | |")
            continue
        tokens = batch * cfg.data.seq_len
        rate = tokens / float(np.median(times))
        per_token = flops.model_flops_per_token(cfg.model, cfg.data.seq_len)
        mfu = f"{rate * per_token / chip.peak_bf16_flops:.1%}" if chip else "– (no peak for this device)"
        print(
            f"| {attention} | {batch} x {cfg.data.seq_len} | {rate:,.0f} | {mfu} | {_gib(used)} | "
            f"{_gib(_peak_device_bytes())} |"
        )
        batch_used = batch_used or batch
        args.rates[attention] = rate
    return batch_used


def torch_table(args, batch: int, steps: int) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = _config(args, "xla", batch)
    precision = "bf16 autocast" if device == "cuda" else "float32"
    print(f"\n3. reference stack on {device}: HF Llama (sdpa), {precision}, reference MiLe, torch AdamW\n")
    print("| batch (seq x len) | micro-batches | tokens/s | device peak GiB | mile xla / reference | mile cudnn / reference |")
    print("|---|---|---|---|---|---|")
    micro = 1
    while micro <= batch:
        try:
            times = bench_step.time_torch(cfg, "mile", warmup=2, steps=steps, device=device, microbatches=micro)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            micro *= 2
    else:
        print(f"| {batch} x {cfg.data.seq_len} | out of memory even one sequence at a time | | | | |")
        return
    rate = batch * cfg.data.seq_len / float(np.median(times))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    ratios = [f"{args.rates[a] / rate:.2f}x" if a in args.rates else "–" for a in ("xla", "cudnn")]
    print(f"| {batch} x {cfg.data.seq_len} | {micro} | {rate:,.0f} | {_gib(peak)} | {ratios[0]} | {ratios[1]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="shrink every size (runs on a CPU in seconds)")
    args = p.parse_args()
    args.rates = {}
    sizes = TINY if args.tiny else FULL
    start = time.perf_counter()
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    loss_table(*sizes["loss"], repeats=2 if args.tiny else 20)
    batch = step_table(args, sizes["steps"])
    if batch is not None:
        torch_table(args, batch, sizes["steps"])
    print(f"\ndevice check done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
