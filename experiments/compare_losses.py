"""CE vs focal vs MiLe on the default corpus with a CPU-sized model: train, evaluate, report.

    python experiments/compare_losses.py                       # the committed results
    python experiments/compare_losses.py --steps 100 --seeds 0 --name smoke

Every run uses configs/cpu.py with the same data order, seed and token budget; only the loss
differs. Runs live in experiments/runs/<name>/<loss>-s<seed> (git-ignored) and are resumed, not
redone, when the command is run again. The report goes to experiments/results/<name>.md with
PNG plots beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {  # name -> config overrides
    "ce": {"loss.name": "ce"},
    "focal-g1": {"loss.name": "focal", "loss.gamma": 1.0},
    "mile-g0.5": {"loss.name": "mile", "loss.gamma": 0.5},
    "mile-g1": {"loss.name": "mile", "loss.gamma": 1.0},
}


def train_run(workdir: str, overrides: dict, seed: int, steps: int, eval_every: int) -> None:
    flags = {
        **overrides,
        "seed": seed,
        "data.shuffle_seed": seed,
        "train.steps": steps,
        "train.eval_every": eval_every,
        "train.checkpoint_every": steps,
    }
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch.py"),
        "--config",
        os.path.join(REPO, "configs/cpu.py"),
        f"--workdir={workdir}",
        *[f"--config.{k}={v}" for k, v in flags.items()],
    ]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="kjv_cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--stage", choices=["train", "all"], default="all")
    args = ap.parse_args()

    runs_dir = os.path.join(REPO, "experiments", "runs", args.name)
    for seed in args.seeds:
        for variant in args.variants:
            train_run(
                os.path.join(runs_dir, f"{variant}-s{seed}"),
                VARIANTS[variant],
                seed,
                args.steps,
                args.eval_every,
            )
    if args.stage == "train":
        return
    from experiments import report

    report.evaluate_and_report(args, runs_dir, VARIANTS)


if __name__ == "__main__":
    main()
