"""Where a train step's time goes on this backend: jax.profiler, op time grouped by kind.

Runs mile's real train step (configs/cpu.py shape unless overridden) under `jax.profiler.trace`,
then sums the duration of every compiled op in the trace and groups fusions by kind (the name
without its numeric suffix: `ynn_fusion` are YNNPACK matmuls on XLA:CPU, `copy_*`/`transpose_*`
are layout changes, the rest are elementwise fusions). Shares of the summed op time are robust to
a loaded machine; absolute times are not, so this script prints shares only. It also reports the
matmul FLOPs of the step and the share of ops that are matmuls, which bounds what any change
outside the matmuls can buy.

  python experiments/profile_step.py
  python experiments/profile_step.py --set model.num_layers=2 --top 30
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mile import xla_cpu_flags

xla_cpu_flags.set_default_flags()  # profile the step as launch.py runs it

# Trace events that are runtime bookkeeping, or control flow whose time its inner ops already count.
_NOT_OPS = re.compile(
    r"^\$|ThunkExecutor|Slinky|Execute|PjitFunction|ParseArguments|^end: |^(while|conditional|call)(\.\d+)?$"
)


def op_time_by_kind(trace_dir: str) -> collections.Counter:
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    by_kind: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not _NOT_OPS.search(e["name"]):
            by_kind[re.sub(r"\.\d+$", "", e["name"])] += e["dur"]
    return by_kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.num_layers=2")
    p.add_argument("--loss", default="mile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    import jax

    from experiments.bench_step import _shape_config, mile_step
    from mile import flops

    cfg = _shape_config(args.set)
    step, state, batch = mile_step(cfg, args.loss)
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        by_kind = op_time_by_kind(trace_dir)

    total = sum(by_kind.values())
    matmul = sum(t for k, t in by_kind.items() if "ynn" in k or "xnn" in k or k == "dot" or "onednn" in k)
    layout = sum(t for k, t in by_kind.items() if k.startswith(("copy", "transpose")))
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    flops = flops.model_flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    print(f"{jax.devices()[0].device_kind}: {cfg.model.num_layers} layers, d={cfg.model.embed_dim}, "
          f"{tokens} tokens/step, {flops / 1e9:.1f} GFLOP/step (analytic, matmuls)")
    print(f"matmuls: {100 * matmul / total:.1f}% of op time; layout copies/transposes: "
          f"{100 * layout / total:.1f}%; everything else: {100 * (total - matmul - layout) / total:.1f}%")
    print()
    print("| op kind | share of op time |")
    print("|---|---|")
    for kind, t in by_kind.most_common(args.top):
        print(f"| {kind} | {100 * t / total:.1f}% |")


if __name__ == "__main__":
    main()
