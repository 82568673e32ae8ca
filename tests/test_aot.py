"""Ahead-of-time compilation for TPU slices (python -m mile.aot), from this CPU host."""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import tiny
from mile import aot, flops
from train_helpers import REPO


@pytest.mark.parametrize(
    "name, topology, chips",
    [  # Google Cloud's documented slice shapes
        ("v5p-8", "v5p:2x2x1", 4),
        ("v5p-64", "v5p:2x4x4", 32),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-8", "v4:2x2x1", 4),
        ("v4-512", "v4:4x8x8", 256),
        ("v5e-4", "v5e:2x2", 4),
        ("v5e-16", "v5e:4x4", 16),
        ("v5litepod-32", "v5e:4x8", 32),
        ("v5e-256", "v5e:16x16", 256),
        ("v6e-8", "v6e:2x4", 8),
        ("v5p:4x4x12", "v5p:4x4x12", 192),
    ],
)
def test_slice_names_map_to_topologies(name, topology, chips):
    tpu = aot.parse_slice(name)
    assert (tpu.topology, tpu.chips) == (topology, chips)


@pytest.mark.parametrize("name", ["v5p-6", "v5p-2", "v5e-512", "v7-8", "v5p:2x2", "tpu"])
def test_bad_slice_names_say_what_to_type(name):
    with pytest.raises(ValueError, match="e.g. v5p-64"):
        aot.parse_slice(name)


def test_microbatch_search_finds_the_smallest_fitting_count(monkeypatch):
    # The search logic against a memory rule (fits from 8 micro-batches): it must find 8 and
    # compile fewer counts than the 7 candidates 1..64.
    cfg = tiny.get_config()
    cfg.data.global_batch_size = 256  # 64 rows per shard on 4 chips: candidates 1, 2, ..., 64
    compiled = []

    def fake_report(cfg, tpu, devices):
        k = cfg.optim.num_microbatches
        compiled.append(k)
        return {"fits": k >= 8, "compile_s": 0.0, "memory_per_chip_gib": {"total": 64.0 / k}}

    monkeypatch.setattr(aot, "topology_devices", lambda tpu: __import__("jax").devices()[:4])
    monkeypatch.setattr(aot, "compile_report", fake_report)
    report, attempts = aot.find_microbatches(cfg, aot.parse_slice("v5e-4"), log=lambda _: None)
    assert report["fits"] and attempts[-1]["num_microbatches"] in compiled
    assert min(a["num_microbatches"] for a in attempts if a["fits"]) == 8
    assert max(a["num_microbatches"] for a in attempts if not a["fits"]) == 4
    assert compiled[0] == 1 and len(compiled) < 7


def test_without_libtpu_the_tool_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed: import raises
    with pytest.raises(ValueError, match="pip install -r requirements-tpu.txt"):
        aot.topology_devices(aot.parse_slice("v5e-4"))


# --- compiles with libtpu ------------------------------------------------------------------------


@pytest.fixture
def libtpu():
    return pytest.importorskip("libtpu", reason="libtpu (requirements-tpu.txt) compiles for TPU slices")


def test_topology_has_the_slice_chips_and_hosts(libtpu):
    before = dict(os.environ)
    devices = aot.topology_devices(aot.parse_slice("v5p-64"))
    assert dict(os.environ) == before  # no TPU worker variables leak to child processes
    assert len(devices) == 32 and len({d.process_index for d in devices}) == 8  # 4 chips per host
    assert flops.chip_for_device_kind(devices[0].device_kind) is flops.CHIPS["v5p"]
    devices = aot.topology_devices(aot.parse_slice("v5e-16"))
    assert len(devices) == 16 and flops.chip_for_device_kind(devices[0].device_kind) is flops.CHIPS["v5e"]


def _shapes(hlo_type: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", hlo_type)]


def test_tiny_step_fits_v5e_4_and_gathers_no_unembedding_or_logits(libtpu):
    cfg = tiny.get_config()  # data parallel over 4 chips: parameters replicated
    report = aot.compile_report(cfg, aot.parse_slice("v5e-4"))
    assert report["fits"] and report["chips"] == 4 and report["mesh"]["data"] == 4
    memory = report["memory_per_chip_gib"]
    assert 0 < memory["total"] < 1 and report["margin_gib"] > 15
    kinds = report["collectives"]["counts"]
    assert kinds.get("all-reduce", 0) >= 1  # the gradient and loss-term sums
    vocab = cfg.model.vocab_size
    gathered = [
        s
        for c in report["collectives"]["instructions"]
        if c["kind"] == "all-gather"
        for s in _shapes(c["type"])
    ]
    assert not [s for s in gathered if vocab in s], gathered
    assert "all-gather" not in kinds  # nothing at all is gathered under pure data parallelism
    # By hand: each chip all-reduces every float32 gradient once, 2 (n-1)/n x 4 bytes per
    # parameter in the ring model, plus a few scalars (loss terms, the finite flag).
    gradients = 2 * 3 / 4 * 4 * flops.param_counts(cfg.model)["total"]
    sent = report["communication"]["bytes_by_kind"]
    assert gradients <= sent["all-reduce"] < gradients * 1.01, (sent, gradients)
    assert report["communication"]["bytes_per_chip"] == sent["all-reduce"]
    roof = report["roofline_estimate"]
    assert roof["communication_bound_s"] == pytest.approx(sent["all-reduce"] / flops.CHIPS["v5e"].link_bytes_per_s)
    assert roof["step_s_lower_bound"] == max(roof["compute_bound_s"], roof["hbm_bound_s"], roof["communication_bound_s"])
    assert report["flops"]["model_flops_per_token"] == flops.model_flops_per_token(
        cfg.model, cfg.data.seq_len
    )


def test_fsdp_step_gathers_weights_but_never_logits(libtpu):
    cfg = tiny.get_config()
    cfg.mesh.update(data=1, fsdp=4)
    report = aot.compile_report(cfg, aot.parse_slice("v5e-4"))
    assert report["fits"]
    gathered = [
        s
        for c in report["collectives"]["instructions"]
        if c["kind"] == "all-gather"
        for s in _shapes(c["type"])
    ]
    assert gathered  # FSDP gathers each weight before use
    tokens_per_chip = cfg.data.global_batch_size * cfg.data.seq_len // 4
    vocab = cfg.model.vocab_size
    logits_like = [s for s in gathered if vocab in s and any(d >= tokens_per_chip for d in s if d != vocab)]
    assert not logits_like, logits_like


def test_materialised_head_needs_far_more_memory_than_the_fused_one(libtpu):
    # 2048 tokens per chip x 16384 vocab: the materialised head holds the logits (and their
    # softmax) in HBM, the fused one 256-token tiles. (Small temporaries never reach HBM on a TPU,
    # which is why the logits here are made large.)
    temps = {}
    for head in ("fused", "materialised"):
        cfg = tiny.get_config()
        cfg.model.vocab_size = 16384
        cfg.data.update(vocab_size=16384, global_batch_size=256)
        cfg.loss.update(head=head, chunk_size=256)
        report = aot.compile_report(cfg, aot.parse_slice("v5e-4"))
        assert report["fits"] and report["loss"]["head"] == head
        temps[head] = report["memory_per_chip_gib"]["temp"]
    logits_gib = 2048 * 16384 * 4 / 2**30  # one float32 copy of this chip's logits
    assert temps["materialised"] > temps["fused"] + logits_gib, temps
    assert temps["fused"] < logits_gib / 8, temps


def test_command_line_writes_json_and_reports_bad_input_in_one_line(libtpu, tmp_path):
    out = tmp_path / "fit.json"
    cmd = [sys.executable, "-m", "mile.aot", "--config", "configs/tiny.py", "--topology", "v5e-4"]
    run = subprocess.run(
        [*cmd, "--find-microbatches", "--config.loss.name=ce", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fits" in run.stdout and "collectives" in run.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["num_microbatches"] == 1 and report["loss"]["name"] == "ce"
    assert report["overrides"] == ["--config.loss.name=ce"]
    for args, message in (
        (["--topology", "v9-8"], "unknown TPU slice"),
        (["--topology", "v5e-4", "--config.loss.nme=ce"], "unknown config key"),
        (["--topology", "v5e-4", "--config.loss.head=sparse"], "loss.head"),
    ):
        bad = subprocess.run([*cmd[:-2], *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
