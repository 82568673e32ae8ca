"""Benchmark: requests/s of mile's harness backend against the harness's HF backend.

The same model (the CPU default config, random weights: speed does not depend on them), its HF
export, and one generated local multiple-choice task (4 choices, so 4 loglikelihood requests a
question), evaluated through ``lm_eval.simple_evaluate`` with the same batch size. Each backend
runs the task twice: the first run includes its one-time costs (JAX compiles a handful of
shapes, torch none), the second is steady state. Prints one table.

  python experiments/bench_lm_eval.py                  # 100 questions, batch 16
  python experiments/bench_lm_eval.py --questions 200 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from flax import nnx

from configs import cpu
from mile import export
from mile import lm_eval as mle
from mile.data import tokenizer as mtok
from mile.model import Llama

WORDS = (
    "and the lord said unto moses go forth into the land which i shall give thee and they went up "
    "out of egypt with all their flocks and herds and the people rested on the seventh day"
).split()


def _task(n: int, rng) -> list[dict]:
    out = []
    for _ in range(n):
        context = " ".join(rng.choice(WORDS, size=rng.integers(20, 60))).capitalize()
        choices = [" " + " ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(4)]
        out.append({"context": context, "choices": choices, "gold": int(rng.integers(4))})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    rng = np.random.default_rng(0)
    tmp = tempfile.mkdtemp(prefix="bench_lm_eval_")
    docs = [" ".join(rng.choice(WORDS, size=200)).capitalize() + "." for _ in range(300)]
    cfg = cpu.get_config()
    tok = mtok.train_or_load(
        docs, corpus_fingerprint="bench", vocab_size=500, cache_dir=tmp
    )  # model vocab stays 8000
    model = Llama(cfg.model, rngs=nnx.Rngs(0))
    hf_dir = export.export_hf(model, cfg, tok.path, os.path.join(tmp, "hf"))
    data = os.path.join(tmp, "bench_mc.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in _task(args.questions, rng))
    mle.write_mc_task(os.path.join(tmp, "tasks"), "bench_mc", data)
    manager = TaskManager(include_path=os.path.join(tmp, "tasks"))

    backends = {
        "mile (JAX)": lambda: mle.MileLM(model=model, tokenizer=tok, batch_size=args.batch_size),
        "hf (torch)": lambda: lm_eval.api.registry.get_model("hf")(
            pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size
        ),
    }
    n_requests = 4 * args.questions
    rows, accs = [], {}
    for name, make in backends.items():
        lm = make()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=lm, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0
            )
            times.append(time.perf_counter() - start)
        accs[name] = out["results"]["bench_mc"]["acc,none"]
        rows.append((name, *times))
    print(
        f"\n{args.questions} questions x 4 choices = {n_requests} loglikelihood requests, "
        f"batch {args.batch_size}, model configs/cpu.py ({_param_count(model) / 1e6:.1f}M params), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'backend':<12}{'run 1 s':>9}{'req/s':>8}{'run 2 s':>9}{'req/s':>8}{'acc':>7}")
    for name, t1, t2 in rows:
        print(
            f"{name:<12}{t1:>9.2f}{n_requests / t1:>8.1f}{t2:>9.2f}{n_requests / t2:>8.1f}{accs[name]:>7.3f}"
        )
    (m1, m2), (h1, h2) = (r[1:] for r in rows)
    print(f"mile / hf requests/s: run 1 {h1 / m1:.2f}x, run 2 {h2 / m2:.2f}x")
    return 0


def _param_count(model) -> int:
    import jax

    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


if __name__ == "__main__":
    sys.exit(main())
