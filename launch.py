"""Train a MiLe/focal/CE language model.

    python launch.py --config configs/cpu.py --workdir workdirs/cpu
    python launch.py --config configs/paper.py:468m,mile --workdir /mnt/shared/468m --config.mesh.fsdp=-1

Run the same command again to resume from the workdir's latest checkpoint. Exit codes: 0 done,
2 bad input, 75 stopped by SIGTERM/SIGINT after saving (rerun to resume), 124 a step hung. On a TPU pod or GPU
cluster run the same command on every host (jax.distributed is initialised when multi-process).
Without a cluster manager, tell each process where the others are (README: Multi-host):

    python launch.py ... --coordinator_address=host0:12355 --num_processes=2 --process_id=0
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Run configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Checkpoints, metrics and config go here.")
# Several processes without a cluster manager (see mile.distributed); default: the JAX_* variables.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, from 0 (JAX_PROCESS_ID).")
_JOIN_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for all processes.")


def _config_file_error(e: BaseException) -> None:
    """One `error:` line for a --config file that is missing or does not import."""
    attempted = re.search(r"Attempted \[[^\]]*\]:\s*\n\s*(\S+)", str(e))
    while e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, SyntaxError):
        _fail(f"config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}; fix the file")
    missing = re.search(r"\[Errno \d+\] ([^\n]+)", str(e))
    why = missing.group(1) if missing else str(e).strip().splitlines()[0]
    path = f" {attempted.group(1)}" if attempted else ""
    _fail(f"cannot load config file{path}: {why}; pass an existing file, e.g. --config configs/cpu.py")


def _load_config():
    """The parsed --config (a file that fails to load is reported here when no override touched it)."""
    try:
        cfg = _CONFIG.value
        cfg.keys()  # ml_collections defers a file's load error to the first use of the config
        return cfg
    except OSError as e:
        _config_file_error(e)


def main(argv):
    del argv
    cfg = _load_config()
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


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    """absl flag parsing, with a bad config file or override reported as one line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # --config.<unknown key>=...
        text = str(e)
        key = re.search(r"([A-Za-z_][A-Za-z0-9_]*)", text)
        key = key.group(1) if key else text
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and f".{key}" in a), key)
        hint = re.search(r'Did you mean "([^"]+)"', text)
        hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        _fail(f"unknown config key in {flag}{hint}; every key is listed in configs/base.py")
    except (OSError, SyntaxError) as e:  # a --config file that is missing or does not parse
        _config_file_error(e)
    except (flags.Error, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # A config file's get_config(arg) that rejects its argument reaches us as "ValueError: ...".
        _fail(re.sub(r"^ValueError: ", "", lines[-1]) if lines else repr(e))


def run():
    """app.run, with bad input reported as one line instead of a traceback."""
    from mile.preemption import PREEMPTED_EXIT_CODE
    from mile.train import Preempted, TrainingError

    try:
        app.run(main, flags_parser=_parse_flags)
    except (ValueError, TrainingError) as e:
        _fail(str(e))
    except Preempted as e:  # SIGTERM / SIGINT: the checkpoint is saved; the same command resumes
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    run()
