"""Evaluation of a trained workdir: perplexity by token-frequency bucket and multiple choice.

    python -m mile.evaluate --workdir W [--step N] [--mc task.jsonl ...] [--qa qa.jsonl ...]
        [--k-shot K] [--seed S] [--eval-batches N] [--cut-points 0.8,0.95] [--out FILE] [--overwrite]
        [--tasks hellaswag,piqa --num-fewshot 5 --include-path DIR --batch-size 16]

The command line and its orchestration; the work is done by ``mile.token_frequency`` (training
counts and frequency buckets), ``mile.perplexity`` (per-token statistics, perplexity by bucket),
``mile.multiple_choice`` (log-likelihood scoring of task files) and ``mile.qa`` (closed-book QA).
Perplexity is reported for both bucketings, ``cumulative`` and ``rank``. ``--tasks`` also runs
lm-evaluation-harness tasks on the restored model (``mile.lm_eval``; needs requirements-eval.txt)
and stores the harness's metrics under "harness".

Output policy: results go to ``--out`` or ``<workdir>/eval/step_<N>.json``; an existing file is
never overwritten unless ``--overwrite`` is given (checked right after the checkpoint is
restored, before any evaluation).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from mile import multiple_choice as mc
from mile import paths
from mile import qa
from mile.jsonl import write_json
from mile.perplexity import bucket_perplexities, format_perplexity_table, make_stats_fn
from mile.token_frequency import BUCKET_NAMES, assign_buckets, check_cut_points, token_counts


def _parse_cut_points(text: str) -> tuple[float, ...]:
    try:
        return check_cut_points([float(x) for x in text.split(",") if x.strip()])
    except (TypeError, ValueError):
        raise ValueError(
            f"--cut-points={text!r} must be increasing fractions in (0, 1), e.g. 0.8,0.95."
        ) from None


def _task_name(path: str, taken: Mapping) -> str:
    name = pathlib.Path(path).stem
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _read_tasks(paths: Sequence[str], load) -> dict[str, list[dict]]:
    """{unique file stem: examples} of the task files, in order."""
    tasks: dict[str, list[dict]] = {}
    for path in paths:
        tasks[_task_name(path, tasks)] = load(path)
    return tasks


def _perplexity(model, cfg, prepared, cut_points, eval_batches, stats_fn) -> tuple[dict, dict]:
    """(bucket map per mode, perplexity per mode and bucket) over the held-out split."""
    counts = token_counts(prepared)
    maps = {mode: assign_buckets(counts, cut_points, mode) for mode in ("cumulative", "rank")}
    from mile import data as mdata

    batches = mdata.eval_iterator(cfg.data, prepared, num_batches=eval_batches)
    return maps, bucket_perplexities(model, batches, maps, stats_fn=stats_fn)


def _harness(model, tokenizer, args) -> dict[str, Any]:
    """lm-evaluation-harness metrics per task on the already restored model (mile.lm_eval)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mile.lm_eval import MileLM

    out = lm_eval.simple_evaluate(
        model=MileLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size),
        tasks=[t for t in args.tasks.split(",") if t],
        num_fewshot=args.num_fewshot,
        task_manager=TaskManager(include_path=args.include_path),
        log_samples=False,
    )
    print(lm_eval.utils.make_table(out))
    return {
        task: {k: v for k, v in r.items() if isinstance(v, (int, float, str))}
        for task, r in out["results"].items()
    }


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from mile.restore import load_trained_model, trained_data

    cut_points = _parse_cut_points(args.cut_points)
    if not paths.isdir(args.workdir):
        raise ValueError(f"workdir {args.workdir} does not exist; pass a trained --workdir.")
    mc_tasks = _read_tasks(args.mc, mc.load_task)  # every input is read before the slow restore
    qa_tasks = _read_tasks(args.qa, qa.load_examples)
    if args.k_shot < 0:
        raise ValueError(f"--k-shot={args.k_shot} must be >= 0.")
    if args.tasks:
        try:
            import lm_eval  # noqa: F401  fail before the slow restore
        except ImportError:
            msg = "--tasks needs lm-evaluation-harness; pip install -r requirements-eval.txt."
            raise ValueError(msg) from None
    if args.eval_batches is not None and args.eval_batches < 1:
        raise ValueError(f"--eval-batches={args.eval_batches} must be >= 1 (omit it for one full pass).")

    model, cfg, step = load_trained_model(args.workdir, step=args.step)
    out = args.out or paths.join(args.workdir, "eval", f"step_{step}.json")
    if paths.exists(out) and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite or choose another --out.")
    prepared = trained_data(cfg)
    stats_fn = make_stats_fn(model, chunk_size=int(cfg.loss.get("chunk_size", 0) or 0) or None)

    maps, perplexity = _perplexity(model, cfg, prepared, cut_points, args.eval_batches, stats_fn)
    print(f"step {step}: perplexity by training-frequency bucket (cut points {cut_points})")
    print(format_perplexity_table(perplexity))
    result: dict[str, Any] = {
        "workdir": str(paths.path(args.workdir)),
        "step": int(step),
        "cut_points": list(cut_points),
        "bucket_types": {
            mode: np.bincount(m, minlength=len(BUCKET_NAMES)).tolist() for mode, m in maps.items()
        },
        "perplexity": perplexity,
        "mc": {},
        "qa": {},
    }
    shots = dict(k_shot=args.k_shot, seed=args.seed)
    for name, examples in mc_tasks.items():
        result["mc"][name] = mc.score_multiple_choice(
            model, prepared.tokenizer, examples, stats_fn=stats_fn, **shots
        )
    if mc_tasks:
        print(mc.format_mc_table(result["mc"]))
    for name, examples in qa_tasks.items():
        r = result["qa"][name] = qa.evaluate_qa(model, prepared.tokenizer, examples, **shots)
        print(f"qa {name}: em={r['em']:.4f} n={r['n']}")
    if args.tasks:
        result["harness"] = _harness(model, prepared.tokenizer, args)
    write_json(out, result)
    print(f"wrote {out}")
    result["path"] = out
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mile.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="trained workdir (holds checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--mc", nargs="*", default=[], help="multiple-choice task JSONL files")
    p.add_argument("--qa", nargs="*", default=[], help="closed-book QA JSONL files (mile.qa)")
    p.add_argument("--k-shot", type=int, default=0, help="demonstrations per example")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstration draw")
    p.add_argument("--eval-batches", type=int, default=None, help="held-out batches (default: one full pass)")
    p.add_argument("--cut-points", default="0.8,0.95", help="bucket boundaries as occurrence/rank fractions")
    p.add_argument("--out", default=None, help="JSON output (default: <workdir>/eval/step_<N>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--tasks", default="", help="lm-evaluation-harness tasks, comma-separated (mile.lm_eval)")
    p.add_argument("--num-fewshot", type=int, default=None, help="harness shots (default: the task's)")
    p.add_argument("--include-path", default=None, help="directory of local harness task YAML files")
    p.add_argument("--batch-size", type=int, default=16, help="harness requests scored per batch")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_eval(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
