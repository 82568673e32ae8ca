"""launch.py as 2 processes x 4 CPU devices (jax.distributed over gloo, localhost) against the
same config in one process with 8 devices: same batches, same losses and parameters; metrics
once; SIGKILL of both processes and a restart ends bit-identical; SIGTERM to one process, then to
both, stops both at one agreed step with a checkpoint and the reruns end bit-identical; a different
process count resumes. Every subprocess wait is bounded (see multiprocess_helpers)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from mile import data as mdata
from mile import sharding as msharding
from mile import state as mstate
from mile import train as T
from mile.checkpoint import Checkpointer
from mile.preemption import PREEMPTED_EXIT_CODE
from multiprocess_helpers import REPO, Job
from train_helpers import tiny_config, tiny_launch_argv

STEPS = 16
# Checkpoints every 4 steps; evaluation only after the last step (it still runs once).
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every": 4, "train.eval_every": 1000}
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A corpus with its dataset and tokenizer already cached, so the jobs only read them."""
    root = tmp_path_factory.mktemp("mp")
    mdata.prepare(tiny_config(root, **OVERRIDES).data)
    return root


def _config(root, **more):
    return tiny_config(root, **OVERRIDES, **more)


def _launch_argv(root, workdir, script="launch.py"):
    return tiny_launch_argv(root, workdir, OVERRIDES, script)


def _committed_steps(workdir):
    ckpts = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []


def _launch_job(root, workdir, log_name, *, hold_at=None):
    """launch.py as 2 processes on `workdir`, logging to root/log_name, sharing one compile cache.
    `hold_at`: both processes stop before their hold_at-th step until `_release` (tests/launch_with_faults.py)."""
    (root / log_name).mkdir()
    if hold_at is None:
        argv, env = _launch_argv(root, workdir), None
    else:
        argv = _launch_argv(root, workdir, "tests/launch_with_faults.py")
        env = {"MILE_TEST_HOLD_AT_CALL": str(hold_at), "MILE_TEST_HOLD_FILE": str(root / log_name / "release")}
    return Job(argv, num_processes=2, log_dir=root / log_name, compile_cache=root / "jit", env=env)


def _held(root, log_name, job):
    """Waits until both processes of `job` are held (see _launch_job)."""
    held = lambda: len(list((root / log_name).glob("release.p*"))) == 2
    _wait_until(held, job, "both processes held")


def _release(root, log_name):
    (root / log_name / "release").touch()


@pytest.fixture(scope="module")
def runs(root):
    """The runs the tests compare, made once:
    one     T.train in this process (8 devices) with data.shards=2: the 2-process data layout;
    two     launch.py, 2 processes, uninterrupted;
    killed  launch.py, 2 processes, both SIGKILLed after their first checkpoint, then restarted;
    other   a copy of `killed` at the kill, resumed here by one process."""
    out = {name: root / name for name in ("one", "two", "killed", "other")}
    T.train(_config(root, **{"data.shards": 2}), str(out["one"]))

    two = _launch_job(root, out["two"], "log_two")
    assert two.wait(JOB_TIMEOUT_S) == [0, 0], two.output()
    out["two_job"] = two

    job = _launch_job(root, out["killed"], "log_kill")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not _committed_steps(out["killed"]):
            assert all(p.poll() is None for p in job.procs), f"a process ended early:\n{job.output()}"
            assert time.monotonic() < deadline, f"no checkpoint in {JOB_TIMEOUT_S} s:\n{job.output()}"
            time.sleep(0.02)
    finally:
        job.kill()  # SIGKILL to both process groups
    assert [p.returncode for p in job.procs] == [-9, -9], job.output()
    out["killed_at"] = _committed_steps(out["killed"])[-1]
    assert out["killed_at"] < STEPS
    shutil.copytree(out["killed"], out["other"])

    restart = _launch_job(root, out["killed"], "log_restart")
    assert restart.wait(JOB_TIMEOUT_S) == [0, 0], restart.output()
    return out


def _wait_until(condition, job, what):
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not condition():
        if any(p.poll() is not None for p in job.procs) or time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"{what} never happened:\n{job.output()}")
        time.sleep(0.02)


def _preempt(job, targets, workdir, release, again=False):
    """SIGTERM to the processes `targets` of `job` while both are held, then `release()` them;
    (the agreed step, seconds to the last exit). Held steps leave many steps to go, however slow
    the machine, so the stop always comes before the run's end. `again`: a SIGINT to each target
    while it is stopping (the impatient operator's second signal), which must change nothing."""
    sent = time.monotonic()
    for i in targets:
        job.procs[i].send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the notice reaches the coordinator before the processes move on
    release()
    if again:
        time.sleep(0.2)
        for i in targets:
            if job.procs[i].poll() is None:
                job.procs[i].send_signal(signal.SIGINT)
    codes = job.wait(JOB_TIMEOUT_S)
    took = time.monotonic() - sent
    assert codes == [PREEMPTED_EXIT_CODE] * 2, job.output()
    # Each process stopped at the same step, and that step is the newest checkpoint.
    stopped = [re.findall(r"preempted at step (\d+) \(saved a checkpoint of it\)", job.output(i)) for i in (0, 1)]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], job.output()
    step = int(stopped[0][0])
    assert _committed_steps(workdir)[-1] == step, job.output()
    return step, took


@pytest.fixture(scope="module")
def preempted(root, runs):
    """launch.py as 2 processes: SIGTERM to process 1 only while both are held before step 6; the
    rerun gets SIGTERM to both while held before its 4th step, and a SIGINT to both while they
    stop; the third run finishes."""
    wd = root / "preempted"
    out = {"wd": wd}
    # Held before step 6 (after the checkpoint of step 4), then before the 4th step of the rerun.
    job = _launch_job(root, wd, "log_term_one", hold_at=6)
    _held(root, "log_term_one", job)
    out["first"], out["first_s"] = _preempt(job, [1], wd, lambda: _release(root, "log_term_one"))
    _restore(wd, out["first"])  # complete and verified
    job = _launch_job(root, wd, "log_term_both", hold_at=4)
    _held(root, "log_term_both", job)
    release = lambda: _release(root, "log_term_both")
    out["second"], out["second_s"] = _preempt(job, [0, 1], wd, release, again=True)
    _restore(wd, out["second"])
    job = _launch_job(root, wd, "log_term_rerun")
    assert job.wait(JOB_TIMEOUT_S) == [0, 0], job.output()
    print(f"SIGTERM to exit: {out['first_s']:.2f} s (one process), {out['second_s']:.2f} s (both)")
    return out


def test_sigterm_to_one_then_both_processes_stops_at_an_agreed_step_and_resumes_bit_identical(runs, preempted):
    assert 4 <= preempted["first"] < preempted["second"] < STEPS, preempted
    assert preempted["first_s"] < 120 and preempted["second_s"] < 120, preempted
    (a, data_a), (b, data_b) = _restore(runs["two"]), _restore(preempted["wd"])
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert data_a == data_b
    assert _logged_steps(preempted["wd"], "train/loss") == list(range(1, STEPS + 1))
    assert _last_per_step(preempted["wd"], "train/loss") == _last_per_step(runs["two"], "train/loss")


def _restore(workdir, step=STEPS):
    with Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=10) as ck:
        cfg = ml_collections.ConfigDict(ck.saved_config(step))
        cfg.sharding_rules = tuple(tuple(r) for r in cfg.sharding_rules)
        mesh = msharding.make_mesh(cfg.mesh)
        _, abstract = msharding.abstract_sharded(mstate.state_builder(cfg), mesh, cfg.sharding_rules)
        state, data_state = ck.restore(step, abstract)
    return jax.tree.map(np.asarray, state), data_state


def _last_per_step(workdir, key):
    """metrics.jsonl's value of `key` per step (the last row wins where a resume repeated steps)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r[key] for r in rows if key in r}


def test_two_processes_train_like_one_with_the_same_data_layout(runs):
    one, two = runs["one"], runs["two"]
    for key in ("train/loss", "train/grad_norm", "eval/ce"):
        a, b = _last_per_step(one, key), _last_per_step(two, key)
        assert a.keys() == b.keys() and len(a) >= 1
        np.testing.assert_allclose([b[s] for s in a], list(a.values()), rtol=2e-6, err_msg=key)
    (state1, data1), (state2, data2) = _restore(one), _restore(two)
    assert data1 == data2  # every stream at the same position
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), state1, state2)


def test_each_process_reads_its_own_stream_and_process_0_writes(runs):
    job, two = runs["two_job"], runs["two"]
    out0, out1 = job.output(0), job.output(1)
    assert "process 0: data streams [0] of 2" in out0, out0
    assert "process 1: data streams [1] of 2" in out1, out1
    # Progress, validation lines, metrics and config come from process 0 only, once.
    assert f"step {STEPS}/{STEPS}" in out0 and "validation CE" in out0
    assert "validation CE" not in out1 and not re.search(r"^step \d", out1, re.M), out1
    assert list(_last_per_step(two, "train/loss")) == list(range(1, STEPS + 1))
    with open(two / "metrics.jsonl") as f:
        assert len(f.readlines()) == STEPS + 1  # one row per step + the final evaluation
    assert len(os.listdir(two / "tb")) == 1
    with open(two / "config.json") as f:
        assert json.load(f)["train"]["steps"] == STEPS
    assert _committed_steps(two)[-1] == STEPS


def test_sigkill_of_both_processes_then_restart_is_bit_identical(runs):
    assert 0 < runs["killed_at"] < STEPS
    (a, data_a), (b, data_b) = _restore(runs["two"]), _restore(runs["killed"])
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert data_a == data_b
    assert _last_per_step(runs["killed"], "train/loss") == _last_per_step(runs["two"], "train/loss")
    # The resume cut metrics.jsonl back to the checkpoint: every step is written once, in order.
    assert _logged_steps(runs["killed"], "train/loss") == _logged_steps(runs["two"], "train/loss")


def _logged_steps(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if key in r]


def test_one_process_resumes_a_two_process_checkpoint(runs):
    """A different process count works: the checkpoint keeps both streams' positions and one
    process reads both (data.shards=0 resumes with the checkpoint's number of streams)."""
    other = runs["other"]
    with Checkpointer(os.path.join(other, "checkpoints"), max_to_keep=10) as ck:
        cfg = ml_collections.ConfigDict(ck.saved_config())
    cfg.sharding_rules = tuple(tuple(r) for r in cfg.sharding_rules)
    assert cfg.data.shards == 0
    T.train(cfg, str(other))
    (a, data_a), (b, data_b) = _restore(runs["two"]), _restore(other)
    assert data_a == data_b
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7), a, b)


def test_global_batch_of_two_processes_equals_one_process(root, tmp_path):
    """Each process's rows come from its own stream, and the gathered global batches equal the
    batches one process builds with the same number of streams."""
    cfg = _config(root)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg.to_json())
    worker = os.path.join(REPO, "tests", "multiprocess_helpers.py")
    job = Job([worker, str(cfg_path), str(tmp_path / "batches"), "3"], num_processes=2, log_dir=tmp_path)
    assert job.wait(JOB_TIMEOUT_S) == [0, 0], job.output()

    mesh = msharding.make_mesh(cfg.mesh)
    one = T.stream_batches(cfg, mdata.prepare(cfg.data), msharding.batch_sharding(mesh), num_streams=2)
    expected = [jax.tree.map(np.asarray, next(one)) for _ in range(3)]
    for p in range(2):
        got = np.load(tmp_path / f"batches.{p}.npz")
        assert list(got["streams"]) == [p]
        for t, batch in enumerate(expected):
            for name, array in batch.items():
                np.testing.assert_array_equal(got[f"{t}/{name}"], array, err_msg=f"process {p} {t}/{name}")
    # The two halves really are different documents (not one stream read twice).
    assert not np.array_equal(expected[0]["inputs"][:4], expected[0]["inputs"][4:])


def test_bad_multiprocess_input_is_one_line_on_every_process(root, tmp_path):
    argv = _launch_argv(root, tmp_path / "wd")
    # An incomplete process description: refused before any process waits for another.
    run = subprocess.run(
        [sys.executable, *argv, "--num_processes=2"],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (
        "error: a multi-process run needs --coordinator_address, --num_processes and --process_id; "
        "missing --coordinator_address, --process_id"
    )
    # Process 0 cannot build the data: both processes stop at once, each with one line.
    missing = f"--config.data.text_files={tmp_path / 'missing.txt'}"
    job = Job([*argv, missing], num_processes=2, log_dir=tmp_path)
    assert job.wait(JOB_TIMEOUT_S) == [2, 2], job.output()
    # Gloo's C++ logging shares the stream and may split a line around ours ("[Gloo] Rank 0error:
    # ...\n is connected to ..."), so find each error line wherever it starts.
    errors = [re.findall(r"error: [^\n]*", job.output(i)) for i in range(2)]
    assert len(errors[0]) == 1 and "missing.txt does not exist" in errors[0][0], job.output()
    assert errors[1] == [
        "error: process 0 could not prepare the data (its error says why); fix that and relaunch"
    ]
    assert "Traceback" not in job.output()
    assert not (tmp_path / "wd").exists()
