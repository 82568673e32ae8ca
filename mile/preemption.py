"""Stopping cleanly when the scheduler asks: SIGTERM or SIGINT -> one agreed step -> save -> exit.

Cloud TPU maintenance and spot preemption, SLURM's `--signal` and Kubernetes send SIGTERM and
wait a short while before killing. `Preemption.reached(step)`, asked once per step by the loop,
turns that notice into a step at which every process stops, so all of them save the same step:

  * several processes (jax.distributed): jax's preemption service. Its own SIGTERM handler (set
    by `jax.distributed.initialize`) tells the coordinator; every process then learns the same
    stop step (one past the furthest any process has reached) from
    `multihost_utils.reached_preemption_sync_point`. A signal to any one process is enough.
    SIGINT (Ctrl-C) is passed on to that handler as a SIGTERM to this process.
  * one process: there is no coordinator, so our own handler sets a flag and the stop step is
    the step being run when it is seen.

Further signals while the stop is under way are ignored (the save they would interrupt is the
point of stopping cleanly); SIGKILL still ends the process, and an interrupted orbax save never
replaces a finished checkpoint. The handlers are installed for the duration of `with
Preemption()` and the previous ones restored after.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

# sysexits.h EX_TEMPFAIL: "temporary failure, try again". The run saved a checkpoint of the step
# it stopped at; running the same command again resumes there.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Training stopped early on a signal, after saving (when `saved`) a checkpoint of `step`."""

    def __init__(self, step: int, saved: bool):
        what = "saved a checkpoint of it" if saved else "not saved: its update was not finite"
        super().__init__(f"preempted at step {step} ({what}); run the same command again to resume")
        self.step, self.saved = int(step), bool(saved)


def _coordinated() -> bool:
    from jax._src import distributed  # the client and its preemption service live here

    state = distributed.global_state
    return jax.process_count() > 1 and state.client is not None and state.preemption_sync_manager is not None


class Preemption:
    """Signal handling for one training loop; `reached(step)` is True at the agreed stop step."""

    def __init__(self):
        self.coordinated = _coordinated()
        self.signal_name: str | None = None  # the first signal this process received
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python handles signals in the main thread only; the caller's stay
        signums = (signal.SIGINT,) if self.coordinated else (signal.SIGTERM, signal.SIGINT)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        first = self.signal_name is None
        if first:
            self.signal_name = signal.Signals(signum).name
        if self.coordinated:
            if first:  # jax's SIGTERM handler tells the other processes
                os.kill(os.getpid(), signal.SIGTERM)
            return
        what = "stopping at this step with a checkpoint" if first else "already stopping; ignored"
        print(f"received {signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)

    def reached(self, step: int) -> bool:
        """Whether the run must stop after `step` (called once per step, on every process)."""
        if self.coordinated:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self.signal_name is not None
