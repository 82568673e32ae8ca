"""The markdown report and PNG plots of experiments/synthetic_losses.py."""

from __future__ import annotations

import os

import numpy as np

from experiments.report import write_with_reading
from mile import data as mdata
from mile.data import synthetic as syn
from mile.token_frequency import assign_buckets, token_counts

FREQ = ("easy", "medium", "difficult")
GROUPS = (("frequency", "overall"),) + tuple(("frequency", b) for b in FREQ) + tuple(
    ("context", k) for k in syn.KINDS
)
COLORS = {"ce": "tab:gray", "focal-g1": "tab:orange", "mile-g0.5": "tab:cyan", "mile-g1": "tab:blue"}


def _mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _fmt(values, digits=3) -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def language_card(cfg) -> list[str]:
    """What the generated language looks like: kinds, entropies, Zipf fit, bucket composition."""
    prepared = mdata.prepare(cfg.data)
    language, records = syn.load_language(prepared.tokenizer_path)
    h, mu, kind = language.entropy(), language.stationary, language.kind
    types = np.arange(language.vocab_size) >= syn.RESERVED
    counts = token_counts(prepared)
    buckets = assign_buckets(counts)
    # Held-out positions: the target's frequency bucket x the context's kind.
    stream = _heldout_stream(prepared)
    context = np.concatenate([[syn.EOS_ID], stream[:-1]])
    cross = np.zeros((3, 3), int)
    np.add.at(cross, (buckets[stream], kind[context]), 1)
    lines = [
        "## The language",
        "",
        f"{language.vocab_size - syn.RESERVED} types plus EOS (ids 0-3 reserved), a first-order Markov chain "
        f"(mile.data.synthetic, spec `{records['spec']}`). Training split {int(counts.sum()):,} tokens, "
        f"held-out split {stream.size:,} tokens. Stationary unigram distribution: log-log Zipf fit exponent "
        f"{syn.zipf_fit(mu[types]):.2f}; most frequent type {mu[types].max():.3f}, rarest {mu[types].min():.1e}. "
        f"True entropy rate {float(mu @ h):.3f} nats/token.",
        "",
        "| context kind | types | share of tokens (stationary) | true entropy (nats) |",
        "|---|---|---|---|",
    ]
    for k, name in enumerate(syn.KINDS):
        sel = types & (kind == k)
        lines.append(f"| {name} | {sel.sum()} | {mu[sel].sum():.3f} | {h[sel].min():.2f} – {h[sel].max():.2f} |")
    lines += [
        "",
        "Training-frequency buckets (cumulative occurrence share 80 / 15 / 5 %) and the kinds of context their "
        "held-out targets follow:",
        "",
        "| bucket | types | held-out tokens | after deterministic | after multi-label | after flat |",
        "|---|---|---|---|---|---|",
    ]
    for b, name in enumerate(FREQ):
        row = cross[b]
        shares = " | ".join(f"{x / max(row.sum(), 1):.2f}" for x in row)
        lines.append(f"| {name} | {(buckets == b).sum()} | {row.sum():,} | {shares} |")
    return lines + [""]


def _heldout_stream(prepared) -> np.ndarray:
    source = prepared.open("eval")
    return syn.heldout_stream([prepared.tokenizer.encode(source[i]) for i in range(len(source))])


def write_report(args, cfg, evals, seconds, timing) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(results_dir, exist_ok=True)
    variants, seeds, name = args.variants, args.seeds, args.name
    steps = sorted(evals[variants[0], seeds[0]])
    final = steps[-1]

    def values(v, group, bucket, field, step=final):
        return [evals[v, s][step][group][bucket][field] for s in seeds]

    tokens = args.steps * cfg.data.global_batch_size * cfg.data.seq_len
    any_eval = evals[variants[0], seeds[0]][final]
    train_minutes = sum(seconds.values()) / 60
    lines = [
        f"# CE vs focal vs MiLe on a language with known next-token distributions: {name}",
        "",
        f"Command: `python experiments/synthetic_losses.py --name {name} --steps {args.steps} "
        f"--seeds {' '.join(map(str, seeds))} --variants {' '.join(variants)} --eval-batches {args.eval_batches}`",
        "",
        f"Setup: configs/synthetic.py (LLaMA-style, {cfg.model.num_layers} layers, d={cfg.model.embed_dim}, "
        f"vocab {cfg.model.vocab_size}), {args.steps} steps x {cfg.data.global_batch_size} x {cfg.data.seq_len} "
        f"= {tokens / 1e6:.2f}M training tokens per run, AdamW lr {cfg.optim.learning_rate} (warmup "
        f"{cfg.optim.warmup_steps}, cosine to 0). Per seed, every loss has the same initialisation and data "
        f"order. Seeds {seeds}. Values are mean ± standard deviation over the {len(seeds)} seeds. Each "
        f"checkpoint is evaluated on {any_eval['frequency']['overall']['tokens']:,} held-out positions.",
        "",
        f"Time: {train_minutes:.1f} min of training in all ({len(seconds)} runs, "
        f"{min(seconds.values()) / 60:.1f}–{max(seconds.values()) / 60:.1f} min each) and "
        f"{timing['wall_seconds'] / 60:.1f} min wall-clock for the whole script, evaluation included, "
        + (
            f"using {timing['cpu_seconds'] / 60:.1f} CPU-minutes (so {timing['cpu_seconds'] / 120:.0f}–"
            f"{timing['cpu_seconds'] / 60:.0f} min on 2 idle cores, depending on how well XLA uses both)"
            if timing.get("cpu_seconds")
            else "CPU time not recorded"
        )
        + "; the 2-core machine was shared with other jobs.",
        "",
        "Definitions (mile.ground_truth): **excess** = model CE − true −log p(target), in nats; its mean "
        "estimates the KL but carries the target's sampling noise. **KL** = KL(true ‖ model) at each "
        "position, exact over the vocabulary. Frequency buckets group positions by the *target's* "
        "training frequency, kinds by the *context*. Per frequency bucket the excess loss may be negative "
        "(a model that over-predicts rare types pays less than the truth on rare targets); the KL cannot.",
        "",
    ]
    lines += language_card(cfg)

    def table(title, field, digits=3):
        out = [f"## {title} (final step {final})", "", "| loss | " + " | ".join(b for _, b in GROUPS) + " |"]
        out.append("|---" * (len(GROUPS) + 1) + "|")
        for v in variants:
            out.append(f"| {v} | " + " | ".join(_fmt(values(v, g, b, field), digits) for g, b in GROUPS) + " |")
        return out + [""]

    lines += table("KL to the truth (nats)", "kl")
    lines += table("Excess loss (nats)", "excess")
    lines += table("Model perplexity", "perplexity", 2)
    truth = [evals[variants[0], seeds[0]][final][g][b] for g, b in GROUPS]
    lines += [
        "True entropy per group (nats; the loss a perfect model pays): "
        + ", ".join(f"{b} {t['true_entropy']:.3f}" for (g, b), t in zip(GROUPS, truth))
        + ".",
        "",
        f"## Paired difference from CE in KL (nats; same seed, same data order; final step {final})",
        "",
        "Negative = closer to the truth than CE. In brackets: seeds in which the loss beat CE.",
        "",
        "| loss | " + " | ".join(b for _, b in GROUPS) + " |",
        "|---" * (len(GROUPS) + 1) + "|",
    ]
    for v in variants:
        if v == "ce":
            continue
        cells = []
        for g, b in GROUPS:
            d = np.array(values(v, g, b, "kl")) - np.array(values("ce", g, b, "kl"))
            cells.append(f"{_fmt(d)} ({int((d < 0).sum())}/{len(d)})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## KL over training (nats)",
        "",
        "| loss | group | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|---" + "|---" * len(steps) + "|",
    ]
    for v in variants:
        for g, b in GROUPS:
            cells = [_fmt(values(v, g, b, "kl", s)) for s in steps]
            lines.append(f"| {v} | {b} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every run (final step, KL in nats)",
        "",
        "| run | " + " | ".join(b for _, b in GROUPS) + " | training minutes |",
        "|---" * (len(GROUPS) + 2) + "|",
    ]
    for v in variants:
        for s in seeds:
            r = evals[v, s][final]
            cells = [f"{r[g][b]['kl']:.4f}" for g, b in GROUPS]
            lines.append(f"| {v} seed {s} | " + " | ".join(cells) + f" | {seconds[v, s] / 60:.1f} |")
    report_path = os.path.join(results_dir, f"{name}.md")
    figures = {"KL and excess loss by bucket": f"{name}_by_bucket.png", "KL over training": f"{name}_curves.png"}
    write_with_reading(report_path, lines, figures)

    # Bars: KL and excess loss per group, mean ± sd over seeds.
    fig, axes = plt.subplots(2, 1, figsize=(11, 7))
    width = 0.8 / len(variants)
    for ax, field in zip(axes, ("kl", "excess")):
        for i, v in enumerate(variants):
            stats = [_mean_sd(values(v, g, b, field)) for g, b in GROUPS]
            ax.bar(
                np.arange(len(GROUPS)) + (i - (len(variants) - 1) / 2) * width,
                [m for m, _ in stats],
                width,
                yerr=[sd for _, sd in stats],
                color=COLORS.get(v),
                capsize=3,
                label=v,
            )
        ax.set_xticks(range(len(GROUPS)), [b for _, b in GROUPS])
        ax.axvline(3.5, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel(f"{field} (nats)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(
        "Distance to the true next-token distribution: frequency buckets (left), context kinds (right)"
    )
    axes[0].legend(fontsize=8, ncol=len(variants))
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, f"{name}_by_bucket.png"), dpi=100)

    # Curves: KL per group over training, mean ± sd band.
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5))
    for ax, (g, b) in zip(axes.ravel(), GROUPS):
        for v in variants:
            stats = np.array([_mean_sd(values(v, g, b, "kl", s)) for s in steps])
            ax.plot(steps, stats[:, 0], color=COLORS.get(v), marker="o", ms=3, label=v)
            low, high = stats[:, 0] - stats[:, 1], stats[:, 0] + stats[:, 1]
            ax.fill_between(steps, low, high, color=COLORS.get(v), alpha=0.2)
        ax.set_title(b)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.ravel()[-1].axis("off")
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimiser step")
    axes[0, 0].set_ylabel("KL to the truth (nats)")
    axes[1, 0].set_ylabel("KL to the truth (nats)")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, f"{name}_curves.png"), dpi=100)
    print(f"wrote {report_path}")
