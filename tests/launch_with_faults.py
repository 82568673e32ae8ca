"""launch.py with faults injected for tests, chosen by environment variables:

  MILE_TEST_STEP_SLEEP_S=x     every train step first sleeps x seconds (so a signal lands mid-run)
  MILE_TEST_STALL_AT_CALL=n    the n-th train step of this process hangs (sleeps an hour)
  MILE_TEST_HOLD_AT_CALL=n     before its n-th train step the process writes MILE_TEST_HOLD_FILE
                               + ".p<pid>", then waits (at most 120 s) until MILE_TEST_HOLD_FILE
                               exists: a test sends its signal while every process is held

Run it exactly as launch.py: `python tests/launch_with_faults.py --config ... --workdir ...`.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import launch  # noqa: E402
from mile import train  # noqa: E402

_jit_train_step = train.jit_train_step


def _faulty_jit_train_step(*args, **kwargs):
    step_fn = _jit_train_step(*args, **kwargs)
    sleep_s = float(os.environ.get("MILE_TEST_STEP_SLEEP_S", "0"))
    stall_at = int(os.environ.get("MILE_TEST_STALL_AT_CALL", "0"))
    hold_at = int(os.environ.get("MILE_TEST_HOLD_AT_CALL", "0"))
    calls = [0]

    def step(state, batch):
        calls[0] += 1
        if calls[0] == stall_at:
            time.sleep(3600)  # a stuck step: only the watchdog ends this
        if calls[0] == hold_at:
            _hold(os.environ["MILE_TEST_HOLD_FILE"])
        time.sleep(sleep_s)
        return step_fn(state, batch)

    return step


def _hold(release_file: str) -> None:
    with open(f"{release_file}.p{os.getpid()}", "w"):
        pass
    deadline = time.monotonic() + 120
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        time.sleep(0.01)


train.jit_train_step = _faulty_jit_train_step

if __name__ == "__main__":
    launch.run()
