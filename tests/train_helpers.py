"""Tiny configs and corpora for trainer tests (written by the tests themselves)."""

import os
import sys

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
