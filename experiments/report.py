"""Evaluate the runs of compare_losses.py and write the markdown report and PNG plots."""

from __future__ import annotations

import json
import os

import numpy as np

from mile import data as mdata
from mile import evaluate as ev
from mile.metrics import read_metrics

BUCKETS = ("easy", "medium", "difficult")



def write_with_reading(report_path: str, lines: list[str], figures: dict[str, str]) -> None:
    """Write a report: `lines`, then the `figures` (alt text -> image file), then a "## Reading"
    section. A reading already written by hand in an earlier report is kept across re-runs;
    otherwise it holds the placeholder READING."""
    reading = "READING"
    if os.path.exists(report_path):
        with open(report_path) as f:
            old = f.read()
        if "## Reading" in old:
            reading = old.split("## Reading", 1)[1].strip()
    lines = lines + [""] + [f"![{alt}]({path})" for alt, path in figures.items()]
    with open(report_path, "w") as f:
        f.write("\n".join(lines + ["", "## Reading", "", reading, ""]))


def make_verse_completion_task(data_cfg, path: str, *, num_examples=200, num_choices=4, seed=0) -> str:
    """A multiple-choice sanity task from held-out verses: the first half of a verse is the
    context; the choices are its real second half and the second halves of other verses."""
    if os.path.exists(path):
        return path
    prepared = mdata.prepare(data_cfg)
    source = prepared.open("eval")
    docs = [source[i] for i in range(len(source))]
    verses = [v.split() for doc in docs for v in doc.splitlines() if len(v.split()) >= 10]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(verses), size=min(num_examples, len(verses)), replace=False)
    with open(path, "w") as f:
        for i in picks:
            words = verses[i]
            cut = len(words) // 2
            others = rng.choice(
                [j for j in range(len(verses)) if j != i], size=num_choices - 1, replace=False
            )
            endings = [" " + " ".join(words[cut:])] + [
                " " + " ".join(verses[j][len(verses[j]) // 2 :]) for j in others
            ]
            order = rng.permutation(num_choices)
            f.write(
                json.dumps(
                    {
                        "context": " ".join(words[:cut]),
                        "choices": [endings[o] for o in order],
                        "gold": int(np.argmax(order == 0)),
                    }
                )
                + "\n"
            )
    return path


def evaluate_run(workdir: str, task_path: str) -> dict:
    out = os.path.join(workdir, "eval", "comparison.json")
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    return ev.run_eval(ev.parse_args(["--workdir", workdir, "--mc", task_path, "--out", out]))


def _validation_curve(workdir: str):
    rows = [r for r in read_metrics(workdir) if "eval/ce" in r]
    return [r["step"] for r in rows], [r["eval/ce"] for r in rows]


def _mean_range(values):
    values = np.asarray(values, float)
    return values.mean(), (values.max() - values.min()) / 2


def _fmt(values, digits=2):
    mean, half = _mean_range(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def evaluate_and_report(args, runs_dir: str, variants: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from configs import cpu

    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results_dir, exist_ok=True)
    task = make_verse_completion_task(cpu.get_config().data, os.path.join(runs_dir, "verse_completion.jsonl"))

    evals, curves = {}, {}
    for variant in args.variants:
        for seed in args.seeds:
            wd = os.path.join(runs_dir, f"{variant}-s{seed}")
            evals[variant, seed] = evaluate_run(wd, task)
            curves[variant, seed] = _validation_curve(wd)

    def column(variant, fn):
        return [fn(evals[variant, s]) for s in args.seeds]

    def ppl(mode, bucket):
        return lambda e: e["perplexity"][mode][bucket]["perplexity"]

    cfg = cpu.get_config()
    tokens = args.steps * cfg.data.global_batch_size * cfg.data.seq_len
    any_eval = evals[args.variants[0], args.seeds[0]]
    lines = [
        f"# CE vs focal vs MiLe: {args.name}",
        "",
        f"Command: `python experiments/compare_losses.py --name {args.name} --steps {args.steps} "
        f"--eval-every {args.eval_every} --seeds {' '.join(map(str, args.seeds))} "
        f"--variants {' '.join(args.variants)}`",
        "",
        f"Setup: configs/cpu.py (LLaMA-style, {cfg.model.num_layers} layers, d={cfg.model.embed_dim}, "
        f"vocab {cfg.model.vocab_size}), King James Bible (held-out: every {cfg.data.validation_every}th chapter), "
        f"{args.steps} steps x {cfg.data.global_batch_size} x {cfg.data.seq_len} tokens = {tokens / 1e6:.2f}M "
        f"training tokens per run, identical data order and init per seed; seeds {args.seeds}. "
        f"Values are mean ± half the range over seeds. Evaluated on the whole held-out split "
        f"({any_eval['perplexity']['cumulative']['overall']['tokens']} tokens).",
        "",
        "## Perplexity by training-frequency bucket (cumulative occurrence share 80 / 15 / 5 %)",
        "",
        f"Types per bucket (easy / medium / difficult): {any_eval['bucket_types']['cumulative']}.",
        "",
        "| loss | overall | easy | medium | difficult | mean entropy (nats) | verse-completion acc | acc_norm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in args.variants:
        cells = [_fmt(column(v, ppl("cumulative", b))) for b in ("overall",) + BUCKETS]
        cells.append(_fmt(column(v, lambda e: e["perplexity"]["cumulative"]["overall"]["entropy"]), 3))
        cells.append(_fmt(column(v, lambda e: e["mc"]["verse_completion"]["acc"]), 3))
        cells.append(_fmt(column(v, lambda e: e["mc"]["verse_completion"]["acc_norm"]), 3))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## The same, buckets by type rank (first 80 % / next 15 % / last 5 % of seen types)",
        "",
        "| loss | easy | medium | difficult |",
        "|---|---|---|---|",
    ]
    for v in args.variants:
        lines.append(f"| {v} | " + " | ".join(_fmt(column(v, ppl("rank", b))) for b in BUCKETS) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "| run | overall | easy | medium | difficult | final validation CE |",
        "|---|---|---|---|---|---|",
    ]
    for v in args.variants:
        for s in args.seeds:
            e = evals[v, s]["perplexity"]["cumulative"]
            cells = [f"{e[b]['perplexity']:.3f}" for b in ("overall",) + BUCKETS]
            lines.append(f"| {v} seed {s} | " + " | ".join(cells) + f" | {curves[v, s][1][-1]:.4f} |")
    report_path = os.path.join(results_dir, f"{args.name}.md")
    figures = {"validation CE": f"{args.name}_validation_ce.png", "bucket perplexity": f"{args.name}_bucket_ppl.png"}
    write_with_reading(report_path, lines, figures)

    colors = dict(zip(variants, ["tab:gray", "tab:orange", "tab:cyan", "tab:blue"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (v, s), (steps, ce) in curves.items():
        ax.plot(
            steps,
            ce,
            color=colors[v],
            linestyle="-" if s == args.seeds[0] else "--",
            label=f"{v} seed {s}",
            marker="o",
            markersize=3,
        )
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation CE (nats)")
    ax.set_title("Validation cross-entropy (plain CE for every loss)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, f"{args.name}_validation_ce.png"), dpi=110)

    fig, axes = plt.subplots(1, 3, figsize=(10, 4))
    for ax, bucket in zip(axes, BUCKETS):
        for i, v in enumerate(args.variants):
            mean, half = _mean_range(column(v, ppl("cumulative", bucket)))
            ax.bar(i, mean, yerr=half if len(args.seeds) > 1 else None, color=colors[v], capsize=4)
        ax.set_xticks(range(len(args.variants)), args.variants, rotation=30, fontsize=8)
        ax.set_title(f"{bucket} tokens")
        lo = min(_mean_range(column(v, ppl("cumulative", bucket)))[0] for v in args.variants)
        ax.set_ylim(bottom=lo * 0.9)
    axes[0].set_ylabel("perplexity")
    fig.suptitle("Held-out perplexity by training-frequency bucket (mean over seeds, bars = range)")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, f"{args.name}_bucket_ppl.png"), dpi=110)
    print(f"wrote {report_path}")
