"""The input pipeline against what a TPU slice consumes: tokens/s of the real training iterator per
mode, the preparation's memory and speed, and the cores a host needs to feed each fit-table row.

    python experiments/bench_input.py                  # ~20 min on 2 cores; writes results/input_pipeline.md
    python experiments/bench_input.py --corpus-gb 0.2 --seconds 5   # a quick look

1. A corpus of reshuffled King James verses (documents of ~30 verses, ~4 KB) is generated as
   16 JSONL files under experiments/runs/bench_input/ (never committed) until it reaches
   --corpus-gb; the first --subset-files of them (default 2 of 16) feed the throughput rows.
2. Preparation: `python -m mile.prepare` with a given tokenizer (the 8000-piece SentencePiece the
   CPU default trains on the KJV) builds the text store of the whole corpus with --workers 1 and
   2, the peak RSS summed over its processes sampled every 0.1 s; once more with the default
   data.tokenizer=train (the text store, then SentencePiece trained on a sample of it); then the
   token store (data.pretokenize) of the subset with 1 and 2 workers.
3. Throughput: the real training iterator (mile.data.train_iterator, seq_len 1024, 32 sequences
   per batch, one data stream) in its own process per mode, after 3 warm-up batches, for
   --seconds: tokens/s and CPU-seconds (all threads and worker processes).
4. For every fit-table row (experiments/results/tpu_fit): tokens per step per host over the
   roofline step bound = tokens/s each host consumes, and the cores each mode needs to produce
   twice that (tokens per CPU-second of the mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORK = os.path.join(ROOT, "experiments", "runs", "bench_input")
REPORT = os.path.join(ROOT, "experiments", "results", "input_pipeline.md")
MODES = {  # name -> (pretokenize, read_threads, read_workers)
    "on the fly, 0 threads": (False, 0, 0),
    "on the fly, 1 thread": (False, 1, 0),
    "on the fly, 2 threads": (False, 2, 0),
    "on the fly, 1 worker process": (False, 0, 1),
    "on the fly, 2 worker processes": (False, 0, 2),
    "pretokenized, 0 threads": (True, 0, 0),
    "pretokenized, 1 worker process": (True, 0, 1),
}
SEQ_LEN, BATCH = 1024, 32


def _psutil():
    import psutil  # requirements-eval.txt has it (lm-eval's closure)

    return psutil


def make_corpus(directory: str, gigabytes: float, files: int = 16, seed: int = 0) -> list[str]:
    """JSONL files of reshuffled KJV verses, about `gigabytes` in all; reused when present."""
    from mile.data import corpus

    done = os.path.join(directory, "done.json")
    if os.path.exists(done) and json.load(open(done))["gigabytes"] == gigabytes:
        return json.load(open(done))["files"]
    os.makedirs(directory, exist_ok=True)
    kjv = corpus.fetch_kjv(os.path.join(WORK, "kjv-cache"))
    verses = [v for doc in corpus.read_documents([kjv]) for v in doc.split("\n")]
    rng = np.random.default_rng(seed)
    target = int(gigabytes * 2**30 / files)
    paths = []
    for f in range(files):
        path = os.path.join(directory, f"part-{f:03d}.jsonl")
        written = 0
        with open(path, "w", encoding="utf-8") as out:
            while written < target:
                starts = rng.integers(0, len(verses), size=1000)
                lengths = rng.integers(10, 50, size=1000)
                lines = [
                    json.dumps({"text": " ".join(verses[s] for s in rng.integers(0, len(verses), n))}) + "\n"
                    for s, n in zip(starts, lengths)
                ]
                chunk = "".join(lines)
                out.write(chunk)
                written += len(chunk.encode("utf-8"))
        paths.append(path)
    json.dump({"gigabytes": gigabytes, "files": paths}, open(done, "w"))
    return paths


def default_tokenizer() -> str:
    """The CPU default's tokenizer: SentencePiece, 8000 pieces, trained on the KJV's train split."""
    from mile import data as mdata

    prepared = mdata.prepare({"source": "kjv", "cache_dir": os.path.join(WORK, "kjv-cache")})
    return str(prepared.tokenizer.path)


def _prepare_argv(files_dir: str, tokenizer: str, cache: str, workers: int, pretokenize: bool) -> list[str]:
    return [
        sys.executable, "-m", "mile.prepare", "--config", os.path.join(ROOT, "configs", "cpu.py"),
        "--config.data.source=text", f"--config.data.text_files={files_dir}", f"--config.data.tokenizer={tokenizer}",
        f"--config.data.cache_dir={cache}", f"--config.data.pretokenize={str(pretokenize).lower()}",
        "--workers", str(workers),
    ]  # fmt: skip


def run_sampled(argv: list[str]) -> dict:
    """Runs a command, sampling the summed RSS of its process tree; wall seconds and peaks."""
    psutil = _psutil()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_sum = peak_one = 0
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            rss = [p.memory_info().rss for p in tree]
        except psutil.Error:
            rss = [0]
        peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out[-2000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_gib": peak_sum / 2**30, "peak_one_gib": peak_one / 2**30}


def _size(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def bench_preparation(files: list[str], subset: list[str], tokenizer: str) -> list[dict]:
    rows = []
    corpus_dir, subset_dir = os.path.dirname(files[0]), os.path.dirname(subset[0])
    for workers in (1, 2):
        cache = os.path.join(WORK, f"cache-text-w{workers}")
        subprocess.run(["rm", "-rf", cache], check=True)
        r = run_sampled(_prepare_argv(corpus_dir, tokenizer, cache, workers, False))
        mb = _size(files) / 2**20
        rows.append({"stage": "text store", "corpus_mb": mb, "workers": workers, **r, "mb_per_s": mb / r["seconds"]})
        print(f"  text store, {workers} worker(s): {r['seconds']:.1f} s, {mb / r['seconds']:.0f} MB/s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
        subprocess.run(["rm", "-rf", cache], check=True)
    # The default data.tokenizer=train: the text store, then SentencePiece trained on a sample of
    # it (configs/cpu.py's tokenizer_max_docs), in the same process.
    cache = os.path.join(WORK, "cache-text-train")
    subprocess.run(["rm", "-rf", cache], check=True)
    r = run_sampled(_prepare_argv(corpus_dir, "train", cache, 1, False))
    mb = _size(files) / 2**20
    rows.append({"stage": "text store + tokenizer trained", "corpus_mb": mb, "workers": 1, **r, "mb_per_s": mb / r["seconds"]})
    print(f"  text store + tokenizer trained: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    subprocess.run(["rm", "-rf", cache], check=True)
    for workers in (1, 2):
        cache = os.path.join(WORK, f"cache-tokens-w{workers}")
        subprocess.run(["rm", "-rf", cache], check=True)
        run_sampled(_prepare_argv(subset_dir, tokenizer, cache, 1, False))  # the text store, untimed
        r = run_sampled(_prepare_argv(subset_dir, tokenizer, cache, workers, True))
        tokens = _store_tokens(cache)
        mb = _size(subset) / 2**20
        rows.append(
            {"stage": "token store", "corpus_mb": mb, "workers": workers, **r, "mb_per_s": mb / r["seconds"],
             "tokens_per_s": tokens / r["seconds"]}
        )  # fmt: skip
        print(f"  token store, {workers} worker(s): {r['seconds']:.1f} s, {tokens / r['seconds'] / 1e6:.2f}M tokens/s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)  # fmt: skip
    return rows


def _store_tokens(cache: str) -> int:
    tokens_root = os.path.join(cache, "tokens")
    (name,) = os.listdir(tokens_root)
    return json.load(open(os.path.join(tokens_root, name, "manifest.json")))["counts"]["tokens"]


def _data_cfg(subset_dir: str, tokenizer: str, cache: str, mode: str) -> dict:
    pretokenize, threads, workers = MODES[mode]
    return {
        "source": "text", "text_files": (subset_dir,), "tokenizer": tokenizer, "cache_dir": cache,
        "pretokenize": pretokenize, "read_threads": threads, "read_workers": workers,
        "seq_len": SEQ_LEN, "global_batch_size": BATCH,
    }  # fmt: skip


def measure_mode(subset_dir: str, tokenizer: str, cache: str, mode: str, seconds: float) -> dict:
    """In this process: the training iterator of `mode`, its tokens/s and CPU-seconds."""
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from mile import data as mdata

    psutil = _psutil()
    cfg = _data_cfg(subset_dir, tokenizer, cache, mode)
    it = mdata.train_iterator(cfg, mdata.prepare(cfg))
    for _ in range(3):
        next(it)
    me = psutil.Process()

    def cpu():
        total = sum(me.cpu_times()[:2])
        for child in me.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return total

    cpu0, t0, batches = cpu(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next(it)
        batches += 1
    wall, used = time.perf_counter() - t0, cpu() - cpu0
    tokens = batches * BATCH * SEQ_LEN
    return {"mode": mode, "tokens_per_s": tokens / wall, "cpu_s_per_s": used / wall, "tokens_per_cpu_s": tokens / used}


def bench_throughput(subset: list[str], tokenizer: str, seconds: float) -> list[dict]:
    subset_dir = os.path.dirname(subset[0])
    cache = os.path.join(WORK, "cache-tokens-w1")  # text and token stores of the subset (bench_preparation)
    rows = []
    for mode in MODES:
        argv = [sys.executable, __file__, "--measure", mode, "--subset-dir", subset_dir, "--tokenizer", tokenizer,
                "--cache", cache, "--seconds", str(seconds)]  # fmt: skip
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {mode}: {row['tokens_per_s'] / 1e3:,.0f}k tokens/s, {row['cpu_s_per_s']:.2f} cores busy", flush=True)
    return rows


def slice_rows() -> list[dict]:
    """Tokens/s each host consumes, per fit-table row (MiLe rows; CE consumes the same)."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import fit_table

    rows = []
    for size, tpu, _ in fit_table.ROWS:
        runs = fit_table._compiles(size, "mile", tpu)
        fitting = {k: r for k, r in runs.items() if r["fits"]}
        if not fitting:
            continue
        r = fitting[min(fitting)]
        _, roof = fit_table._estimate(size, "mile", tpu, r)
        per_host = r["global_batch"]["tokens"] / r["hosts"]
        rows.append(
            {"model": size, "slice": tpu, "hosts": r["hosts"], "tokens_per_step_per_host": per_host,
             "step_s": roof["step_s_lower_bound"], "consumed_per_s": per_host / roof["step_s_lower_bound"]}
        )  # fmt: skip
    return rows


def report(args, prep: list[dict], modes: list[dict], slices: list[dict]) -> str:
    lines = [
        "# Input pipeline against what each TPU slice consumes",
        "",
        f"Command: `python experiments/bench_input.py --corpus-gb {args.corpus_gb} --seconds {args.seconds}` "
        f"({time.strftime('%Y-%m-%d')}, this 2-core CPU host; seq_len {SEQ_LEN}, {BATCH} sequences per batch, "
        "one data stream, tokenizer: the CPU default's 8000-piece SentencePiece).",
        "",
        "## Preparation (`python -m mile.prepare`)",
        "",
        "| stage | corpus MB | --workers | wall s | MB/s | M tokens/s | peak RSS, all processes (GiB) | largest process (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in prep:
        tps = f"{r['tokens_per_s'] / 1e6:.2f}" if "tokens_per_s" in r else "–"
        lines.append(
            f"| {r['stage']} | {r['corpus_mb']:,.0f} | {r['workers']} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | {tps} | "
            f"{r['peak_rss_gib']:.2f} | {r['peak_one_gib']:.2f} |"
        )
    lines += [
        "",
        "## The training iterator, one process",
        "",
        "| mode | tokens/s | cores busy | tokens per CPU-second |",
        "|---|---|---|---|",
    ]
    for r in modes:
        lines.append(
            f"| {r['mode']} | {r['tokens_per_s']:,.0f} | {r['cpu_s_per_s']:.2f} | {r['tokens_per_cpu_s']:,.0f} |"
        )
    by_mode = {r["mode"]: r["tokens_per_cpu_s"] for r in modes}
    names = ["on the fly, 0 threads", "on the fly, 2 worker processes", "pretokenized, 0 threads"]
    lines += [
        "",
        "## What each slice consumes, and the cores a host needs to produce twice that",
        "",
        "Consumed = tokens per step per host / the roofline step bound (fit table, MiLe rows). Cores "
        "= 2 x consumed / tokens per CPU-second of the mode (above).",
        "",
        "| model | slice | hosts | tokens per step per host | step >= s | consumed tokens/s per host | "
        + " | ".join(f"cores: {n}" for n in names)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    for s in slices:
        cores = " | ".join(f"{2 * s['consumed_per_s'] / by_mode[n]:.2f}" for n in names)
        lines.append(
            f"| {s['model']} | {s['slice']} | {s['hosts']} | {s['tokens_per_step_per_host']:,.0f} | {s['step_s']:.2f} | "
            f"{s['consumed_per_s']:,.0f} | {cores} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus-gb", type=float, default=2.0)
    parser.add_argument("--subset-files", type=int, default=2, help="of 16: the throughput corpus")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per iterator mode")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--subset-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_mode(args.subset_dir, args.tokenizer, args.cache, args.measure, args.seconds)))
        return
    print("corpus and tokenizer", flush=True)
    files = make_corpus(os.path.join(WORK, "corpus"), args.corpus_gb)
    subset_dir = os.path.join(WORK, "subset")
    os.makedirs(subset_dir, exist_ok=True)
    subset = []
    for f in files[: args.subset_files]:
        link = os.path.join(subset_dir, os.path.basename(f))
        if not os.path.exists(link):
            os.symlink(f, link)
        subset.append(link)
    tokenizer = default_tokenizer()
    print("preparation", flush=True)
    prep = bench_preparation(files, subset, tokenizer)
    print("training iterator", flush=True)
    modes = bench_throughput(subset, tokenizer, args.seconds)
    text = report(args, prep, modes, slice_rows())
    with open(REPORT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
