"""Train a MiLe/focal/CE language model.

    python launch.py --config configs/cpu.py --workdir workdirs/cpu
    python launch.py --config configs/paper.py:468m,mile --workdir /mnt/shared/468m --config.mesh.fsdp=-1

Run the same command again to resume from the workdir's latest checkpoint. Exit codes: 0 done,
2 bad input, 75 stopped by SIGTERM/SIGINT after saving (rerun to resume), 124 a step hung. On a TPU pod or GPU
cluster run the same command on every host (jax.distributed is initialised when multi-process).
Without a cluster manager, tell each process where the others are (README: Multi-host):

    python launch.py ... --coordinator_address=host0:12355 --num_processes=2 --process_id=0
"""

import sys

from mile import xla_cpu_flags

xla_cpu_flags.set_default_flags()  # before JAX starts (mile/xla_cpu_flags.py says why)

from absl import app, flags, logging
from ml_collections import config_flags

from mile import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Run configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Checkpoints, metrics and config go here.")
# Several processes without a cluster manager (see mile.distributed); default: the JAX_* variables.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, from 0 (JAX_PROCESS_ID).")
_JOIN_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for all processes.")


def main(argv):
    del argv
    cfg = cli.load_config(_CONFIG)
    # Orbax and TFDS log every file they touch at INFO; keep the console to our own lines.
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from mile import distributed

    distributed.initialize(
        cfg.train.distributed,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        timeout_s=_JOIN_TIMEOUT.value,
    )
    import jax

    from mile import train

    if jax.process_index() == 0:
        print(
            f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
            f"{jax.device_count()} global {jax.devices()[0].platform} devices; workdir {_WORKDIR.value}"
        )
    train.train(cfg, _WORKDIR.value)


def run():
    """app.run, with bad input reported as one line instead of a traceback."""
    from mile.preemption import PREEMPTED_EXIT_CODE
    from mile.train import Preempted, TrainingError

    try:
        app.run(main, flags_parser=cli.parse_flags)
    except (ValueError, TrainingError) as e:
        cli.fail(str(e))
    except Preempted as e:  # SIGTERM / SIGINT: the checkpoint is saved; the same command resumes
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    run()
