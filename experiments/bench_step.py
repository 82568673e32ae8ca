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

# "mile" runs with the XLA:CPU flags launch.py sets (mile/xla_cpu_flags.py), "mile-jax-flags"
# with jax's own defaults, so the flags' effect is measured side by side in every run.
VARIANTS = (("mile", "mile"), ("mile", "ce"), ("mile-jax-flags", "mile"), ("torch", "mile"), ("torch", "ce"))
LABELS = {
    ("mile", "mile"): "mile, MiLe (fused head)",
    ("mile", "ce"): "mile, CE (fused head)",
    ("mile-jax-flags", "mile"): "mile, MiLe, jax's default XLA:CPU flags",
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


def _mile_setup(cfg, loss: str) -> dict:
    """The pieces of mile's step on a random token batch: graphdef, state, spec, mesh, batch and
    the jitted train step the loop runs."""
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
    return {"graphdef": graphdef, "state": state, "spec": spec, "mesh": mesh, "batch": batch, "step": step_fn}


def mile_step(cfg, loss: str):
    """(jitted train step, state, batch): the loop's own step on a random token batch."""
    s = _mile_setup(cfg, loss)
    return s["step"], s["state"], s["batch"]


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


def _torch_stack(cfg, loss: str, device: str = "cpu", microbatches: int = 1) -> dict:
    """The reference stack's model, optimiser, batch, loss and step. On "cuda" the forward runs
    under bf16 autocast (the reference trains in bf16); `microbatches` > 1 accumulates gradients
    over that many slices of the batch, each with its own MiLe normaliser, as the reference code's
    accumulation does."""
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

    def loss_of(logits, y):
        if loss == "mile":
            return reference_mile_loss(logits, y, cfg.loss.gamma, cfg.loss.sigma)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def forward_backward():
        total = 0.0
        for x, y in zip(inputs.chunk(microbatches), targets.chunk(microbatches)):
            with autocast:
                logits = model(input_ids=x).logits
            value = loss_of(logits, y)
            (value / microbatches).backward()
            total += value.item()
        return total

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()

    def step():
        opt.zero_grad(set_to_none=True)
        total = forward_backward()
        update()
        return total

    return {
        "model": model,
        "inputs": inputs,
        "targets": targets,
        "loss_of": loss_of,
        "forward_backward": forward_backward,
        "update": update,
        "step": step,
        "zero_grad": lambda: opt.zero_grad(set_to_none=True),
    }


def time_torch(
    cfg, loss: str, warmup: int, steps: int, device: str = "cpu", microbatches: int = 1
) -> list[float]:
    """Seconds per step of the reference stack (see `_torch_stack`)."""
    import torch

    step = _torch_stack(cfg, loss, device, microbatches)["step"]
    times = []
    for i in range(warmup + steps):
        t0 = _clock()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(_clock() - t0)
    return times


# The parts of a step, timed alone in each stack (same inputs, same shapes): what the step's time
# is made of, so a gap between the stacks is attributed by measurement rather than by profile shares.
PARTS = (
    "whole step",
    "forward + backward",
    "forward only",
    "LM head + loss, forward + backward",
    "optimiser update",
)


def _median_time(run, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        t0 = _clock()
        run()
        if i >= warmup:
            times.append(_clock() - t0)
    return sorted(times)[len(times) // 2]


def mile_parts(cfg, loss: str, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds of each part of mile's step, each jitted on its own."""
    import functools

    import jax
    from flax import nnx

    from mile import sharding as msharding
    from mile import step as mstep
    from mile.fused import fused_loss_terms
    from mile.state import learning_rate_schedule

    s = _mile_setup(cfg, loss)
    graphdef, spec, mesh, batch = s["graphdef"], s["spec"], s["mesh"], s["batch"]
    chunk = cfg.loss.chunk_size or None
    terms_of = functools.partial(mstep.batch_loss_terms, spec=spec, mesh=mesh, chunk_size=chunk)

    @jax.jit
    def forward(state, batch):
        return terms_of(nnx.merge(graphdef, state)[0], batch)["numerator"]

    @jax.jit
    def forward_backward(state, batch):
        grad_fn, params = mstep.numerator_grad_fn(nnx.merge(graphdef, state)[0], terms_of)
        (_, terms), grads = grad_fn(params, batch)
        return grads, terms

    @jax.jit
    def head_and_loss(hidden, unembedding):
        def numerator(h, w):
            return fused_loss_terms(
                spec,
                h,
                w,
                batch["targets"],
                batch["mask"],
                chunk_size=chunk,
                batch_axes=msharding.BATCH_AXES,
                mesh=mesh,
            )["numerator"]

        return jax.value_and_grad(numerator, argnums=(0, 1))(hidden, unembedding)

    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def update(state, grads, terms):
        model, optimizer = nnx.merge(graphdef, state)
        return mstep.apply_gradients(model, optimizer, grads, terms, schedule)

    state = s["state"]
    grads, terms = forward_backward(state, batch)
    model = nnx.merge(graphdef, state)[0]
    b, t, d = *batch["inputs"].shape, cfg.model.embed_dim
    hidden = jax.random.normal(jax.random.key(0), (b, t, d), model.unembedding().dtype)
    unembedding = model.unembedding().copy()  # its own buffer: the step donates the state
    holder = {"state": state}

    def run_update():
        holder["state"], _ = update(holder["state"], grads, terms)
        jax.block_until_ready(holder["state"])

    def run_step():
        holder["state"], metrics = s["step"](holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    del model, state
    return {
        "whole step": _median_time(run_step, warmup, steps),
        "forward + backward": _median_time(
            lambda: jax.block_until_ready(forward_backward(holder["state"], batch)), warmup, steps
        ),
        "forward only": _median_time(
            lambda: jax.block_until_ready(forward(holder["state"], batch)), warmup, steps
        ),
        "LM head + loss, forward + backward": _median_time(
            lambda: jax.block_until_ready(head_and_loss(hidden, unembedding)), warmup, steps
        ),
        "optimiser update": _median_time(run_update, warmup, steps),
    }


def torch_parts(cfg, loss: str, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds of each part of the reference stack's step on CPU."""
    import torch

    t = _torch_stack(cfg, loss)
    model, inputs, targets = t["model"], t["inputs"], t["targets"]

    def forward_backward():
        t["zero_grad"]()
        t["forward_backward"]()

    def forward():
        with torch.no_grad():
            t["loss_of"](model(input_ids=inputs).logits, targets).item()

    torch.manual_seed(1)
    hidden = torch.randn(*inputs.shape, cfg.model.embed_dim, requires_grad=True)
    weight = model.lm_head.weight.detach().clone().requires_grad_(True)

    def head_and_loss():
        hidden.grad = weight.grad = None
        t["loss_of"](torch.nn.functional.linear(hidden, weight), targets).backward()

    forward_backward()  # the update needs gradients to apply
    return {
        "whole step": _median_time(t["step"], warmup, steps),
        "forward + backward": _median_time(forward_backward, warmup, steps),
        "forward only": _median_time(forward, warmup, steps),
        "LM head + loss, forward + backward": _median_time(head_and_loss, warmup, steps),
        "optimiser update": _median_time(t["update"], warmup, steps),
    }


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


def attention_gemms(cfg) -> dict[str, tuple]:
    """The attention's batched matmuls ([batch x heads] small products): name -> (a shape, b
    shape, contraction, FLOPs)."""
    m, d = cfg.model, cfg.data
    n, s, hd = d.global_batch_size * m.num_heads, d.seq_len, m.head_dim
    flops = 2 * n * s * s * hd
    return {
        f"{n}x [{s}x{hd}] @ [{hd}x{s}] attention Q K^T": (
            (n, s, hd),
            (n, s, hd),
            lambda a, b: a @ b.swapaxes(-1, -2),
            flops,
        ),
        f"{n}x [{s}x{s}] @ [{s}x{hd}] attention P V": ((n, s, s), (n, s, hd), lambda a, b: a @ b, flops),
    }


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
    cases = {
        f"{t}x{k}x{n} {form}": (*_gemm_operands(form, t, k, n), 2 * t * k * n)
        for t, k, n in gemm_shapes(cfg)
        for form in GEMM_FORMS
    }
    out = {}
    for name, (a_shape, b_shape, contract, flops) in {**cases, **attention_gemms(cfg)}.items():
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
        out[name] = flops / sorted(times)[repeats // 2] / 1e9
    return out


def worker(args) -> None:
    cfg = _shape_config(args.set)
    if args.stack == "torch":
        import torch

        torch.set_num_threads(args.threads)
    mile_stack = args.stack != "torch"
    if args.parts:
        fn = mile_parts if mile_stack else torch_parts
        print(json.dumps(fn(cfg, args.loss, args.warmup, args.steps)))
    elif args.gemms:
        print(json.dumps(time_gemms(cfg, "mile" if mile_stack else "torch")))
    else:
        times = sorted((time_mile if mile_stack else time_torch)(cfg, args.loss, args.warmup, args.steps))
        tokens = cfg.data.global_batch_size * cfg.data.seq_len
        print(json.dumps({"median_s": times[len(times) // 2], "tokens": tokens}))


def _run_worker(stack: str, loss: str, args, gemms: bool = False, parts: bool = False) -> dict:
    from mile import xla_cpu_flags

    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--loss", loss]
    cmd += ["--gemms"] if gemms else []
    cmd += ["--parts"] if parts else []
    cmd += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    for item in args.set:
        cmd += ["--set", item]
    # One CPU device, as a single-process CPU run has; "mile" gets the flags launch.py adds.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    if stack == "mile":
        xla_cpu_flags.set_default_flags(env)
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
    p.add_argument(
        "--worker",
        choices=("mile", "mile-jax-flags", "torch"),
        dest="stack",
        default=None,
        help=argparse.SUPPRESS,
    )
    p.add_argument("--loss", choices=("mile", "ce"), default="mile", help=argparse.SUPPRESS)
    p.add_argument("--gemms", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-gemm-table", action="store_true", help="skip the GEMM table")
    p.add_argument(
        "--parts", action="store_true", help="only the table of the step's parts, timed alone in each stack"
    )
    args = p.parse_args()
    if args.stack:
        worker(args)
        return
    if args.parts:
        parts_table(args)
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
    """The step's GEMMs alone: XLA:CPU (jnp.dot under jit) with mile's flags and with jax's
    defaults, against torch, each in its own process, interleaved over the rounds: whether the
    matmuls explain a gap between the stacks."""
    stacks = ("mile", "mile-jax-flags", "torch")
    samples = {stack: [] for stack in stacks}
    for _ in range(args.rounds):
        for stack in stacks:
            samples[stack].append(_run_worker(stack, "mile", args, gemms=True))
    print(
        f"\nGEMMs of the step alone, float32 GFLOP/s (median of 10 runs, best of {args.rounds} rounds; "
        f"torch {args.threads} threads)\n"
    )
    print(
        "| [tokens x in x out] form | XLA, mile's flags (Eigen) | XLA, jax's defaults (YNNPACK) | torch | mile / torch |"
    )
    print("|---|---|---|---|---|")
    for key in samples["mile"][0]:
        mine, jax_default, torch_ = (max(r[key] for r in samples[s]) for s in stacks)
        print(f"| {key} | {mine:.0f} | {jax_default:.0f} | {torch_:.0f} | {mine / torch_:.2f} |")


def parts_table(args) -> None:
    """Each part of the step timed alone in every variant, interleaved over rounds; the body's
    share is forward + backward less the head's, what is left of the step is the step less
    forward + backward and the update."""
    samples: dict[tuple[str, str], list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            samples[variant].append(_run_worker(*variant, args, parts=True))
            print(f"  round {r + 1}: {LABELS[variant]} done", flush=True)

    def ms(variant, part):
        return 1e3 * min(s[part] for s in samples[variant])  # best round: the least disturbed

    rows = {v: {part: ms(v, part) for part in PARTS} for v in VARIANTS}
    for r in rows.values():
        r["body forward + backward (forward + backward less the head)"] = (
            r["forward + backward"] - r["LM head + loss, forward + backward"]
        )
        r["rest of the step (step less forward + backward and update)"] = (
            r["whole step"] - r["forward + backward"] - r["optimiser update"]
        )
    cfg = _shape_config(args.set)
    print(
        f"\nParts of the step alone, ms (median of {args.steps} runs, best of {args.rounds} rounds; "
        f"{cfg.data.global_batch_size * cfg.data.seq_len} tokens; torch {args.threads} threads)\n"
    )
    mine, ref = ("mile", "mile"), ("torch", "ce")
    print("| part | " + " | ".join(LABELS[v] for v in VARIANTS) + " | mile MiLe less reference CE |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    for part in rows[mine]:
        cells = " | ".join(f"{rows[v][part]:.0f}" for v in VARIANTS)
        print(f"| {part} | {cells} | {rows[mine][part] - rows[ref][part]:+.0f} |")


if __name__ == "__main__":
    main()
