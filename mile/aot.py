"""Compile the real training step for a TPU slice from any host, and say whether it fits.

    python -m mile.aot --config configs/paper.py:6.7b,mile --topology v5p-64
    python -m mile.aot --config configs/paper.py:468m,ce --topology v5e-16 --find-microbatches --json fit.json

No TPU is needed: libtpu (requirements-tpu.txt) compiles for a described slice ahead of time. The
step is `mile.step.jit_train_step`, the function the training loop runs, lowered with abstract
(never allocated) state and batch. Reported per chip: the compiled memory against the chip's HBM,
the collectives in the compiled program and the bytes each chip sends through them per step
(`mile.hlo_traffic`), analytic model FLOPs and a roofline estimate of the step time and MFU
(compute, HBM and link bounds). Chip figures come from `mile.flops.CHIPS` (published peaks: estimates).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import Counter

from mile.hlo_traffic import collective_traffic

# Slice name prefix -> (topology prefix, TensorCores per chip counted in the slice name, grid rank).
# v4 and v5p slices are named by TensorCores (v5p-64 = 32 chips, 3-D torus); v5e and v6e by chips (2-D).
_GENERATIONS = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v5litepod": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}
_ACCELERATOR_TYPE = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}  # libtpu's names
_MAX_CHIPS_2D = 256
_EXAMPLES = "e.g. v5p-64, v5e-16, v4-8, v6e-256, or a topology such as v5p:2x4x4"


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as the user typed it
    generation: str  # key of mile.flops.CHIPS
    topology: str  # libtpu topology string, e.g. "v5p:2x4x4"
    chips: int


def _grid(chips: int, rank: int) -> list[int]:
    """The standard slice shape: from the smallest grid, double the last of the smallest sides
    (v5p-64 = 32 chips -> 2x4x4, v5e-16 -> 4x4, v5e-256 -> 16x16)."""
    dims = [2, 2, 1] if rank == 3 else [1, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        last = max(i for i, d in enumerate(dims) if d == smallest)
        dims[last] *= 2
    return dims


def parse_slice(name: str) -> Slice:
    """`v5p-64` / `v5e-16` / `v4-8` / `v6e-256`, or a raw topology such as `v5p:4x4x12`."""
    text = name.strip().lower()
    raw = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", text)
    if raw:
        prefix, dims = raw.group(1), [int(d) for d in raw.group(2).split("x")]
        if prefix not in _GENERATIONS or len(dims) != _GENERATIONS[prefix][2] or min(dims) < 1:
            raise ValueError(f"unknown TPU topology {name!r}; {_EXAMPLES}")
        gen = _GENERATIONS[prefix][0]
        return Slice(name, gen, f"{gen}:{raw.group(2)}", math.prod(dims))
    named = re.fullmatch(r"(v\w+?)-(\d+)", text)
    if not named or named.group(1) not in _GENERATIONS:
        raise ValueError(f"unknown TPU slice {name!r}; {_EXAMPLES}")
    gen, cores_per_chip, rank = _GENERATIONS[named.group(1)]
    size = int(named.group(2))
    chips = size // cores_per_chip
    smallest = 4 if rank == 3 else 1
    if (
        size % cores_per_chip
        or chips < smallest
        or chips & (chips - 1)
        or (rank == 2 and chips > _MAX_CHIPS_2D)
    ):
        raise ValueError(
            f"{name!r} is not a standard {named.group(1)} slice (a power of two, "
            f"{smallest * cores_per_chip}..{_MAX_CHIPS_2D * cores_per_chip if rank == 2 else 'any'}); "
            f"pass its topology instead, {_EXAMPLES}"
        )
    return Slice(name, gen, f"{gen}:{'x'.join(map(str, _grid(chips, rank)))}", chips)


def _libtpu_environment(tpu: Slice) -> dict[str, str]:
    """Environment for a compile-only libtpu: without these it looks for TPU metadata and worker
    hostnames, warns, and takes a process-wide lock that a second compile (or a test run) would hit."""
    accelerator = f"{_ACCELERATOR_TYPE[tpu.generation]}-{tpu.chips * _GENERATIONS[tpu.generation][1]}"
    return {
        "TPU_ACCELERATOR_TYPE": accelerator,
        "TPU_WORKER_HOSTNAMES": "localhost",
        "TPU_SKIP_MDS_QUERY": "1",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    }


def topology_devices(tpu: Slice):
    """Compile-only devices of the slice (one per chip; v4 and v5p as megacore, like JAX on them)."""
    try:
        import libtpu  # noqa: F401  (only to give a clear message when it is missing)
    except ImportError:
        raise ValueError("libtpu is not installed; pip install -r requirements-tpu.txt") from None
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if tpu.generation in ("v4", "v5p") else {}
    # libtpu reads these once, when it initialises. They are removed again afterwards: left in
    # the environment, a TPU worker hostname makes child processes (launch.py) believe they run
    # on a multi-host cluster.
    added = {k: v for k, v in _libtpu_environment(tpu).items() if k not in os.environ}
    os.environ.update(added)
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology, **kwargs).devices
    finally:
        for key in added:
            os.environ.pop(key, None)


# ---------------------------------------------------------------------------------------------
# What the compiled program says.
# ---------------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)


def collectives(hlo_text: str) -> list[dict[str, str]]:
    """Every collective instruction of a compiled HLO module: its kind and result type.

    An async pair (`all-gather-start` / `-done`) counts once. These are static instructions: one
    inside a loop body (micro-batches, scanned layers) runs once per iteration.
    """
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            found.append({"kind": match.group("op"), "type": re.sub(r"\{[^}]*\}", "", match.group("type"))})
    return found


def _gib(n: float) -> float:
    return n / 2**30


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if abs(gib) >= 0.1 else f"{gib * 1024:.2f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and "hbm" in text


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else repr(error)


def flops_and_roofline(cfg, chips: int, chip, io_bytes: float, sent_bytes: float | None) -> tuple[dict, dict]:
    """Analytic model FLOPs of a step, and a roofline estimate of its time on `chips` x `chip`.

    step >= max(hardware FLOPs per chip / peak bf16, io_bytes / HBM bandwidth, sent_bytes /
    link bandwidth): every argument is read and every output written at least once per step,
    and each chip sends `sent_bytes` through collectives (`mile.hlo_traffic`; None: not counted).
    Each term assumes its resource runs flat out with nothing else in the way, so the maximum
    is a lower bound on the step time and an upper bound on MFU, from published chip figures."""
    from mile import flops

    rows, seq = cfg.data.global_batch_size, cfg.data.seq_len
    params = flops.param_counts(cfg.model)
    per_token = flops.model_flops_per_token(cfg.model, seq)
    model_per_chip = per_token * rows * seq / chips
    hardware_per_chip = flops.hardware_flops_per_token(cfg.model, seq) * rows * seq / chips
    bounds = {
        "compute": hardware_per_chip / chip.peak_bf16_flops,
        "hbm": io_bytes / chip.hbm_bytes_per_s,
        "communication": 0.0 if sent_bytes is None else sent_bytes / chip.link_bytes_per_s,
    }
    step_s = max(bounds.values())
    counts = {
        "params": params["total"],
        "non_embedding_params": params["non_embedding"],
        "model_flops_per_token": per_token,
        "model_flops_per_step_per_chip": model_per_chip,
        "hardware_flops_per_step_per_chip": hardware_per_chip,
    }
    roofline = {
        "peak_bf16_tflops": chip.peak_bf16_flops / 1e12,
        "hbm_gb_per_s": chip.hbm_bytes_per_s / 1e9,
        "link_gb_per_s": chip.link_bytes_per_s / 1e9,
        "compute_bound_s": bounds["compute"],
        "hbm_bound_s": bounds["hbm"],
        "communication_bound_s": None if sent_bytes is None else bounds["communication"],
        "step_s_lower_bound": step_s,
        "bound_by": max(bounds, key=bounds.get),
        "tokens_per_s_per_chip_upper_bound": rows * seq / chips / step_s,
        "mfu_upper_bound": model_per_chip / chip.peak_bf16_flops / step_s,
    }
    return counts, roofline


def compile_report(cfg, tpu: Slice, devices=None) -> dict:
    """Compile `cfg`'s train step for `tpu` and describe it (a JSON-ready dict).

    A program the compiler rejects for memory is reported as not fitting, with its message.
    Raises ValueError for a config that cannot run on the slice at all (mesh, batch split).
    """
    import jax

    from mile import flops, train
    from mile import sharding as msharding
    from mile import state as mstate
    from mile import step as mstep

    devices = topology_devices(tpu) if devices is None else devices
    chip = flops.CHIPS[tpu.generation]
    hosts = len({d.process_index for d in devices})
    mesh = msharding.make_mesh(cfg.mesh, devices=devices)
    spec = train.check_config(cfg, mesh)
    rows, seq = cfg.data.global_batch_size, cfg.data.seq_len
    if rows % hosts:
        raise ValueError(
            f"data.global_batch_size={rows} is not divisible by the slice's {hosts} hosts; use a multiple of {hosts}"
        )
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    graphdef, abstract_state = msharding.abstract_sharded(mstate.state_builder(cfg), mesh, rules)
    state_shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    batch = _abstract_batch(mesh, rows, seq)
    step = mstep.jit_train_step(cfg, graphdef, spec, mesh, state_shardings)

    report = {
        "slice": tpu.name,
        "topology": tpu.topology,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "hosts": hosts,
        "mesh": dict(mesh.shape),
        "global_batch": {"sequences": rows, "seq_len": seq, "tokens": rows * seq},
        "num_microbatches": cfg.optim.num_microbatches,
        "rows_per_chip_per_microbatch": rows // (train.data_parallel_size(mesh) * cfg.optim.num_microbatches),
        "loss": {"name": spec.name, "head": cfg.loss.head},
        "remat": cfg.model.remat,
        "hbm_gib": chip.hbm_gib,
    }
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = step.lower(abstract_state, batch).compile()
    except Exception as e:  # XLA raises JaxRuntimeError / XlaRuntimeError
        if not _is_out_of_memory(e):
            raise
        report.update(compile_s=time.perf_counter() - start, fits=False, **_rejection(e))
        return report
    report["compile_s"] = time.perf_counter() - start
    parts = _memory_parts(compiled)
    report.update(_fit(parts, chip))
    hlo = compiled.as_text()
    found = collectives(hlo)
    report["collectives"] = {"counts": dict(Counter(c["kind"] for c in found)), "instructions": found}
    report["communication"] = collective_traffic(hlo, len(devices))
    report["flops"], report["roofline_estimate"] = flops_and_roofline(
        cfg, len(devices), chip, parts["arguments"] + parts["outputs"], report["communication"]["bytes_per_chip"]
    )
    return report


def _abstract_batch(mesh, rows: int, seq: int) -> dict:
    """ShapeDtypeStructs of a global token batch, sharded as the loop shards it."""
    import jax
    import jax.numpy as jnp

    from mile import sharding as msharding

    shard = msharding.batch_sharding(mesh)
    tokens = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=shard)
    return {"inputs": tokens, "targets": tokens, "mask": jax.ShapeDtypeStruct((rows, seq), jnp.float32, sharding=shard)}


def _rejection(e: Exception) -> dict:
    """What a compile rejected for memory says, with the numbers where XLA gives them."""
    out = {"compile_error": _first_line(e)}
    # "... HLO temporaries (143.71G) exceeds available HBM (95.74G)": keep the numbers.
    needed = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
    if needed:
        out["temp_gib_required"], out["hbm_available_gib"] = map(float, needed.groups())
    return out


def _memory_parts(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    return {
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
    }


def _fit(parts: dict[str, int], chip) -> dict:
    """Per-chip memory (GiB) against the chip's HBM: the total, whether it fits, the margin."""
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temp"] + parts["code"]
    hbm = chip.hbm_gib * 2**30
    return {
        "memory_per_chip_gib": {**{k: _gib(v) for k, v in parts.items()}, "total": _gib(total)},
        "fits": total <= hbm,
        "margin_gib": _gib(hbm - total),
    }


def microbatch_candidates(cfg, data_parallel: int) -> list[int]:
    """1, 2, 4, ... while every micro-batch still gives each data-parallel shard whole rows."""
    rows_per_shard = cfg.data.global_batch_size // max(data_parallel, 1)
    counts, k = [], 1
    while k <= rows_per_shard:
        if rows_per_shard % k == 0:
            counts.append(k)
        k *= 2
    return counts


def find_microbatches(cfg, tpu: Slice, log=print) -> tuple[dict, list[dict]]:
    """The smallest micro-batch count of 1, 2, 4, ... that fits, and one summary per compile.

    1 is tried first; after that the counts are bisected (more micro-batches never need more
    memory), so a search over 1..64 takes about four compiles, not seven. Returns the report of
    the count found, or of the largest count tried when none fits.
    """
    from mile import sharding as msharding
    from mile import train

    devices = topology_devices(tpu)
    mesh = msharding.make_mesh(cfg.mesh, devices=devices)
    candidates = microbatch_candidates(cfg, train.data_parallel_size(mesh))
    attempts, reports = [], {}

    def fits(i: int) -> bool:
        cfg.optim.num_microbatches = candidates[i]
        report = reports[i] = compile_report(cfg, tpu, devices)
        total = report.get("memory_per_chip_gib", {}).get("total")
        attempt = {"num_microbatches": candidates[i], "fits": report["fits"], "total_gib": total}
        attempts.append({**attempt, "compile_s": report["compile_s"]})
        shown = (
            f"{total:.2f} GiB per chip" if total is not None else "rejected by the compiler (out of memory)"
        )
        verdict = "fits" if report["fits"] else "does not fit"
        log(f"  {candidates[i]:4d} micro-batches: {shown}, {verdict} ({report['compile_s']:.1f} s)")
        return report["fits"]

    found = 0
    if not fits(0):
        bad, good = 0, len(candidates)  # candidates[bad] does not fit; candidates[good] fits (or is past the end)
        while good - bad > 1:
            mid = (bad + good) // 2
            if fits(mid):
                good = mid
            else:
                bad = mid
        found = good if good < len(candidates) else bad
    cfg.optim.num_microbatches = candidates[found]  # the count reported, not the last one tried
    return reports[found], attempts


# ---------------------------------------------------------------------------------------------
# Printing and the command line.
# ---------------------------------------------------------------------------------------------


def format_report(report: dict, config_name: str) -> str:
    lines = [f"mile.aot: {config_name} on {report['slice']} (topology {report['topology']})"]
    add = lambda label, text: lines.append(f"  {label:<17}{text}")
    add("chips", f"{report['chips']} x {report['device_kind']}, {report['hosts']} host(s)")
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    gb = report["global_batch"]
    add("mesh", f"{mesh}; global batch {gb['sequences']} x {gb['seq_len']} = {gb['tokens']:,} tokens")
    add(
        "micro-batches",
        f"{report['num_microbatches']} ({report['rows_per_chip_per_microbatch']} sequences per chip each); "
        f"loss {report['loss']['name']}, {report['loss']['head']} head",
    )
    add("compile", f"{report['compile_s']:.1f} s")
    hbm = report["hbm_gib"]
    if "memory_per_chip_gib" not in report:
        add("memory/chip", f"DOES NOT FIT in {hbm:g} GiB HBM: {report['compile_error']}")
        return "\n".join(lines)
    m = report["memory_per_chip_gib"]
    add(
        "memory/chip",
        ", ".join(f"{k} {_size(m[k])}" for k in ("arguments", "outputs", "aliased", "temp", "code")),
    )
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    margin = report["margin_gib"]
    add(
        "",
        f"total {_size(m['total'])} of {hbm:g} GiB HBM: {verdict}, margin {margin:+.2f} GiB ({margin / hbm:+.0%})",
    )
    counts = report["collectives"]["counts"]
    add("collectives", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
    traffic = report["communication"]
    sent = ", ".join(f"{k} {_size(_gib(v))}" for k, v in traffic["bytes_by_kind"].items() if v)
    unread = traffic["unread_trip_counts"]
    add(
        "sent/chip (est.)",
        f"{_size(_gib(traffic['bytes_per_chip']))} per step through collectives ({sent or 'none'})"
        + (f"; {unread} loop(s) of unread trip count counted once" if unread else ""),
    )
    f, r = report["flops"], report["roofline_estimate"]
    add(
        "model FLOPs",
        f"{_count(f['params'])} params ({_count(f['non_embedding_params'])} non-embedding); "
        f"{f['model_flops_per_token']:.3e} per token, {f['model_flops_per_step_per_chip']:.3e} per step per chip",
    )
    add(
        "roofline (est.)",
        f"step >= {r['step_s_lower_bound']:.4g} s (compute {r['compute_bound_s']:.4g} s at "
        f"{r['peak_bf16_tflops']:g} TFLOP/s{', with remat recompute' if report['remat'] == 'full' else ''}, "
        f"HBM {r['hbm_bound_s']:.4g} s, links {r['communication_bound_s']:.4g} s at {r['link_gb_per_s']:g} GB/s "
        f"sent); bound by {r['bound_by']}; MFU <= {r['mfu_upper_bound']:.0%}",
    )
    return "\n".join(lines)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Run configuration file (as for launch.py).")
    flags.DEFINE_string("topology", None, f"TPU slice to compile for: {_EXAMPLES}.")
    flags.DEFINE_bool(
        "find-microbatches", False, "Try 1, 2, 4, ... micro-batches; report the smallest that fits."
    )
    flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
    return config


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    # Compile on the host's CPU backend; the TPU is only described (a TPU VM keeps its chips free).
    # Set before the config file imports jax.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import flags, logging

    config = _define_flags()
    argv = sys.argv if argv is None else argv
    try:
        flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # --config.<unknown key>=...
        _fail(f"unknown config key ({e}); every key is listed in configs/base.py")
    except (flags.Error, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        _fail(lines[-1] if lines else repr(e))
    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    if config.value is None:
        _fail("--config is required, e.g. --config configs/paper.py:6.7b,mile")
    if not FLAGS.topology:
        _fail(f"--topology is required, {_EXAMPLES}")
    cfg = config.value
    config_name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_name is None and "--config" in argv:
        config_name = argv[argv.index("--config") + 1]
    try:
        tpu = parse_slice(FLAGS.topology)
        if FLAGS["find-microbatches"].value:
            print(f"finding the smallest micro-batch count that fits {FLAGS.topology}:")
            report, attempts = find_microbatches(cfg, tpu)
            report["microbatch_search"] = attempts
        else:
            report = compile_report(cfg, tpu)
    except ValueError as e:
        _fail(str(e))
    report["config"] = config_name
    report["overrides"] = [a for a in argv[1:] if a.startswith("--config.")]
    print(format_report(report, config_name))
    if FLAGS["find-microbatches"].value and not report["fits"]:
        print("  no micro-batch count fits: use a larger slice, more FSDP, or a smaller global batch")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
