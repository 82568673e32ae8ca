"""Local multi-process jax.distributed jobs for tests, with every wait bounded.

Each process is started in its own session (so it and anything it spawns can be killed as a
group), with 4 fake CPU devices, and joins process 0's coordinator on a free localhost port.
A job that overruns its timeout is killed, never waited on.

Run as a script, this file is the worker of the data test: it joins a job, builds the training
batches as the trainer does and saves the full global batches (gathered from all processes).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES_PER_PROCESS = 4


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`num_processes` copies of `argv` + --coordinator_address/--num_processes/--process_id."""

    def __init__(self, argv, *, num_processes, log_dir, compile_cache=None, join_timeout_s=60, env=None):
        port = free_port()
        env = dict(
            os.environ,
            **(env or {}),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
            PYTHONPATH=REPO,
        )
        if compile_cache:  # later jobs of the same programs skip XLA compilation (tests' speed only)
            env.update(
                JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
            )
        self.logs = [os.path.join(str(log_dir), f"process{i}.log") for i in range(num_processes)]
        self.procs = []
        for i, log in enumerate(self.logs):
            flags = [
                f"--coordinator_address=127.0.0.1:{port}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
                f"--initialization_timeout={join_timeout_s}",
            ]
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv, *flags],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=REPO,
                        start_new_session=True,
                    )
                )

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=30)

    def wait(self, timeout_s: float) -> list[int]:
        """Return codes of all processes; kills the job and fails if it overruns."""
        deadline = time.monotonic() + timeout_s
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"job overran {timeout_s} s and was killed:\n{self.output()}") from None

    def output(self, i: int | None = None) -> str:
        texts = []
        for j, log in enumerate(self.logs):
            if i is None or i == j:
                with open(log) as f:
                    texts.append(f.read() if i is not None else f"--- process {j}\n{f.read()[-3000:]}")
        return "\n".join(texts)


def _batches_worker(cfg_path, out_path, num_batches, job_flags):
    from mile import distributed

    opts = dict(flag.removeprefix("--").split("=", 1) for flag in job_flags)
    distributed.initialize(
        coordinator_address=opts["coordinator_address"],
        num_processes=int(opts["num_processes"]),
        process_id=int(opts["process_id"]),
        timeout_s=int(opts["initialization_timeout"]),
    )
    import jax
    import ml_collections
    import numpy as np
    from jax.experimental import multihost_utils

    from mile import data as mdata
    from mile import multihost
    from mile import sharding as msharding
    from mile import train as T

    with open(cfg_path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    mesh = msharding.make_mesh(cfg.mesh)
    prepared = multihost.primary_first(lambda: mdata.prepare(cfg.data), "prepare the data")
    num_streams = multihost.resolve_num_streams(cfg.data.shards, jax.process_count(), None)
    batches = T.stream_batches(cfg, prepared, msharding.batch_sharding(mesh), num_streams)
    gathered = {}
    for t in range(num_batches):
        for name, array in next(batches).items():
            gathered[f"{t}/{name}"] = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    np.savez(f"{out_path}.{jax.process_index()}.npz", streams=np.array(batches.streams), **gathered)


if __name__ == "__main__":
    _batches_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
