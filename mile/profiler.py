"""A jax.profiler trace of chosen steps: `train.profile_steps="START,END"` (both included).

Process 0 traces steps START..END into `<workdir>/profile/` (TensorBoard's profile plugin reads
the `.xplane.pb`, Perfetto the `.trace.json.gz`). The trace stops only once step END's results
are on the host, so the device work of every traced step is inside it. A gs:// workdir gets the
trace uploaded when it stops (traced into a local temporary directory first: the profiler writes
only local files, and each uploaded object is then complete).
"""

from __future__ import annotations

import tempfile

import jax

from mile import paths


def parse_steps(text: str) -> tuple[int, int] | None:
    """"START,END" -> (START, END); "" -> None. ValueError (one line, with the fix) otherwise."""
    text = str(text).strip()
    if not text:
        return None
    parts = text.replace(" ", "").split(",")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        start = end = None
    if start is None or not 1 <= start <= end:
        raise ValueError(
            f"train.profile_steps={text!r} must be 'START,END' with 1 <= START <= END; "
            "e.g. --config.train.profile_steps=10,12"
        )
    return start, end


class StepProfiler:
    """Starts a trace before step START and stops it after step END (no-op when not enabled)."""

    def __init__(self, steps: tuple[int, int] | None, trace_dir: str, *, enabled: bool):
        self.steps = steps if enabled else None
        self.trace_dir = trace_dir
        self.active = False
        self._staging = None  # the local directory traced into, for a remote trace_dir

    def before(self, step: int) -> None:
        if self.steps is not None and not self.active and self.steps[0] <= step <= self.steps[1]:
            local = self.trace_dir
            if paths.is_remote(self.trace_dir):
                self._staging = tempfile.TemporaryDirectory(prefix="mile-profile-")
                local = self._staging.name
            paths.makedirs(local)
            jax.profiler.start_trace(local, create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self._staging is not None:
                paths.upload_tree(self._staging.name, self.trace_dir)
                self._staging.cleanup()
                self._staging = None
