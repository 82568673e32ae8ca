"""More seeds for the sweep's longest runs: CE and MiLe gamma=1 at 16x (an addendum to
experiments/results/synthetic_sweep.md, whose 16x row had one seed).

    python experiments/synthetic_sweep_16x.py --seeds 1 2 > experiments/runs/sweep_16x.log 2>&1 &

The runs are the sweep's own (synthetic_sweep.grid's 16x entries, same workdirs, config, language
and evaluation), so they resume and are reused like the sweep's; the script prints the two
tables of the report's length section for the seeds given, in Markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from experiments import synthetic_losses as runs  # noqa: E402
from experiments import synthetic_sweep as sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model-dim", type=int, default=64)
    ap.add_argument("--train-tokens", type=int, default=9_000_000)
    ap.add_argument("--eval-batches", type=int, default=32)
    args = ap.parse_args()

    from absl import logging

    logging.set_verbosity(logging.WARNING)
    steps = 16 * sweep.BASE_STEPS
    todo = [
        dict(variant=v, seed=s, steps=steps, zipf=sweep.BASE_ZIPF, curves=False)
        for s in args.seeds
        for v in ("ce", "mile-g1")
    ]
    start = time.perf_counter()
    for run in todo:
        t = time.perf_counter()
        wd = sweep.workdir(run)
        runs.train_run(wd, run["variant"], run["seed"], run["steps"], **sweep.overrides(args, run))
        runs.evaluate_run(wd, args.eval_batches, final_only=True)
        print(f"[{time.strftime('%H:%M:%S')}] {os.path.basename(wd)} 16x done in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"wall-clock: {(time.perf_counter() - start) / 60:.1f} min for {len(todo)} runs\n")
    res = sweep.Results(todo)
    rows = [("ce 16x", "ce", steps, sweep.BASE_ZIPF), ("mile-g1 16x", "mile-g1", steps, sweep.BASE_ZIPF)]
    print("\n".join(sweep._block(res, f"16x, seeds {args.seeds}", rows)))
    for v in ("ce", "mile-g1"):  # each seed's own values, to pool with the report's seed 0 by hand
        for g, b in sweep.GROUPS:
            print(v, b, res.seeds(v, steps, sweep.BASE_ZIPF), [round(x, 4) for x in res.values(v, steps, sweep.BASE_ZIPF, g, b)])


if __name__ == "__main__":
    main()
