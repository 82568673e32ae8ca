"""Prepare a config's data as launch.py would, then exit: the corpus store, the tokenizer and, with
data.pretokenize, the token store, all cached under data.cache_dir.

    python -m mile.prepare --config configs/cpu.py --workers 8
    python -m mile.prepare --config my.py --config.data.pretokenize=true --workers 16
    python -m mile.prepare --config my.py --runner DataflowRunner --config.data.tokenizer=gs://B/tokenizer.model \
        --config.data.cache_dir=gs://B/cache --beam_options="--project=P --region=R --temp_location=gs://B/tmp ..."

--workers N runs the units of work (one per input file; for the token store, one per text shard)
in N processes here. --runner runs the same units as an Apache Beam pipeline instead
(DirectRunner here; DataflowRunner, FlinkRunner or SparkRunner at scale), which writes the same
files. A preparation cut short is finished by running the same command again.
"""

import os
import shlex
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from mile import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Run configuration file.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes that build the stores on this machine.")
_RUNNER = flags.DEFINE_string("runner", "local", "'local' (--workers processes) or an Apache Beam runner.")
_BEAM_OPTIONS = flags.DEFINE_string("beam_options", "", "Options for the Beam runner, as one string.")


def main(argv):
    del argv
    cfg = cli.load_config(_CONFIG)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if _WORKERS.value < 1:
        cli.fail(f"--workers={_WORKERS.value} must be >= 1")
    from mile import data as mdata
    from mile.data.prepared import Builder, describe

    builder = Builder(_WORKERS.value, _RUNNER.value, tuple(shlex.split(_BEAM_OPTIONS.value)))
    started = time.perf_counter()
    prepared = mdata.prepare(
        cfg.data, builder=builder, check=lambda t: mdata.check_fits(t, cfg.model, cfg.data)
    )
    for line in describe(prepared):
        print(line)
    print(f"prepared in {time.perf_counter() - started:.1f} s (data.cache_dir={cfg.data.cache_dir})")


def run():
    try:
        app.run(main, flags_parser=cli.parse_flags)
    except ValueError as e:
        cli.fail(str(e))


if __name__ == "__main__":
    # Worker processes are spawned; they re-import this module but must not parse flags again.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # preparing needs no accelerator
    sys.exit(run())
