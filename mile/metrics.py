"""Metrics output (process 0 only): JSON lines, TensorBoard scalars and a progress bar.

  <workdir>/metrics.jsonl   one line per write: {"step": 10, "train/loss": 3.2, ...}
  <workdir>/tb/             TensorBoard event files (tensorboardX, no TensorFlow)

Non-finite values are written as JSON null in metrics.jsonl (so every line is valid JSON) and
skipped in TensorBoard.

Resuming at step S (`resume_step=S`): the rows of metrics.jsonl past S (and a torn last line left
by a kill) are dropped before appending, because those steps are about to be redone; so every
step appears once, in order. TensorBoard event files are append-only, so the new writer starts
with TensorBoard's purge marker (`purge_step=S+1`): TensorBoard then hides the older files' events
from step S+1 on, and the curves show each step once.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
import time
from typing import Any, Mapping

from mile import paths


def _to_float(v: Any) -> float:
    # Accepts Python numbers, NumPy scalars and 0-d jax / numpy arrays.
    return float(v.item() if hasattr(v, "item") else v)


class MetricsWriter:
    """Appends scalars to <workdir>/metrics.jsonl and <workdir>/tb. No-op when not enabled."""

    def __init__(
        self, workdir, *, enabled: bool, resume_step: int | None = None, upload_every_s: float = 30.0
    ):
        """`resume_step`: the step training restarts from (0 for a fresh start); rows past it
        are dropped (their count is `dropped_rows`). None appends without touching anything."""
        self.enabled = bool(enabled)
        self._jsonl = None
        self._tb = None
        self.dropped_rows = 0
        if not self.enabled:
            return
        self.path = paths.join(workdir, "metrics.jsonl")
        self._remote = paths.is_remote(workdir)
        if resume_step is not None:
            self.dropped_rows = truncate_metrics(self.path, resume_step)
        tb_dir = paths.join(workdir, "tb")
        if self._remote:
            self._rows = paths.read_text(self.path) if paths.exists(self.path) else ""
            self._tb_remote, self._tb_local = tb_dir, tempfile.TemporaryDirectory(prefix="mile-tb-")
            tb_dir = self._tb_local.name
            self._upload_every_s, self._uploaded_at, self._stale = float(upload_every_s), time.monotonic(), False
        else:
            paths.makedirs(workdir)
            self._jsonl = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

        purge = None if resume_step is None else int(resume_step) + 1
        self._tb = SummaryWriter(tb_dir, purge_step=purge)

    def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        step = int(step)
        record: dict[str, Any] = {"step": step}
        for name, value in scalars.items():
            key = f"{prefix}/{name}" if prefix else str(name)
            x = _to_float(value)
            record[key] = x if math.isfinite(x) else None
            if math.isfinite(x):
                self._tb.add_scalar(key, x, global_step=step)
        line = json.dumps(record, allow_nan=False) + "\n"
        self._tb.flush()
        if not self._remote:
            self._jsonl.write(line)
            self._jsonl.flush()
            return
        self._rows += line
        self._stale = True
        if time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self.flush()

    def flush(self) -> None:
        """Makes every row written so far visible at the workdir (a remote one gets an upload)."""
        if not self.enabled or not self._remote or not self._stale:
            return
        if self._tb is not None:
            self._tb.flush()
        paths.write_text(self.path, self._rows)
        paths.upload_tree(self._tb_local.name, self._tb_remote)
        self._uploaded_at, self._stale = time.monotonic(), False

    def close(self) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            if self._remote:
                self._stale = True  # closing may have written the event file's last records
                self.flush()
                self._tb_local.cleanup()


def truncate_metrics(path, last_step: int) -> int:
    """Keeps the rows of metrics file `path` up to `last_step` (and drops unparsable lines, e.g. one
    torn by a kill); rewrites the file atomically only when something goes. Returns the rows dropped."""
    if not paths.exists(path):
        return 0
    lines = [line for line in io.StringIO(paths.read_text(path), newline="\n") if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    if kept != lines:
        paths.write_text(path, "".join(kept))
    return len(lines) - len(kept)


def read_metrics(path) -> list[dict]:
    """Parses a metrics.jsonl file (or a workdir containing one) into a list of dicts."""
    if paths.isdir(path):
        path = paths.join(path, "metrics.jsonl")
    return [json.loads(line) for line in io.StringIO(paths.read_text(path), newline="\n") if line.strip()]


def _fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


class ProgressBar:
    """Progress over optimiser steps: step, loss, plain CE, tokens/s, ETA.

    On a TTY: a tqdm bar (tqdm computes the ETA). Otherwise (CI logs, nohup): a plain line
    every `log_every` steps or `log_seconds` seconds, whichever comes first, plus the last step,
    e.g. "step 200/1000 (20.0%) loss 3.1234 ce 3.2001 tok/s 12.3k eta 0:01:05".
    Disabled (non-zero processes): every method is a no-op.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        *,
        log_every: int = 100,
        log_seconds: float = 60.0,
        file=None,
    ):
        self.enabled = bool(enabled)
        self.total = int(total_steps)
        self.step = int(initial_step)
        self._file = file if file is not None else sys.stdout
        self._bar = None
        if not self.enabled:
            return
        self._tty = hasattr(self._file, "isatty") and self._file.isatty()
        self.log_every = max(1, int(log_every))
        self.log_seconds = float(log_seconds)
        self._t0 = time.monotonic()
        self._step0 = self.step
        self._last_print = self._t0
        self._last_step_printed = self.step
        if self._tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.step,
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5,
                file=self._file,
            )

    def update(self, step: int, *, loss=None, ce=None, tokens_per_s=None, mfu=None) -> None:
        if not self.enabled:
            return
        step = int(step)
        parts = {}
        if loss is not None:
            parts["loss"] = f"{_to_float(loss):.4f}"
        if ce is not None:
            parts["ce"] = f"{_to_float(ce):.4f}"
        if tokens_per_s is not None:
            parts["tok/s"] = _fmt_rate(_to_float(tokens_per_s))
        if mfu is not None:
            parts["mfu"] = f"{_to_float(mfu):.1%}"
        if self._bar is not None:
            self._bar.update(step - self.step)
            self.step = step
            if parts:
                self._bar.set_postfix(parts, refresh=False)
            return
        self.step = step
        now = time.monotonic()
        due = (
            step - self._last_step_printed >= self.log_every
            or now - self._last_print >= self.log_seconds
            or step >= self.total
        )
        if not due or step == self._last_step_printed:
            return
        self._last_print, self._last_step_printed = now, step
        done = step - self._step0
        eta = "?"
        if done > 0:
            secs = (now - self._t0) / done * max(0, self.total - step)
            eta = time.strftime("%H:%M:%S", time.gmtime(secs)) if secs < 86400 else f"{secs / 3600:.0f}h"
        pct = 100.0 * step / self.total if self.total else 100.0
        msg = f"step {step}/{self.total} ({pct:.1f}%)"
        for k, v in parts.items():
            msg += f" {k} {v}"
        print(f"{msg} eta {eta}", file=self._file, flush=True)

    def write(self, msg: str) -> None:
        """Prints a line above the bar (e.g. validation results)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self._file)
        else:
            print(msg, file=self._file, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
