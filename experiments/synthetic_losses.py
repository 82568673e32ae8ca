"""CE vs focal vs MiLe on the synthetic language with known next-token distributions (issue 11).

    python experiments/synthetic_losses.py                              # the committed report
    python experiments/synthetic_losses.py --steps 60 --seeds 0 --name synthetic_smoke

Every run uses configs/synthetic.py: the same generated language and held-out split, and per
seed the same initialisation and data order; only the loss differs. Each run keeps checkpoints
at five points of training, and each checkpoint is evaluated against the truth
(mile.ground_truth: excess loss and KL per training-frequency bucket and per kind of context).
Runs live in experiments/runs/<name>/<loss>-s<seed> (git-ignored) and are resumed, not redone,
when the command is run again. The report goes to experiments/results/<name>.md, PNGs beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {  # name -> loss config (the first four as in experiments/compare_losses.py)
    "ce": {"name": "ce"},
    "focal-g1": {"name": "focal", "gamma": 1.0},
    "mile-g0.25": {"name": "mile", "gamma": 0.25},
    "mile-g0.5": {"name": "mile", "gamma": 0.5},
    "mile-g1": {"name": "mile", "gamma": 1.0},
    "mile-g2": {"name": "mile", "gamma": 2.0},
    # gamma 0 -> 1 over training as a staircase of equal stages (mean gamma 0.5, like mile-g0.5).
    "mile-ramp": {"name": "mile", "gamma": (0.0, 0.25, 0.5, 0.75, 1.0)},
}
NUM_CHECKPOINTS = 5


def gamma_stages(variant: str) -> tuple[float, ...] | None:
    """The staircase of a scheduled variant (one gamma per equal stage of training), else None."""
    gamma = VARIANTS[variant].get("gamma")
    return tuple(gamma) if isinstance(gamma, (tuple, list)) else None


def run_config(variant: str, seed: int, steps: int, model_dim: int | None = None, language: dict | None = None):
    """The run's config. `model_dim` rescales the model's width (heads stay 4, MLP 3x);
    `language` overrides keys of data.synthetic (e.g. zipf_exponent, train_tokens)."""
    from configs import synthetic

    cfg = synthetic.get_config()
    loss = dict(VARIANTS[variant])
    if gamma_stages(variant):
        loss["gamma"] = gamma_stages(variant)[0]
    cfg.loss.update(loss)
    if model_dim:
        cfg.model.update(embed_dim=model_dim, head_dim=model_dim // cfg.model.num_heads, mlp_dim=3 * model_dim)
    if language:
        cfg.data.synthetic.update(language)
    cfg.seed = seed
    cfg.data.shuffle_seed = seed
    cfg.data.cache_dir = os.path.join(REPO, ".cache")
    cfg.train.update(
        steps=steps,
        eval_every=max(1, steps // NUM_CHECKPOINTS),
        checkpoint_every=max(1, steps // NUM_CHECKPOINTS),
        keep_checkpoints=NUM_CHECKPOINTS + 1 + len(gamma_stages(variant) or ()),
    )
    return cfg


def train_run(workdir: str, variant: str, seed: int, steps: int, **overrides) -> float:
    """Trains (or finishes) one run; returns the seconds spent training in this call.

    A scheduled variant trains stage by stage: each stage resumes the previous one's checkpoint
    with the next gamma (the loss may change on resume; model, data and seed may not), so the
    optimiser state, data order and learning-rate schedule run on as in one run."""
    from mile import train
    from mile.checkpoint import Checkpointer

    ckpt, done = os.path.join(workdir, "checkpoints"), 0
    if os.path.isdir(ckpt):
        with Checkpointer(ckpt, max_to_keep=100, async_save=False) as c:
            done = c.latest_step() or 0
        if done == steps:
            return 0.0
    print(f"== training {variant} seed {seed} ({steps} steps) in {workdir}", flush=True)
    start = time.perf_counter()
    cfg = run_config(variant, seed, steps, **overrides)
    stages = gamma_stages(variant)
    if stages is None:
        train.train(cfg, workdir)
    else:
        for k, gamma in enumerate(stages):
            end = steps * (k + 1) // len(stages)
            if end > done:  # stages already finished by an earlier call are skipped
                cfg.loss.gamma = gamma
                train.train(cfg, workdir, stop_at=end)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "train_seconds.json"), "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def evaluate_run(workdir: str, eval_batches: int, final_only: bool = False) -> dict[int, dict]:
    """Ground-truth evaluation of every kept checkpoint (or the last), cached in <workdir>/eval/."""
    from mile import ground_truth
    from mile.checkpoint import Checkpointer

    with Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=100, async_save=False) as c:
        steps = c.steps()
    if final_only:
        steps = steps[-1:]
    results = {}
    for step in sorted(steps):
        out = os.path.join(workdir, "eval", f"ground_truth_{step}.json")
        if not os.path.exists(out):
            result = ground_truth.evaluate_workdir(workdir, step=step, eval_batches=eval_batches)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
        with open(out) as f:
            results[step] = json.load(f)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="synthetic")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--eval-batches", type=int, default=32, help="held-out batches per evaluation")
    args = ap.parse_args()

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax/TFDS log every file at INFO
    runs_dir = os.path.join(REPO, "experiments", "runs", args.name)
    start, start_cpu = time.perf_counter(), time.process_time()
    evals, seconds = {}, {}
    for seed in args.seeds:
        for variant in args.variants:
            wd = os.path.join(runs_dir, f"{variant}-s{seed}")
            train_run(wd, variant, seed, args.steps)
            evals[variant, seed] = evaluate_run(wd, args.eval_batches)
            with open(os.path.join(wd, "train_seconds.json")) as f:
                seconds[variant, seed] = json.load(f)["seconds"]
    timing_path = os.path.join(runs_dir, "timing.json")
    timing = {"wall_seconds": 0.0, "cpu_seconds": 0.0}
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            timing.update(json.load(f))
    # Summed over invocations. CPU seconds (all threads) / 2 approximates the wall time on 2 idle cores.
    timing["wall_seconds"] += time.perf_counter() - start
    timing["cpu_seconds"] += time.process_time() - start_cpu
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    from experiments import synthetic_report

    cfg = run_config(args.variants[0], args.seeds[0], args.steps)
    synthetic_report.write_report(args, cfg, evals, seconds, timing)


if __name__ == "__main__":
    main()
