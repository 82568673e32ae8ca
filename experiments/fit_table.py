"""What fits where: the paper's models compiled for TPU slices with `python -m mile.aot`.

    python experiments/fit_table.py                   # compile what is missing, then write the table
    python experiments/fit_table.py --table-only      # just rebuild the table from finished compiles
    python experiments/fit_table.py --update-readme   # also replace the table in README.md
    python experiments/fit_table.py --add-communication  # recompile reports from before traffic was counted

Every compile is one `python -m mile.aot ... --json` run in a fresh process; its JSON and console
output go to experiments/results/tpu_fit/, and finished compiles are re-used, so the script resumes.
Several copies may run at once (each claims a compile with a lock file). The table goes to
experiments/results/tpu_fit.md.

The micro-batch count of a row is searched one compile at a time, starting from a guess (the
`--find-microbatches` bisection starts from 1, which costs more compiles than this machine had):
halve while it fits, double while it does not. A count is reported as the smallest only when half
of it was compiled and did not fit (or it is 1). CE rows compile MiLe's count (and half of it when
MiLe needed more than one): the two losses differ only in per-token weights.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "experiments", "results", "tpu_fit")
TABLE = os.path.join(ROOT, "experiments", "results", "tpu_fit.md")
README_START, README_END = "<!-- fit-table:start -->", "<!-- fit-table:end -->"

# (size, slice, first micro-batch count to try), in the order compiled: the headline rows first.
# The guesses come from the 468m compile on v5p-8 (about 0.24 GiB of temporaries per 1024-token
# sequence per chip) scaled by layers x width; a wrong guess costs compiles, never correctness.
ROWS = [
    ("6.7b", "v5p-64", 8),
    ("468m", "v5p-8", 1),
    ("468m", "v5e-16", 2),
    ("1.2b", "v5p-16", 1),
    ("1.2b", "v5e-32", 1),
    ("6.7b", "v5e-256", 2),
]
HEAD_COMPARISON = [("468m", "v5p-8"), ("6.7b", "v5p-64")]  # MiLe, fused vs materialised head


def _name(size, loss, tpu, k, head="fused") -> str:
    return f"{size}_{loss}_{tpu}_k{k}" + ("" if head == "fused" else f"_{head}")


def _load(name: str) -> dict | None:
    path = os.path.join(OUT_DIR, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def compile_once(size, loss, tpu, k, head="fused", redo_without_communication=False) -> dict | None:
    """One `mile.aot` compile (re-used when done; None while another copy of the script runs it).

    `redo_without_communication`: compile again a fitting report written before `mile.aot`
    counted collective traffic (the new JSON replaces it only once the compile succeeded)."""
    name = _name(size, loss, tpu, k, head)
    done = _load(name)
    if done is not None and not (redo_without_communication and done["fits"] and "communication" not in done):
        return done
    lock = os.path.join(OUT_DIR, f"{name}.lock")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return None
    path = os.path.join(OUT_DIR, f"{name}.json")
    cmd = [
        sys.executable,
        "-m",
        "mile.aot",
        "--config",
        f"configs/paper.py:{size},{loss}",
        "--topology",
        tpu,
        f"--config.optim.num_microbatches={k}",
        f"--config.loss.head={head}",
        "--json",
        os.path.relpath(path, ROOT) + ".new",  # relative: the command is logged, and runs with cwd=ROOT
    ]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: python {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        with open(os.path.join(OUT_DIR, f"{name}.log"), "w") as f:
            f.write(" ".join(["python", *cmd[1:]]) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(f"error: {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            return None
        print(proc.stdout, flush=True)
        os.replace(path + ".new", path)  # a finished report replaces the old one, never a partial one
        return _load(name)
    finally:
        os.remove(lock)


def search_row(size, loss, tpu, guess) -> None:
    """Halve from a fitting guess, double from a failing one, until the boundary is compiled."""
    k, limit = guess, 64
    while 1 <= k <= limit:
        r = compile_once(size, loss, tpu, k)
        if r is None:
            return  # running elsewhere, or failed: the table shows what exists
        if r["fits"]:
            if k == 1 or (_load(_name(size, loss, tpu, k // 2)) or {"fits": True})["fits"] is False:
                return
            k //= 2
        else:
            if (_load(_name(size, loss, tpu, k * 2)) or {}).get("fits"):
                return
            k *= 2


# ---------------------------------------------------------------------------------------------
# The table, from whatever compiles exist.
# ---------------------------------------------------------------------------------------------


def _mesh(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"


def _memory(r: dict) -> str:
    total = r.get("memory_per_chip_gib", {}).get("total", r.get("total_gib"))
    if total is not None:
        return f"{total:.2f}"
    if "temp_gib_required" in r:
        return f"rejected: temporaries alone {r['temp_gib_required']:.2f}"
    return "rejected (out of memory)"


def _compiles(size, loss, tpu, head="fused") -> dict[int, dict]:
    """Micro-batch count -> report of every compile of a row, including `--find-microbatches`
    runs (one report, plus the fits/does-not-fit summary of each count it tried)."""
    found = {}
    paths = glob.glob(os.path.join(OUT_DIR, f"{size}_{loss}_{tpu}_k*.json"))
    for path in sorted(paths) + glob.glob(os.path.join(OUT_DIR, f"{size}_{loss}_{tpu}.json")):
        with open(path) as f:
            r = json.load(f)
        if r["loss"]["head"] != head:
            continue
        for attempt in r.get("microbatch_search", []):
            found.setdefault(attempt["num_microbatches"], attempt)
        if "communication" not in found.get(r["num_microbatches"], {}):  # the newest kind of report wins
            found[r["num_microbatches"]] = r
    return dict(sorted(found.items()))


def _estimate(size, loss, tpu, r):
    """FLOPs and roofline recomputed with today's mile.flops (a JSON may predate a formula fix)."""
    sys.path.insert(0, ROOT)
    from configs import paper
    from mile import aot, flops

    m = r["memory_per_chip_gib"]
    chip = flops.CHIPS[aot.parse_slice(tpu).generation]
    io_bytes = (m["arguments"] + m["outputs"]) * 2**30
    sent = r.get("communication", {}).get("bytes_per_chip")  # None in reports from before it was counted
    return aot.flops_and_roofline(paper.get_config(f"{size},{loss}"), r["chips"], chip, io_bytes, sent)


def fit_rows() -> list[str]:
    head = (
        "| model | loss | slice | chips / hosts | mesh | micro-batches: found (compiled) | GiB per chip (HBM) | "
        "compile s | model TFLOP per step per chip | GiB sent per step per chip (est.) | "
        "step ≥ s: compute / HBM / links (est.) | bound by | MFU ≤ (est.) |"
    )
    lines = [head, "|" + "---|" * 13]
    for size, tpu, _ in ROWS:
        for loss in ("ce", "mile"):
            runs = _compiles(size, loss, tpu)
            if not runs:
                lines.append(
                    f"| {size} | {loss} | {tpu} | | | not compiled (out of time here; rerun the script) | | | | | | | |"
                )
                continue
            fitting = [k for k, r in runs.items() if r["fits"]]
            k = min(fitting) if fitting else max(runs)
            r = runs[k]
            smallest = k == 1 or (k // 2 in runs and not runs[k // 2]["fits"])
            found = (f"{k}" if smallest else f"≤ {k}") if fitting else "none fits"
            tried = ", ".join(f"{c}{'' if x['fits'] else ' ✗'}" for c, x in runs.items())
            if r["fits"]:
                counts, roof = _estimate(size, loss, tpu, r)
                links = roof["communication_bound_s"]
                sent = "–" if links is None else f"{r['communication']['bytes_per_chip'] / 2**30:.2f}"
                step = (
                    f"**{roof['step_s_lower_bound']:.2f}**: {roof['compute_bound_s']:.2f} / "
                    f"{roof['hbm_bound_s']:.3f} / {'not counted' if links is None else f'{links:.2f}'}"
                )
                bound, mfu = roof["bound_by"], f"{roof['mfu_upper_bound']:.0%}"
                flops = f"{counts['model_flops_per_step_per_chip'] / 1e12:,.0f}"
            else:
                step = mfu = flops = sent = bound = "–"
            lines.append(
                f"| {size} | {loss} | {tpu} | {r['chips']} / {r['hosts']} | {_mesh(r)} | {found} ({tried}) | "
                f"{_memory(r)} ({r['hbm_gib']:g}) | {r['compile_s']:.0f} | {flops} | {sent} | {step} | {bound} | {mfu} |"
            )
    return lines


def head_rows() -> list[str]:
    lines = [
        "| model, loss | slice | micro-batches | head | GiB per chip | of which temp | fits | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, tpu in HEAD_COMPARISON:
        materialised = _compiles(size, "mile", tpu, "materialised")
        fused = _compiles(size, "mile", tpu)
        for k in sorted(set(materialised) & set(fused)):
            for label, r in (("fused", fused[k]), ("materialised", materialised[k])):
                temp = r.get("memory_per_chip_gib", {}).get("temp")
                compile_s = f"{r['compile_s']:.0f}" if "compile_s" in r else "–"
                lines.append(
                    f"| {size}, mile | {tpu} | {k} | {label} | {_memory(r)} | "
                    f"{'–' if temp is None else f'{temp:.2f}'} | {'yes' if r['fits'] else 'no'} | {compile_s} |"
                )
    return lines


def compare_heads(size, tpu) -> None:
    """The materialised head at the fused head's micro-batch count, then at doubled counts (both
    heads) until the materialised one fits too."""
    fits = [k for k, r in _compiles(size, "mile", tpu).items() if r["fits"]]
    k = min(fits) if fits else None
    while k is not None and k <= 64:
        if k not in _compiles(size, "mile", tpu):
            compile_once(size, "mile", tpu, k)
        r = compile_once(size, "mile", tpu, k, head="materialised")
        if r is None or r["fits"]:
            return
        k *= 2


def write_table(update_readme: bool) -> str:
    text = "\n".join(
        [
            "Per-chip memory is the compiled program's `memory_analysis()` (arguments + outputs − aliased",
            "+ temp + code); HBM, peak FLOP/s and bandwidth are published chip figures (`mile.flops.CHIPS`).",
            "Micro-batches: the smallest count that fits, then every count compiled (✗ = does not fit);",
            '"≤ k" means half of k was not compiled. The roofline is an estimate: step ≥ max(FLOPs incl.',
            "remat recompute / peak bf16, state bytes read and written / HBM bandwidth, bytes each chip",
            "sends through collectives / its link bandwidth); MFU ≤ model FLOPs / peak / that bound. Bytes",
            "sent come from the compiled HLO (`mile.hlo_traffic`: every collective in the ring model, times",
            "how often its loop runs); the link figure is half the published bidirectional ICI per chip.",
            "",
            *fit_rows(),
            "",
            "Fused vs materialised MiLe head (the reference code's full logits, softmax and entropy), same",
            "step and micro-batch count:",
            "",
            *head_rows(),
            "",
        ]
    )
    with open(TABLE, "w") as f:
        f.write("# What fits where (generated by `python experiments/fit_table.py`)\n\n" + text)
    if update_readme:
        readme = os.path.join(ROOT, "README.md")
        with open(readme) as f:
            content = f.read()
        if README_START not in content or README_END not in content:
            raise SystemExit(
                f"error: README.md has no {README_START} ... {README_END} markers; add them first"
            )
        before, rest = content.split(README_START, 1)
        _, after = rest.split(README_END, 1)
        with open(readme, "w") as f:
            f.write(f"{before}{README_START}\n{text}{README_END}{after}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--table-only", action="store_true", help="only rebuild the table from finished compiles"
    )
    parser.add_argument("--update-readme", action="store_true", help="replace the table in README.md")
    parser.add_argument("--first-row", type=int, default=0, help="start at this row of ROWS (for a 2nd copy)")
    parser.add_argument("--heads-only", action="store_true", help="only the fused vs materialised comparison")
    parser.add_argument("--ce-only", action="store_true", help="only the CE rows (after MiLe's)")
    parser.add_argument(
        "--add-communication", action="store_true",
        help="recompile each row's reported count whose report predates the collective-traffic count",
    )  # fmt: skip
    args = parser.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    rows = ROWS[args.first_row :] + ROWS[: args.first_row]
    if args.add_communication:
        for size, tpu, _ in rows:
            for loss in ("mile", "ce"):
                fits = [k for k, r in _compiles(size, loss, tpu).items() if r["fits"]]
                if fits:
                    compile_once(size, loss, tpu, min(fits), redo_without_communication=True)
                    write_table(False)
    elif args.heads_only:
        for size, tpu in HEAD_COMPARISON:
            compare_heads(size, tpu)
    elif not (args.table_only or args.ce_only):
        for size, tpu, guess in rows:
            search_row(size, "mile", tpu, guess)
            if (size, tpu) in HEAD_COMPARISON:
                compare_heads(size, tpu)
            write_table(False)
    if not (args.table_only or args.heads_only):
        for size, tpu, _ in rows:
            mile = _compiles(size, "mile", tpu)
            fits = [k for k, r in mile.items() if r["fits"]]
            if fits:
                k = min(fits)
                for count in [k] + ([k // 2] if k > 1 else []):
                    compile_once(size, "ce", tpu, count)
            write_table(False)
    print(write_table(args.update_readme))


if __name__ == "__main__":
    main()
