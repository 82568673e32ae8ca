"""Does MiLe's gain on rare tokens grow with training length, with imbalance, with gamma? (issue 19)

    python experiments/synthetic_sweep.py > experiments/runs/sweep.log 2>&1 &   # the committed report
    python experiments/synthetic_sweep.py --report-only                         # rewrite it from the runs

Every run is one of experiments/synthetic_losses.py (same config, language, evaluation against
the truth); this script only chooses the grid, runs it in priority order and writes
experiments/results/synthetic_sweep.md with its plots. Runs live in experiments/runs/sweep/ and are
resumed, not redone. The grid (steps: 500 = 1x = 0.51M training tokens):

  length   ce, mile-g0.5, mile-g1 at 1x and 4x (all seeds); ce and mile-g1 at 16x (first seed)
  gamma    mile-g0.25, mile-g2, mile-ramp (0 -> 1) at 4x (--side-seeds seeds), beside length's 4x runs
  zipf     ce and mile-g1 at 4x for a flatter and a steeper unigram distribution (--side-seeds seeds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import synthetic_losses as runs  # noqa: E402
from experiments.synthetic_report import _fmt, _mean_sd  # noqa: E402

BASE_STEPS = 500  # the earlier report's length (1x)
BASE_ZIPF = 1.0  # data.synthetic.zipf_exponent of configs/synthetic.py (log-log fit 1.36)
LENGTH_VARIANTS = ("ce", "mile-g0.5", "mile-g1")
GAMMA_VARIANTS = ("mile-g0.25", "mile-g0.5", "mile-g1", "mile-g2", "mile-ramp")
GROUPS = (
    ("frequency", "overall"),
    ("frequency", "easy"),
    ("frequency", "medium"),
    ("frequency", "difficult"),
    ("context", "deterministic"),
    ("context", "multi-label"),
    ("context", "flat"),
)


def grid(args) -> list[dict]:
    """Every run, most important first: (variant, seed, steps, zipf, all checkpoints evaluated?)."""
    out = []

    def add(variants, seeds, steps, zipf, curves=False):
        for seed in seeds:
            for v in variants:
                out.append(dict(variant=v, seed=seed, steps=steps, zipf=zipf, curves=curves))

    x4, side = 4 * BASE_STEPS, args.seeds[: args.side_seeds]
    add(LENGTH_VARIANTS, args.seeds, BASE_STEPS, BASE_ZIPF, curves=True)
    add(LENGTH_VARIANTS, args.seeds, x4, BASE_ZIPF, curves=True)
    add(("ce", "mile-g1"), args.seeds[:1], 16 * BASE_STEPS, BASE_ZIPF, curves=True)
    add(("mile-g0.25", "mile-g2", "mile-ramp"), side, x4, BASE_ZIPF)
    for zipf in args.zipf:
        add(("ce", "mile-g1"), side, x4, zipf)
    return out


def workdir(run: dict) -> str:
    return os.path.join(
        REPO, "experiments", "runs", "sweep", f"z{run['zipf']}-n{run['steps']}", f"{run['variant']}-s{run['seed']}"
    )


def overrides(args, run: dict) -> dict:
    return dict(model_dim=args.model_dim, language={"zipf_exponent": run["zipf"], "train_tokens": args.train_tokens})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--side-seeds", type=int, default=2, help="seeds of the gamma and zipf runs (the first N)")
    ap.add_argument("--zipf", type=float, nargs="+", default=[0.7, 1.3], help="data.synthetic.zipf_exponent")
    ap.add_argument("--model-dim", type=int, default=64, help="model width (configs/synthetic.py has 128)")
    ap.add_argument(
        "--train-tokens", type=int, default=9_000_000, help="training split size: the 16x run never repeats data"
    )
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    args = ap.parse_args()

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    sweep_dir = os.path.join(REPO, "experiments", "runs", "sweep")
    os.makedirs(sweep_dir, exist_ok=True)
    todo = grid(args)
    start = time.perf_counter()
    if not args.report_only:
        for i, run in enumerate(todo):
            wd = workdir(run)
            t = time.perf_counter()
            runs.train_run(wd, run["variant"], run["seed"], run["steps"], **overrides(args, run))
            runs.evaluate_run(wd, args.eval_batches, final_only=not run["curves"])
            print(
                f"[{time.strftime('%H:%M:%S')}] {i + 1}/{len(todo)} {os.path.relpath(wd, sweep_dir)} done in "
                f"{time.perf_counter() - t:.0f} s ({(time.perf_counter() - start) / 60:.1f} min so far)",
                flush=True,
            )
        timing_path = os.path.join(sweep_dir, "timing.json")
        timing = {"wall_seconds": 0.0}
        if os.path.exists(timing_path):
            with open(timing_path) as f:
                timing = json.load(f)
        timing["wall_seconds"] += time.perf_counter() - start
        with open(timing_path, "w") as f:
            json.dump(timing, f)
    write_report(args, todo)


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


def _load(run: dict) -> dict[int, dict] | None:
    """{step: ground-truth result} of a finished run, or None if it has not finished."""
    eval_dir = os.path.join(workdir(run), "eval")
    path = os.path.join(eval_dir, f"ground_truth_{run['steps']}.json")
    if not os.path.exists(path):
        return None
    out = {}
    for name in os.listdir(eval_dir):
        with open(os.path.join(eval_dir, name)) as f:
            r = json.load(f)
        out[r["step"]] = r
    return out


def _seconds(run: dict) -> float | None:
    path = os.path.join(workdir(run), "train_seconds.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["seconds"]


class Results:
    """The finished runs, indexed by (variant, seed, steps, zipf)."""

    def __init__(self, todo):
        self.evals = {}
        for run in todo:
            r = _load(run)
            if r is not None:
                self.evals[run["variant"], run["seed"], run["steps"], run["zipf"]] = r

    def seeds(self, variant, steps, zipf):
        return sorted(s for (v, s, n, z) in self.evals if (v, n, z) == (variant, steps, zipf))

    def values(self, variant, steps, zipf, group, bucket, field="kl", seeds=None):
        seeds = self.seeds(variant, steps, zipf) if seeds is None else seeds
        return [self.evals[variant, s, steps, zipf][steps][group][bucket][field] for s in seeds]

    def paired(self, variant, steps, zipf, group, bucket):
        """variant - CE per seed present for both, in KL."""
        seeds = sorted(set(self.seeds(variant, steps, zipf)) & set(self.seeds("ce", steps, zipf)))
        a = np.array(self.values(variant, steps, zipf, group, bucket, seeds=seeds))
        b = np.array(self.values("ce", steps, zipf, group, bucket, seeds=seeds))
        return a - b


def _diff_cell(d: np.ndarray) -> str:
    if d.size == 0:
        return "—"
    return f"{_fmt(d)} ({int((d < 0).sum())}/{d.size})"


def _group_header(first: str) -> list[str]:
    return [f"| {first} | " + " | ".join(b for _, b in GROUPS) + " |", "|---" * (len(GROUPS) + 1) + "|"]


def _block(res: Results, title: str, rows: list[tuple[str, str, int, float]]) -> list[str]:
    """KL table and paired-difference table for rows (label, variant, steps, zipf)."""
    lines = [f"### {title}: KL to the truth (nats), mean ± sd over seeds [seeds]", ""] + _group_header("run")
    for label, v, n, z in rows:
        seeds = res.seeds(v, n, z)
        if seeds:
            cells = [_fmt(res.values(v, n, z, g, b)) for g, b in GROUPS]
            lines.append(f"| {label} [{len(seeds)}] | " + " | ".join(cells) + " |")
    lines += ["", f"### {title}: paired difference from CE in KL (nats; negative = closer to the truth; "
              "in brackets, seeds where the loss beat CE)", ""] + _group_header("run")
    for label, v, n, z in rows:
        if v != "ce" and res.seeds(v, n, z) and res.seeds("ce", n, z):
            lines.append(f"| {label} | " + " | ".join(_diff_cell(res.paired(v, n, z, g, b)) for g, b in GROUPS) + " |")
    return lines + [""]


def _zipf_fits(zipfs) -> dict[float, float]:
    """data.synthetic.zipf_exponent -> the log-log fit of the chain's stationary unigram distribution."""
    import dataclasses

    from mile.data import synthetic as syn

    out = {}
    for z in zipfs:
        lang = syn.build_language(dataclasses.replace(syn.SyntheticSpec(), zipf_exponent=z))
        types = np.arange(lang.vocab_size) >= syn.RESERVED
        out[z] = float(syn.zipf_fit(lang.stationary[types]))
    return out


def write_report(args, todo) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from experiments.report import write_with_reading

    res = Results(todo)
    results_dir = os.path.join(REPO, "experiments", "results")
    cfg = runs.run_config("ce", 0, BASE_STEPS, **overrides(args, {"zipf": BASE_ZIPF}))
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    lengths = sorted({r["steps"] for r in todo if r["zipf"] == BASE_ZIPF and r["variant"] == "ce"})
    x4 = 4 * BASE_STEPS
    zipfs = sorted(set(args.zipf) | {BASE_ZIPF})
    fits = _zipf_fits(zipfs)
    timing_path = os.path.join(REPO, "experiments", "runs", "sweep", "timing.json")
    wall = json.load(open(timing_path))["wall_seconds"] if os.path.exists(timing_path) else float("nan")
    train_s = [s for s in map(_seconds, todo) if s is not None]
    done = sum(1 for r in todo if (r["variant"], r["seed"], r["steps"], r["zipf"]) in res.evals)
    lines = [
        "# MiLe's gain on rare tokens against training length, imbalance and gamma: synthetic_sweep",
        "",
        f"Command: `python experiments/synthetic_sweep.py --seeds {' '.join(map(str, args.seeds))} "
        f"--side-seeds {args.side_seeds} --zipf "
        f"{' '.join(map(str, args.zipf))} --model-dim {args.model_dim} --train-tokens {args.train_tokens} "
        f"--eval-batches {args.eval_batches}` (runs in the background; progress in its log).",
        "",
        f"Setup: configs/synthetic.py with the model narrowed to d={cfg.model.embed_dim} (4 heads of "
        f"{cfg.model.head_dim}, MLP {cfg.model.mlp_dim}, {cfg.model.num_layers} layers, vocab "
        f"{cfg.model.vocab_size}), {cfg.data.global_batch_size} x {cfg.data.seq_len} = {tokens_per_step} tokens "
        f"per step, AdamW lr {cfg.optim.learning_rate}, warm-up {cfg.optim.warmup_steps} steps then cosine to 0 "
        f"at each run's own last step (so every length is a complete run, not a prefix). The training split "
        f"holds {args.train_tokens / 1e6:.0f}M sampled tokens, so even the 16x run ({16 * BASE_STEPS * tokens_per_step / 1e6:.1f}M "
        f"tokens) never sees a token twice, and a seed's data order is the same for every loss and length. "
        f"1x = {BASE_STEPS} steps = {BASE_STEPS * tokens_per_step / 1e6:.2f}M tokens, the length of "
        f"experiments/results/synthetic.md. Each run's final checkpoint is evaluated against the truth on "
        f"{args.eval_batches * tokens_per_step:,} held-out positions (mile.ground_truth; buckets by the target's "
        f"training frequency, 80/15/5 % of occurrences, kinds by the context).",
        "",
        f"Runs finished: {done} of {len(todo)}. Time: {sum(train_s) / 60:.0f} min of training summed over "
        f"{len(train_s)} runs, on the 2-core machine shared with other work; the script's own wall-clock "
        f"count ({wall / 60:.0f} min) covers only its invocations that ran to the end, so a sweep that was "
        "stopped and restarted took longer than that.",
        "",
        "Why d=64: the d=128 model of the earlier report trains at 5.3k tokens/s here and d=64 at about 17k, "
        "and only the narrower model fits the grid into the 2.5-hour budget. Its absolute KLs are larger than "
        "the earlier report's; the comparisons are all within this model.",
        "",
        "## 1. Training length",
        "",
    ]
    rows = [(f"{v} {n // BASE_STEPS}x", v, n, BASE_ZIPF) for n in lengths for v in LENGTH_VARIANTS]
    lines += _block(res, "Length", rows)
    lines += ["## 2. Imbalance (4x)", ""]
    lines.append(
        "Unigram imbalance: data.synthetic.zipf_exponent -> log-log fit of the stationary distribution: "
        + ", ".join(f"{z} -> {fits[z]:.2f}" for z in zipfs)
        + "."
    )
    lines.append("")
    rows = [(f"{v} zipf {fits[z]:.2f}", v, x4, z) for z in zipfs for v in ("ce", "mile-g1")]
    lines += _block(res, "Imbalance", rows)
    lines += ["## 3. gamma (4x)", ""]
    lines.append(
        "mile-ramp raises gamma from 0 to 1 in five equal stages (0, 0.25, 0.5, 0.75, 1; each stage resumes "
        "the last one's checkpoint with the next gamma): its mean gamma is 0.5, like mile-g0.5's. The ramp "
        "rather than the reverse because the earlier report saw MiLe's gain appear only late in training, "
        "so the question is whether weighting late alone keeps the gain and spares the early phase."
    )
    lines.append("")
    rows = [("ce", "ce", x4, BASE_ZIPF)] + [(v, v, x4, BASE_ZIPF) for v in GAMMA_VARIANTS]
    lines += _block(res, "gamma", rows)

    figures = {
        "Difficult-bucket KL against training tokens": "synthetic_sweep_length.png",
        "Difficult-bucket KL against imbalance": "synthetic_sweep_zipf.png",
        "Difficult-bucket KL against gamma": "synthetic_sweep_gamma.png",
    }
    write_with_reading(os.path.join(results_dir, "synthetic_sweep.md"), lines, figures)

    colors = {"ce": "tab:gray", "mile-g0.5": "tab:cyan", "mile-g1": "tab:blue"}
    panels = (("frequency", "difficult"), ("context", "deterministic"), ("frequency", "overall"))

    def errorbar(ax, xs, stats, **kw):
        stats = np.array(stats)
        ax.errorbar(xs, stats[:, 0], yerr=stats[:, 1], marker="o", capsize=3, **kw)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (g, b) in zip(axes, panels):
        for v in LENGTH_VARIANTS:
            ns = [n for n in lengths if res.seeds(v, n, BASE_ZIPF)]
            if ns:
                errorbar(ax, [n * tokens_per_step for n in ns],
                         [_mean_sd(res.values(v, n, BASE_ZIPF, g, b)) for n in ns], color=colors[v], label=v)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [n * tokens_per_step for n in lengths]  # one labelled tick per run length
        ax.set_xticks(ticks, [f"{t / 1e6:.2g}M" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training tokens")
        ax.set_title(f"KL to the truth: {b}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, figures["Difficult-bucket KL against training tokens"]), dpi=100)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (g, b) in zip(axes, panels):
        for v in ("ce", "mile-g1"):
            zs = [z for z in zipfs if res.seeds(v, x4, z)]
            if zs:
                errorbar(ax, [fits[z] for z in zs], [_mean_sd(res.values(v, x4, z, g, b)) for z in zs],
                         color=colors[v], label=v)
        ax.set_xlabel("Zipf exponent of the unigram distribution (log-log fit)")
        ax.set_title(f"KL to the truth at 4x: {b}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, figures["Difficult-bucket KL against imbalance"]), dpi=100)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    gammas = {"ce": 0.0, "mile-g0.25": 0.25, "mile-g0.5": 0.5, "mile-g1": 1.0, "mile-g2": 2.0}
    for ax, (g, b) in zip(axes, panels):
        vs = [v for v in gammas if res.seeds(v, x4, BASE_ZIPF)]
        if vs:
            errorbar(ax, [gammas[v] for v in vs], [_mean_sd(res.values(v, x4, BASE_ZIPF, g, b)) for v in vs],
                     color="tab:blue", label="constant gamma (0 = CE)")
        if res.seeds("mile-ramp", x4, BASE_ZIPF):
            m, sd = _mean_sd(res.values("mile-ramp", x4, BASE_ZIPF, g, b))
            ax.errorbar([0.5], [m], yerr=[sd], marker="s", color="tab:red", capsize=3, ls="none",
                        label="ramp 0 -> 1 (mean 0.5)")
        ax.set_xlabel("gamma")
        ax.set_title(f"KL to the truth at 4x: {b}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, figures["Difficult-bucket KL against gamma"]), dpi=100)
    print(f"wrote {os.path.join(results_dir, 'synthetic_sweep.md')}")


if __name__ == "__main__":
    main()
