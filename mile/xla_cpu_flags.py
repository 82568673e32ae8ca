"""The XLA:CPU flags mile's entry points add before JAX starts: measured choices, not tuning folklore.

`--xla_cpu_experimental_ynn_fusion_type=` (an empty list) turns off YNNPACK, which jax 0.10's
XLA:CPU uses for its matmuls and some elementwise fusions, so dots go to Eigen. YNNPACK runs a
batched matmul, attention's scores and weighted sums, on one thread: 64 x [256 x 64] @ [64 x 256]
took 9.1 ms wall for 8.4 ms of CPU, where Eigen takes 5.9 ms wall on both cores. Over the whole
train step of configs/cpu.py the flag saves 10-17% (experiments/bench_step.py, README "Train-step
speed"). Only XLA's CPU backend reads it; TPU and GPU programs are unaffected. The numbers change
by float rounding only (a different matmul kernel sums in a different order).

A flag the user already set in XLA_FLAGS is left as it is, so any choice can be overridden:
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE
restores jax's default. This module imports nothing from JAX: it must run before JAX initialises.
"""

from __future__ import annotations

import os

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def with_default_flags(xla_flags: str) -> str:
    """`xla_flags` with each of DEFAULT_FLAGS appended unless a flag of that name is already there."""
    given = {flag.split("=", 1)[0] for flag in xla_flags.split()}
    added = [flag for flag in DEFAULT_FLAGS if flag.split("=", 1)[0] not in given]
    return " ".join([xla_flags.strip(), *added]).strip()


def set_default_flags(environ=os.environ) -> None:
    """Add DEFAULT_FLAGS to XLA_FLAGS in `environ`. Call before JAX creates its CPU client (before
    the first `jax.devices()` or computation); later it changes nothing in this process."""
    environ["XLA_FLAGS"] = with_default_flags(environ.get("XLA_FLAGS", ""))
