"""A watchdog for hung steps: a region that overruns its limit dumps every stack and ends the job.

One bad host or a stuck collective stops every process without a message, and the scheduler
never learns that it should restart the job. The loop wraps each step, evaluation and save in
`Watchdog.watch(what, limit_s)`; a thread waits for the region to end. On an overrun it writes
one `error:` line and every thread's Python stack (faulthandler) to stderr and to
`<workdir>/hang.process<i>.txt`, then ends the process with HANG_EXIT_CODE (no cleanup: the
hung thread could never finish it; an unfinished orbax save never replaces a finished one).

`HangLimits` chooses the limits: `train.hang_timeout_s` seconds for every region, or, when it
is 0, 20 times the median step once 5 steps are timed (never under 10 minutes). A region's first
run (compiling the step, the evaluation, the first save) gets `train.startup_timeout_s` instead.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator

# timeout(1)'s code for "the command timed out".
HANG_EXIT_CODE = 124

AUTO_MIN_S = 600.0  # the automatic limit is never shorter than this
AUTO_FACTOR = 20.0  # ... and is this many median steps
AUTO_AFTER = 5  # steps timed before the automatic limit replaces the startup one


class HangLimits:
    """The limit for each watched region, from the config and the step times seen so far."""

    def __init__(self, hang_timeout_s: float, startup_timeout_s: float):
        self.fixed = float(hang_timeout_s)
        self.startup = float(startup_timeout_s)
        self._seen: set[str] = set()
        self._steps: list[float] = []

    def record_step(self, seconds: float) -> None:
        self._steps = (self._steps + [seconds])[-100:]

    def step_limit(self) -> float:
        if self.fixed > 0:
            return self.fixed
        if len(self._steps) < AUTO_AFTER:
            return self.startup
        return max(AUTO_MIN_S, AUTO_FACTOR * statistics.median(self._steps))

    def limit(self, kind: str) -> float:
        """The limit of the next `kind` region ("step", "evaluation", "save"); the first is startup's."""
        first = kind not in self._seen
        self._seen.add(kind)
        return max(self.startup, self.step_limit()) if first else self.step_limit()


class Watchdog:
    """Ends the process when a watched region overruns. `report_path(text)` saves the report."""

    def __init__(self, report: Callable[[str], None] | None = None, *, exit: Callable[[int], None] = os._exit):
        self._report, self._exit = report, exit
        self._cv = threading.Condition()
        self._region: tuple[str, float, float] | None = None  # (what, limit, deadline)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mile-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, what: str, limit_s: float) -> Iterator[None]:
        with self._cv:
            self._region = (what, limit_s, time.monotonic() + limit_s)
            self._cv.notify()
        try:
            yield
        finally:
            with self._cv:
                self._region = None
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if self._region is None:
                    self._cv.wait()
                    continue
                what, limit, deadline = self._region
                left = deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(timeout=left)
                    continue
                self._fire(what, limit)
                return

    def _fire(self, what: str, limit: float) -> None:
        line = (
            f"error: {what} took longer than {limit:g} s (train.hang_timeout_s); a host or a collective "
            f"is stuck. Stacks of every thread follow. Exiting with {HANG_EXIT_CODE} so that the "
            "scheduler restarts the job (it resumes from the last checkpoint)"
        )
        stacks = _all_stacks()
        print(f"{line}\n{stacks}", file=sys.stderr, flush=True)
        if self._report is not None:
            with contextlib.suppress(Exception):  # the report is a courtesy; the exit is the point
                self._report(f"{line}\n{stacks}")
        self._exit(HANG_EXIT_CODE)


def _all_stacks() -> str:
    """faulthandler's dump of every thread's stack, as text (it writes only to real files)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        return f.read()
