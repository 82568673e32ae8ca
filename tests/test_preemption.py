"""Operating a long job, one process: SIGTERM/SIGINT stop at a step with a checkpoint and a rerun
ends bit-identical to an uninterrupted run; a hung step is ended by the watchdog with every
stack; a profile of chosen steps lands in the workdir. Every subprocess wait is bounded.
(Two processes: tests/test_multiprocess.py.)"""

import os
import re
import signal
import time

import pytest

from mile import train as T
from mile.checkpoint import Checkpointer
from mile.preemption import PREEMPTED_EXIT_CODE, Preempted
from mile.watchdog import HANG_EXIT_CODE, AUTO_MIN_S, HangLimits, Watchdog
from train_helpers import (
    assert_same_run,
    restore_step,
    start,
    steps_on_disk,
    tiny_config,
    tiny_launch_argv,
    train_losses,
    wait,
    wait_for,
)

STEPS = 8
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every": 4, "train.eval_every": 100}
WAIT_S = 240  # the longest any subprocess may take before it is killed and the test fails


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("preempt")


@pytest.fixture(scope="module")
def straight(root):
    """The uninterrupted run (in this process, 8 devices) that every interrupted one must equal."""
    wd = root / "straight"
    T.train(_config(root), str(wd))
    return wd


def _config(root, **more):
    return tiny_config(root, **{**OVERRIDES, **more})


def _restore(workdir, step=STEPS):
    return restore_step(workdir, step)


def _losses(workdir):
    return train_losses(workdir)


def _assert_same_run(a, b):
    assert_same_run(a, b, STEPS)


def _steps_on_disk(workdir):
    return steps_on_disk(workdir)


def test_signal_stops_with_a_checkpoint_and_the_rerun_is_bit_identical(root, straight, monkeypatch, capfd):
    """SIGTERM during step 3 stops the run after step 3 with a checkpoint of it; a SIGINT and a
    second SIGTERM arriving during that save are ignored; the rerun ends as the straight run."""
    jit_train_step, save = T.jit_train_step, Checkpointer.save

    def signalling_jit_train_step(*args, **kwargs):
        fn, calls = jit_train_step(*args, **kwargs), [0]

        def step(state, batch):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return fn(state, batch)

        return step

    def save_under_fire(self, step, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return save(self, step, *args, **kwargs)

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    wd = root / "signalled"
    with monkeypatch.context() as m:
        m.setattr(T, "jit_train_step", signalling_jit_train_step)
        m.setattr(Checkpointer, "save", save_under_fire)
        with pytest.raises(Preempted, match=r"preempted at step 3 \(saved a checkpoint of it\)") as stop:
            T.train(_config(root), str(wd))
    assert (stop.value.step, stop.value.saved) == (3, True)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    err = capfd.readouterr().err
    assert "received SIGTERM: stopping at this step with a checkpoint" in err
    assert "received SIGINT: already stopping; ignored" in err and "received SIGTERM: already stopping" in err
    assert _steps_on_disk(wd) == [3]
    _restore(wd, 3)  # complete and verified
    T.train(_config(root), str(wd))
    assert _steps_on_disk(wd) == [3, 4, 8]
    _assert_same_run(straight, wd)


def _launch_argv(root, workdir):
    return tiny_launch_argv(root, workdir, OVERRIDES, "tests/launch_with_faults.py")


def _start(root, workdir, *flags, **env):
    """launch.py (with test faults) as a subprocess with 8 CPU devices, like this process."""
    log = root / f"{os.path.basename(workdir)}.{time.monotonic_ns()}.log"
    return start([*_launch_argv(root, workdir), *flags], log, **env)


def _wait(proc, log, timeout_s=WAIT_S):
    return wait(proc, log, timeout_s)


def _wait_for(condition, proc, log, what):
    wait_for(condition, proc, log, what, WAIT_S)


def test_sigterm_from_outside_exits_75_and_the_same_command_resumes(root, straight):
    """The real thing: launch.py, SIGTERM from another process after its first checkpoint (while
    held before step 6, so the signal never lands after the run's end however slow the machine),
    a second SIGTERM right after; exit 75 within a bounded time, then the same command finishes."""
    wd = root / "launched"
    release = root / "launched.release"
    proc, log = _start(root, wd, MILE_TEST_HOLD_AT_CALL="6", MILE_TEST_HOLD_FILE=str(release))
    _wait_for(lambda: list(root.glob("launched.release.p*")), proc, log, "the hold before step 6")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    release.touch()
    rc, out = _wait(proc, log)
    took = time.monotonic() - sent
    print(f"SIGTERM to exit: {took:.2f} s")
    assert rc == PREEMPTED_EXIT_CODE, out[-3000:]
    stopped = re.findall(r"preempted at step (\d+) \(saved a checkpoint of it\)", out)
    assert len(stopped) == 1, out[-3000:]
    step = int(stopped[0])
    assert 4 <= step < STEPS and _steps_on_disk(wd)[-1] == step, out[-3000:]
    assert took < 60, f"{took:.1f} s from SIGTERM to exit"
    _restore(wd, step)
    proc, log = _start(root, wd)
    rc, out = _wait(proc, log)
    assert rc == 0, out[-3000:]
    _assert_same_run(straight, wd)


def test_a_hung_step_dumps_every_stack_and_exits_124(root):
    wd = root / "hung"
    proc, log = _start(root, wd, "--config.train.hang_timeout_s=5", MILE_TEST_STALL_AT_CALL="3")
    # Step 1's row is written while step 2 runs; step 3 then hangs before it is dispatched.
    _wait_for(lambda: (wd / "metrics.jsonl").exists() and _losses(wd), proc, log, "step 1's row")
    started = time.monotonic()
    rc, out = _wait(proc, log)
    took = time.monotonic() - started
    print(f"hung step 3 ended after {took:.2f} s (limit 5 s)")
    assert rc == HANG_EXIT_CODE, out[-3000:]
    assert "error: step 3 took longer than 5 s (train.hang_timeout_s)" in out, out[-3000:]
    # faulthandler's dump: the main thread stuck in the injected sleep, the watchdog's own thread.
    assert re.search(r'File ".*launch_with_faults\.py", line \d+ in step', out), out[-3000:]
    assert "Current thread" in out and "Thread 0x" in out
    report = (wd / "hang.process0.txt").read_text()
    assert report.startswith("error: step 3 took longer than 5 s") and "launch_with_faults.py" in report
    assert took < 60


def test_watchdog_fires_only_on_an_overrun():
    exits = []
    reports = []
    dog = Watchdog(reports.append, exit=exits.append)
    with dog.watch("quick", 5.0):
        time.sleep(0.05)
    time.sleep(0.2)
    assert exits == []
    with dog.watch("slow thing", 0.2):
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
    dog.close()
    assert exits == [HANG_EXIT_CODE]
    assert reports[0].startswith("error: slow thing took longer than 0.2 s")
    assert "test_watchdog_fires_only_on_an_overrun" in reports[0]  # this thread's stack


def test_hang_limits():
    fixed = HangLimits(7.0, 100.0)
    assert fixed.limit("step") == 100.0 and fixed.limit("step") == 7.0  # the first step compiles
    assert fixed.limit("evaluation") == 100.0 and fixed.limit("evaluation") == 7.0
    auto = HangLimits(0.0, 3600.0)
    assert auto.limit("step") == 3600.0
    for s in (50.0, 1.0, 2.0, 3.0, 2.0):  # the first, compiling step is an outlier; the median ignores it
        auto.record_step(s)
    assert auto.limit("step") == AUTO_MIN_S  # 20 x median 2 s = 40 s, below the floor
    for _ in range(10):
        auto.record_step(60.0)
    assert auto.limit("step") == 20 * 60.0


def test_profile_steps_write_a_trace(root):
    wd = root / "profiled"
    T.train(_config(root, **{"train.steps": 3, "train.profile_steps": "2,3"}), str(wd))
    found = [os.path.join(r, f) for r, _, files in os.walk(wd / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in found), found
    assert any(f.endswith(".trace.json.gz") for f in found), found


@pytest.mark.parametrize("value", ["3", "5,2", "0,2", "a,b"])
def test_bad_profile_steps_are_refused(root, value):
    with pytest.raises(ValueError, match=r"train.profile_steps=.* must be 'START,END' with 1 <= START <= END"):
        T.train(_config(root, **{"train.profile_steps": value}), str(root / "never"))
    assert not (root / "never").exists()
