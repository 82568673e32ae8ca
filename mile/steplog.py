"""What the loop does with each step's metrics, one job per class:

  LateMetrics     holds a step's metrics until the next step is dispatched, so the host never
                  waits on the device (or reads them at once when the loop must know now);
  NonfiniteGuard  counts consecutive non-finite steps and stops the run after too many;
  Throughput      tokens/s, model TFLOP/s per device and MFU over the steps since the last row;
  TrainLog        writes the rows (metrics.jsonl, TensorBoard) and the progress lines.
"""

from __future__ import annotations

import time

import jax

from mile import flops as mflops
from mile.metrics import MetricsWriter, ProgressBar


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. repeated non-finite losses); the message says why."""


class LateMetrics:
    """`push(step, metrics)` queues this step's device metrics and returns the previous step's,
    read to floats; `take()` reads the queued step now (None when nothing is queued)."""

    def __init__(self):
        self._pending = None

    def push(self, step: int, metrics) -> tuple[int, dict[str, float]] | None:
        previous = self.take()
        self._pending = (int(step), metrics)
        return previous

    def take(self) -> tuple[int, dict[str, float]] | None:
        if self._pending is None:
            return None
        step, metrics = self._pending
        self._pending = None
        return step, {k: float(v) for k, v in jax.device_get(metrics).items()}


class NonfiniteGuard:
    """`check(step, metrics)` after each read step; `finite` says whether the newest one was."""

    def __init__(self, limit: int, say):
        self.limit, self._say = int(limit), say
        self.consecutive = 0

    @property
    def finite(self) -> bool:
        return self.consecutive == 0

    def check(self, step: int, metrics: dict[str, float]) -> None:
        if metrics["finite"] >= 1:
            self.consecutive = 0
            return
        self.consecutive += 1
        self._say(
            f"step {step}: non-finite loss ({metrics['loss']}), gradient or update; step skipped "
            f"({self.consecutive}/{self.limit})"
        )
        if self.consecutive >= self.limit:
            raise TrainingError(
                f"{self.consecutive} consecutive non-finite steps ending at step {step}; stopped without "
                "saving (the last good checkpoint is kept). Lower --config.optim.learning_rate or "
                "raise --config.train.max_nonfinite_steps"
            )


class Throughput:
    """Rates over the steps counted since the last `rates()` call."""

    def __init__(self, cfg):
        self._tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        # Achieved model TFLOP/s per device, and MFU against the device kind's published peak
        # where mile.flops knows it (accelerators; not the CPU).
        self._flops_per_token = mflops.model_flops_per_token(cfg.model, cfg.data.seq_len)
        self._chip = mflops.chip_for_device_kind(jax.devices()[0].device_kind)
        self._start, self._steps = time.perf_counter(), 0

    def count(self) -> None:
        self._steps += 1

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._start
        out = {"tokens_per_s": self._steps * self._tokens_per_step / max(elapsed, 1e-9)}
        out["tflops_per_device"] = out["tokens_per_s"] * self._flops_per_token / jax.device_count() / 1e12
        if self._chip is not None:
            out["mfu"] = out["tflops_per_device"] * 1e12 / self._chip.peak_bf16_flops
        self._start, self._steps = time.perf_counter(), 0
        return out


class TrainLog:
    """Train and eval rows to metrics.jsonl / TensorBoard and progress lines (process 0 only)."""

    def __init__(self, workdir, total_steps: int, start_step: int, *, enabled: bool):
        # Rows past the restored step describe steps that are about to be redone: drop them.
        self.writer = MetricsWriter(workdir, enabled=enabled, resume_step=start_step)
        self.bar = ProgressBar(total_steps, initial_step=start_step, enabled=enabled)
        self.last: dict[str, float] = {}
        if self.writer.dropped_rows:
            self.say(f"metrics.jsonl: dropped {self.writer.dropped_rows} rows past step {start_step} (they are redone)")

    def say(self, line: str) -> None:
        self.bar.write(line)

    def train(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.write(step, metrics, prefix="train")
        self.bar.update(
            step, loss=metrics["loss"], ce=metrics["ce"], tokens_per_s=metrics["tokens_per_s"], mfu=metrics.get("mfu")
        )

    def eval(self, step: int, result: dict[str, float]) -> None:
        self.writer.write(step, result, prefix="eval")
        self.say(f"step {step}: validation CE {result['ce']:.4f}, perplexity {result['perplexity']:.2f}")
        self.last.update({f"eval_{k}": v for k, v in result.items()})

    def flush(self) -> None:
        """Every row so far made visible at the workdir (an upload when it is remote)."""
        self.writer.flush()

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
