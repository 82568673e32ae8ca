"""Joining a multi-process run: `jax.distributed.initialize` from flags, the environment or a cluster.

Three ways, tried in order:
  1. explicit: a coordinator address, process count and process id (launch.py flags, or the
     JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables);
     e.g. several processes on one machine, or hosts without a cluster manager;
  2. a cluster manager jax recognises (SLURM, Open MPI, Cloud TPU, ...): jax finds all three;
  3. neither: a single process (unless `mode="yes"`, which asks jax to detect a cluster anyway).
On CPU the processes' collectives go over gloo (jax's default CPU implementation).
"""

from __future__ import annotations

import os

# Environment variables by which jax's cluster detection recognises a multi-process job.
CLUSTER_ENV_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer; set it to a whole number") from None


def initialize(
    mode: str = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
    """Calls jax.distributed.initialize when the run is multi-process; raises a one-line
    ValueError for an incomplete or inconsistent process description."""
    if mode not in ("auto", "yes", "no"):
        raise ValueError(f"train.distributed={mode!r} must be 'auto', 'yes' or 'no'")
    flags_given = bool(coordinator_address) or num_processes is not None or process_id is not None
    if mode == "no":
        if flags_given:
            raise ValueError(
                "train.distributed='no' but process flags were given; drop --coordinator_address, "
                "--num_processes and --process_id, or set --config.train.distributed=auto"
            )
        return
    import jax

    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    # A --coordinator_address alone is a half-described run too: never start it as one process.
    if count is not None or index is not None or coordinator_address:
        if count is None or index is None or not address:
            missing = [
                name
                for name, value in (
                    ("--coordinator_address", address),
                    ("--num_processes", count),
                    ("--process_id", index),
                )
                if value is None or value == ""
            ]
            raise ValueError(
                f"a multi-process run needs --coordinator_address, --num_processes and --process_id; "
                f"missing {', '.join(missing)}"
            )
        if count < 1 or not 0 <= index < count:
            raise ValueError(
                f"--process_id={index} must be in [0, --num_processes={count}); number processes from 0"
            )
        jax.distributed.initialize(
            address, num_processes=count, process_id=index, initialization_timeout=timeout_s
        )
    elif mode == "yes" or any(k in os.environ for k in CLUSTER_ENV_VARS):
        jax.distributed.initialize(initialization_timeout=timeout_s)
