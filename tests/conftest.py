"""Test setup: 8 fake CPU devices, requested before JAX initialises."""

import os

from mile import xla_cpu_flags

# The XLA:CPU flags launch.py adds, so the tests run the programs users run.
os.environ["XLA_FLAGS"] = xla_cpu_flags.with_default_flags(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache per test process, inherited by the processes it starts
# (launch.py, mile.evaluate, ...): the same tiny programs compile once, not once per test. Speed
# only: a cache hit returns the executable the compiler would have produced.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="mile-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# The longest files first: with two xdist workers taking a file at a time, the suite then ends
# with short files on both workers instead of one long file on one of them.
_LONGEST_FIRST = (
    "test_multiprocess.py",
    "test_train.py",
    "test_prepare.py",
    "test_preemption.py",
    "test_gcs.py",
    "test_evaluate.py",
    "test_aot.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
