"""Benchmark: mile's real train step against the reference PyTorch stack, side by side.

The reference stack is what the paper's code runs: Hugging Face `LlamaForCausalLM` (eager, sdpa
attention) with materialised logits, the reference MiLe loss (softmax, clamped entropy,
`(sigma + H)^gamma` weights normalised by their mean) or plain CE, and `torch.optim.AdamW` with
global-norm clipping. mile runs `mile.step.jit_train_step` (fused LM head, exact normaliser,
non-finite skip, jitted with donation), the function the training loop runs.

Each (stack, loss) is measured in its own process, so neither stack's threads or caches disturb
the other, and the variants are interleaved over rounds so drift in the machine's load hits all
of them alike. Every process runs warm-up steps, then times `--steps` steps one by one and
reports the median.

  python experiments/bench_step.py                   # the README's table (configs/cpu.py shape)
  python experiments/bench_step.py --rounds 3 --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = (("mile", "mile"), ("mile", "ce"), ("torch", "mile"), ("torch", "ce"))
LABELS = {
    ("mile", "mile"): "mile, MiLe (fused head)",
    ("mile", "ce"): "mile, CE (fused head)",
    ("torch", "mile"): "reference stack, MiLe",
    ("torch", "ce"): "reference stack, CE",
}


# Wall time by default; MILE_BENCH_CLOCK=process gives CPU time of all threads (a work measure
# that survives a loaded machine, for comparing variants of one stack while exploring).
_clock = time.process_time if os.environ.get("MILE_BENCH_CLOCK") == "process" else time.perf_counter


def _shape_config(overrides: list[str]):
    """configs/cpu.py with --set overrides (model.num_layers=2 ...): the shape both stacks use."""
    from configs import cpu

    cfg = cpu.get_config()
    for item in overrides:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        old = cfg[section][field]
        cfg[section][field] = type(old)(value)
    return cfg


def _random_batch(cfg, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s, v = cfg.data.global_batch_size, cfg.data.seq_len, cfg.data.vocab_size
    tokens = rng.integers(0, v, size=(b, s + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def mile_step(cfg, loss: str):
    """(jitted train step, state, batch): the loop's own step on a random token batch."""
    import jax
    import numpy as np

    from mile import sharding as msharding
    from mile import state as mstate
    from mile import step as mstep
    from mile import train

    cfg.loss.name = loss
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    mesh = msharding.make_mesh(cfg.mesh)
    spec = train.check_config(cfg, mesh)
    graphdef, state, _ = mstate.build_state(cfg, mesh, rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = mstep.jit_train_step(cfg, graphdef, spec, mesh, state_shardings)  # what the loop runs
    inputs, targets = _random_batch(cfg)
    batch = train.global_batch(
        {"inputs": inputs, "targets": targets, "mask": np.ones_like(inputs, dtype=bool)},
        msharding.batch_sharding(mesh),
    )
    return step_fn, state, batch


def time_mile(cfg, loss: str, warmup: int, steps: int) -> list[float]:
    import jax

    step_fn, state, batch = mile_step(cfg, loss)
    times = []
    for i in range(warmup + steps):
        t0 = _clock()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(_clock() - t0)
    return times


def reference_mile_loss(logits, labels, gamma: float, sigma: float):
    """The reference code's MiLe: clamped-probability entropy, weights over the mean weight."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    entropy = -(probs * torch.log(probs.clamp(1e-8, 1.0))).sum(-1)
    weight = ((sigma + entropy) ** gamma).detach()
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    alpha = 1.0 / weight.mean()
    return (alpha * weight.reshape(-1) * nll).mean()


def time_torch(cfg, loss: str, warmup: int, steps: int, device: str = "cpu", microbatches: int = 1) -> list[float]:
    """Seconds per step of the reference stack. On "cuda" the forward runs under bf16 autocast (the
    reference trains in bf16); `microbatches` > 1 accumulates gradients over that many slices of
    the batch, each with its own MiLe normaliser, as the reference code's accumulation does."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.embed_dim,
            intermediate_size=m.mlp_dim,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            max_position_embeddings=m.max_seq_len,
            rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_base,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )
    model.to(device).train()
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    inputs, targets = (torch.from_numpy(a).long().to(device) for a in _random_batch(cfg))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            with autocast:
                logits = model(input_ids=x).logits
            if loss == "mile":
                value = reference_mile_loss(logits, y, cfg.loss.gamma, cfg.loss.sigma)
            else:
                value = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            (value / microbatches).backward()
            total += value.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        return total

    times = []
    for i in range(warmup + steps):
        t0 = _clock()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(_clock() - t0)
    return times


GEMM_FORMS = ("X W", "dY W^T", "X^T dY")  # forward, input gradient, weight gradient


def gemm_shapes(cfg) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of the step's big matmuls: attention projections, MLP in/out, LM head."""
    m, d = cfg.model, cfg.data
    tokens = d.global_batch_size * d.seq_len
    return [
        (tokens, m.embed_dim, m.mlp_dim),
        (tokens, m.mlp_dim, m.embed_dim),
        (tokens, m.embed_dim, m.num_heads * m.head_dim),
        (tokens, m.embed_dim, m.vocab_size),
    ]


def _gemm_operands(form: str, t: int, k: int, n: int):
    """Stored operand shapes of one form of the step's matmul X [t, k] @ W [k, n], and the
    contraction, written with transposed views as autodiff writes them (no copy asked for)."""
    return {
        "X W": ((t, k), (k, n), lambda a, b: a @ b),
        "dY W^T": ((t, n), (k, n), lambda a, b: a @ b.T),
        "X^T dY": ((t, k), (t, n), lambda a, b: a.T @ b),
    }[form]


def time_gemms(cfg, stack: str, repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of each GEMM of the step, in each form, in one stack (float32, median of repeats)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for t, k, n in gemm_shapes(cfg):
        for form in GEMM_FORMS:
            a_shape, b_shape, contract = _gemm_operands(form, t, k, n)
            a = rng.standard_normal(a_shape, dtype=np.float32)
            b = rng.standard_normal(b_shape, dtype=np.float32)
            if stack == "torch":
                import torch

                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                run = lambda: contract(ta, tb)  # noqa: E731
            else:
                import jax
                import jax.numpy as jnp

                f = jax.jit(contract)
                ja, jb = jnp.asarray(a), jnp.asarray(b)
                run = lambda: jax.block_until_ready(f(ja, jb))  # noqa: E731
            run()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            out[f"{t}x{k}x{n} {form}"] = 2 * t * k * n / sorted(times)[repeats // 2] / 1e9
    return out


def worker(args) -> None:
    if args.gemms:
        if args.stack == "torch":
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(time_gemms(_shape_config(args.set), args.stack)))
        return
    if args.stack == "torch":
        import torch

        torch.set_num_threads(args.threads)
        fn = time_torch
    else:
        fn = time_mile
    cfg = _shape_config(args.set)
    times = fn(cfg, args.loss, args.warmup, args.steps)
    times.sort()
    median = times[len(times) // 2]
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    print(json.dumps({"median_s": median, "tokens": tokens}))


def _run_worker(stack: str, loss: str, args, gemms: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--loss", loss]
    cmd += ["--gemms"] if gemms else []
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    for item in args.set:
        cmd += ["--set", item]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a single-process CPU run has
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{stack}/{loss} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.num_layers=2")
    p.add_argument("--worker", choices=("mile", "torch"), dest="stack", default=None, help=argparse.SUPPRESS)
    p.add_argument("--loss", choices=("mile", "ce"), default="mile", help=argparse.SUPPRESS)
    p.add_argument("--gemms", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-gemm-table", action="store_true", help="skip the GEMM table")
    args = p.parse_args()
    if args.stack:
        worker(args)
        return

    cfg = _shape_config(args.set)
    m, d = cfg.model, cfg.data
    print(
        f"shape: {m.num_layers} layers, d={m.embed_dim}, vocab {m.vocab_size}, "
        f"{d.global_batch_size} x {d.seq_len} tokens; {args.rounds} rounds x {args.steps} timed steps"
    )
    rates: dict[tuple[str, str], list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            res = _run_worker(*variant, args)
            rate = res["tokens"] / res["median_s"]
            rates[variant].append(rate)
            print(f"  round {r + 1}: {LABELS[variant]:<26} {rate / 1e3:7.2f}k tokens/s", flush=True)

    def med(xs):
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])

    ref_mile, ref_ce = med(rates[("torch", "mile")]), med(rates[("torch", "ce")])
    print()
    print("| step | tokens/s (median over rounds) | range | vs reference MiLe | vs reference CE |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        rs = rates[variant]
        print(
            f"| {LABELS[variant]} | {med(rs) / 1e3:.2f}k | {min(rs) / 1e3:.2f}-{max(rs) / 1e3:.2f}k "
            f"| {med(rs) / ref_mile:.2f}x | {med(rs) / ref_ce:.2f}x |"
        )
    if not args.no_gemm_table:
        gemm_table(args)


def gemm_table(args) -> None:
    """The step's GEMMs alone, XLA:CPU (jnp.dot under jit) against torch, each in its own process,
    interleaved over the rounds: whether matmuls explain a gap between the stacks."""
    samples = {"mile": [], "torch": []}
    for _ in range(args.rounds):
        for stack in samples:
            samples[stack].append(_run_worker(stack, "mile", args, gemms=True))
    keys = list(samples["mile"][0])
    print(f"\nGEMMs of the step alone, float32 GFLOP/s (median of 10 runs, best of {args.rounds} rounds; torch {args.threads} threads)\n")
    print("| [tokens x in x out] form | XLA | torch | XLA / torch |")
    print("|---|---|---|---|")
    for key in keys:
        x, t = (max(r[key] for r in samples[s]) for s in ("mile", "torch"))
        print(f"| {key} | {x:.0f} | {t:.0f} | {x / t:.2f} |")


if __name__ == "__main__":
    main()
