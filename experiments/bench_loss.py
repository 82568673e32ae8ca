"""Benchmark: materialised vs fused LM-head losses, fwd+bwd w.r.t. hidden and unembedding.

Memory: compiled temp bytes from `memory_analysis()` (deterministic; nothing is run).
Time: median wall time of repeated fwd+bwd runs, all variants measured side by side in one run.

  python experiments/bench_loss.py                   # the README's table
  python experiments/bench_loss.py --time-tokens 4096 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mile import losses as L
from mile.fused import fused_loss


def _variants(gamma: float, chunk_size: int | None):
    def optax_ce(h, w, y):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()

    def naive_mile(h, w, y):
        # The straightforward materialised implementation: full logits, softmax, entropy.
        z = h @ w
        log_p = jax.nn.log_softmax(z)
        nll = -jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]
        entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
        weight = jax.lax.stop_gradient((1.0 + entropy) ** gamma)
        return jnp.sum(weight * nll) / jnp.sum(weight)

    def fused(name, **hp):
        return lambda h, w, y: fused_loss(h, w, y, loss=name, chunk_size=chunk_size, **hp)[0]

    return {
        "materialised CE (optax)": optax_ce,
        "materialised MiLe (naive)": naive_mile,
        "mile.losses MiLe (materialised)": lambda h, w, y: L.mile_loss(h @ w, y, gamma=gamma)[0],
        "fused CE": fused("ce"),
        "fused focal": fused("focal", gamma=gamma),
        "fused MiLe": fused("mile", gamma=gamma),
    }


def _fwd_bwd(fn):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def compiled_temp_bytes(fn, n, d, v, dtype):
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    return _fwd_bwd(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def median_seconds(fn, n, d, v, dtype, repeats):
    key = jax.random.PRNGKey(0)
    kh, kw, ky = jax.random.split(key, 3)
    h = jax.random.normal(kh, (n, d), dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) * d**-0.5).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v)
    step = _fwd_bwd(fn)
    jax.block_until_ready(step(h, w, y))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(h, w, y))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-tokens", type=int, default=32768)
    ap.add_argument("--mem-dim", type=int, default=1024)
    ap.add_argument("--time-tokens", type=int, default=2048)
    ap.add_argument("--time-dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are pooled")
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    variants = _variants(args.gamma, args.chunk_size)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, dtype {args.dtype}, gamma {args.gamma}"
    )
    mem = {
        k: compiled_temp_bytes(f, args.mem_tokens, args.mem_dim, args.vocab, dtype)
        for k, f in variants.items()
    }
    # Interleave the variants over several rounds so machine noise hits them alike.
    samples = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, f in variants.items():
            samples[k].append(
                median_seconds(f, args.time_tokens, args.time_dim, args.vocab, dtype, args.repeats)
            )
    secs = {k: float(np.median(v)) for k, v in samples.items()}

    base_mem, base_t = mem["materialised CE (optax)"], secs["materialised CE (optax)"]
    fused_ce_t = secs["fused CE"]
    print(f"\nmemory: N={args.mem_tokens} D={args.mem_dim} V={args.vocab} (compiled temp, fwd+bwd)")
    print(
        f"time:   N={args.time_tokens} D={args.time_dim} V={args.vocab} (median of {args.repeats} runs x {args.rounds} rounds)\n"
    )
    print(
        f"| {'variant':34s} | {'temp memory':>12s} | {'vs mat. CE':>10s} | {'time (ms)':>9s} | {'vs mat. CE':>10s} | {'vs fused CE':>11s} |"
    )
    print(f"|{'-' * 36}|{'-' * 14}|{'-' * 12}|{'-' * 11}|{'-' * 12}|{'-' * 13}|")
    for k in variants:
        print(
            f"| {k:34s} | {mem[k] / 2**20:9.1f} MiB | {mem[k] / base_mem:10.4f} | {secs[k] * 1e3:9.2f} |"
            f" {secs[k] / base_t:10.3f} | {secs[k] / fused_ce_t:11.3f} |"
        )
    print(
        "\ntargets: fused MiLe memory <= 1/40 (0.025) of materialised CE; time <= 1.10x materialised CE; <= 1.03x fused CE"
    )


if __name__ == "__main__":
    main()
