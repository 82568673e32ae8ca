"""launch.py with faults injected for tests, chosen by environment variables:

  MILE_TEST_STEP_SLEEP_S=x     every train step first sleeps x seconds (so a signal lands mid-run)
  MILE_TEST_STALL_AT_CALL=n    the n-th train step of this process hangs (sleeps an hour)

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
    calls = [0]

    def step(state, batch):
        calls[0] += 1
        if calls[0] == stall_at:
            time.sleep(3600)  # a stuck step: only the watchdog ends this
        time.sleep(sleep_s)
        return step_fn(state, batch)

    return step


train.jit_train_step = _faulty_jit_train_step

if __name__ == "__main__":
    launch.run()
