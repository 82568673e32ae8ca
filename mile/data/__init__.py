"""Data for mile: corpus files -> ArrayRecord store -> tokenizer -> (token store) -> grain batches.

The trainer calls three functions, each with the run config's ``data`` section (a ``DataConfig``,
or the ConfigDict/dict it is read from; ``mile.data.config`` lists and documents every key)::

    prepared = mile.data.prepare(cfg.data)                    # idempotent; cached on disk
    train_it = mile.data.train_iterator(cfg.data, prepared,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
    eval_it = mile.data.eval_iterator(cfg.data, prepared, num_batches=N,
                                      process_index=..., process_count=...)

The batch shape is ``data.seq_len`` and ``data.global_batch_size`` (G) unless ``seq_len=`` /
``global_batch_size=`` are passed. Batches: ``{"inputs": int32[B,S], "targets": int32[B,S],
"mask": float32[B,S]}`` with ``B = G // process_count`` (see ``mile.data.pipeline``).
``train_it.get_state()`` is a small JSON-serialisable dict; ``train_it.set_state(state)`` on a
fresh iterator built with the same config/seed/process layout resumes at exactly the next batch.
``prepared.open("train" | "eval")`` gives a split's documents as a random-access sequence.

Modules: ``config`` (DataConfig), ``prepared`` (prepare, PreparedData), ``iterators``
(train_iterator, eval_iterator), ``pipeline`` (grain datasets), ``packing``, ``tokenizer``,
``sources`` (input formats), ``corpus`` (the bad-record rule, KJV), ``store`` (sharded
ArrayRecord stores), ``build`` (units that fill them), ``tfds_corpus`` (TFDS datasets),
``synthetic``.
"""

from mile.data.config import DataConfig
from mile.data.iterators import eval_iterator, train_iterator
from mile.data.prepared import FINGERPRINT_KEY, Builder, PreparedData, check_fingerprint, check_fits, prepare
from mile.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PreparedData",
    "DataConfig",
    "Tokenizer",
    "prepare",
    "load_tokenizer",
    "check_fingerprint",
    "check_fits",
    "Builder",
    "FINGERPRINT_KEY",
    "train_iterator",
    "eval_iterator",
]
