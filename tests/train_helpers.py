"""Tiny configs and corpora for trainer tests (written by the tests themselves), and what the
resume tests share: reading a run back (local or gs:// workdir) and bounded subprocess runs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from configs import tiny  # noqa: E402

_WORDS = (
    "the lord said unto moses and aaron go forth into the land which i shall give thee "
    "and they went up out of egypt with all their flocks and herds and the people rested "
    "on the seventh day and blessed the name of the lord for ever and ever amen"
).split()


def write_corpus(directory, num_docs=60, seed=0) -> str:
    """A small English-like .txt corpus: documents separated by blank lines."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        sentences = [" ".join(rng.choice(_WORDS, size=rng.integers(6, 14))) + "." for _ in range(6)]
        docs.append(" ".join(sentences).capitalize())
    path = os.path.join(str(directory), "corpus.txt")
    with open(path, "w") as f:
        f.write("\n\n".join(docs) + "\n")
    return path


def tiny_config(tmp_path, **overrides):
    cfg = tiny.get_config()
    corpus = write_corpus(tmp_path)
    cfg.data.update(
        source="text",
        text_files=[corpus],
        cache_dir=os.path.join(str(tmp_path), "cache"),
        vocab_size=320,
        validation_every=10,
    )
    cfg.model.vocab_size = 320
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[key] = value
    return cfg


def tiny_launch_argv(tmp_path, workdir, overrides, script="launch.py"):
    """launch.py (or a script run like it) with configs/tiny.py and the flags that make it train
    exactly `tiny_config(tmp_path, **overrides)`."""
    cfg = tiny_config(tmp_path, **overrides)
    flags = {
        "data.source": "text",
        "data.text_files": cfg.data.text_files[0],
        "data.vocab_size": cfg.data.vocab_size,
        "model.vocab_size": cfg.model.vocab_size,
        "data.validation_every": cfg.data.validation_every,
        "data.cache_dir": cfg.data.cache_dir,
        **overrides,
    }
    return [
        os.path.join(REPO, script),
        "--config",
        os.path.join(REPO, "configs/tiny.py"),
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]


def jit_step(cfg, graphdef, state, mesh, *, vocab_axis=None):
    """The train step of `cfg` jitted with `state`'s shardings, without donation (tests reuse the
    state) and with an explicit `vocab_axis` (tests switch vocabulary parallelism on and off)."""
    import jax

    from mile import sharding as msharding
    from mile import state as mstate
    from mile import step as mstep
    from mile.losses import loss_from_config

    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = mstep.make_train_step(
        graphdef,
        loss_from_config(cfg.loss),
        mesh=mesh,
        chunk_size=cfg.loss.chunk_size or None,
        num_microbatches=cfg.optim.num_microbatches,
        schedule=mstate.learning_rate_schedule(cfg.optim, cfg.train.steps),
        head=cfg.loss.head,
        vocab_axis=vocab_axis,
    )
    return jax.jit(step, in_shardings=(shardings, msharding.batch_sharding(mesh)), out_shardings=(shardings, None))


# -- comparing runs (any workdir mile.paths reads: local or gs://) ----------------------------------
def restore_step(workdir, step):
    """(state as NumPy, data_state) of checkpoint `step`, verified against its checksums."""
    import jax
    import ml_collections

    from mile import paths
    from mile import sharding as msharding
    from mile import state as mstate
    from mile.checkpoint import Checkpointer

    with Checkpointer.reader(paths.join(workdir, "checkpoints")) as ck:
        cfg = ml_collections.ConfigDict(ck.saved_config(step))
        cfg.sharding_rules = tuple(tuple(r) for r in cfg.sharding_rules)
        mesh = msharding.make_mesh(cfg.mesh)
        _, abstract = msharding.abstract_sharded(mstate.state_builder(cfg), mesh, cfg.sharding_rules)
        state, data_state = ck.restore(step, abstract)  # verifies the checksums too
    return jax.tree.map(np.asarray, state), data_state


def train_losses(workdir):
    """[(step, train loss)] in metrics.jsonl order."""
    from mile.metrics import read_metrics

    return [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]


def assert_same_run(a, b, step):
    """Runs `a` and `b` hold bit-identical checkpoints of `step` and the same loss rows."""
    import jax

    (sa, da), (sb, db) = restore_step(a, step), restore_step(b, step)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    assert da == db
    assert train_losses(a) == train_losses(b)  # every step once, and the same losses


def steps_on_disk(workdir):
    from mile import paths

    ckpts = paths.join(workdir, "checkpoints")
    return sorted(int(d) for d in paths.listdir(ckpts) if d.isdigit()) if paths.isdir(ckpts) else []


# -- bounded subprocesses --------------------------------------------------------------------------
def compile_cache_env(directory) -> dict:
    """Environment for subprocesses that share a persistent XLA compilation cache (tests' speed only)."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def start(argv, log_path, **env):
    """`python argv...` in its own session (killable as a group), output to `log_path`, with 8 CPU
    devices like the test process."""
    log = open(log_path, "w+")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
    proc = subprocess.Popen(
        [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
    )
    return proc, log


def wait(proc, log, timeout_s):
    """(return code, output); SIGKILLs the process group and fails if it overruns."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        rc = None
    log.seek(0)
    out = log.read()
    assert rc is not None, f"overran {timeout_s} s and was killed:\n{out[-3000:]}"
    return rc, out


def wait_for(condition, proc, log, what, timeout_s):
    """Polls `condition` until true; kills the process and fails if it ends or `timeout_s` passes first."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it had already ended
                pass
            proc.wait(timeout=30)
            log.seek(0)
            pytest.fail(f"{what} never happened:\n{log.read()[-3000:]}")
        time.sleep(0.02)
