"""The trainer's iterators: a data config and a ``PreparedData`` -> this process's grain batches.

``seq_len`` and ``global_batch_size`` come from the config's data section unless passed.
"""

from __future__ import annotations

from typing import Any, Callable

import grain

from mile.data import pipeline
from mile.data.config import DataConfig
from mile.data.prepared import PreparedData


def train_iterator(
    data_cfg: DataConfig | Any,
    prepared: PreparedData,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    seq_len: int | None = None,
    global_batch_size: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled, checkpointable training batches for this process (seed: data.shuffle_seed)."""
    cfg = DataConfig.from_cfg(data_cfg)
    return _iterate(
        pipeline.train_dataset,
        cfg,
        prepared,
        "train",
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=int(seed if seed is not None else cfg.shuffle_seed),
        read_workers=cfg.read_workers,
        process_index=process_index,
        process_count=process_count,
    )


def eval_iterator(
    data_cfg: DataConfig | Any,
    prepared: PreparedData,
    *,
    num_batches: int | None,
    process_index: int = 0,
    process_count: int = 1,
    seq_len: int | None = None,
    global_batch_size: int | None = None,
) -> grain.DatasetIterator:
    """A fresh, deterministic, finite pass of evaluation batches (call again for each eval)."""
    return _iterate(
        pipeline.eval_dataset,
        DataConfig.from_cfg(data_cfg),
        prepared,
        "eval",
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        num_batches=num_batches,
        process_index=process_index,
        process_count=process_count,
    )


def _iterate(
    make_dataset: Callable[..., grain.IterDataset],
    cfg: DataConfig,
    prepared: PreparedData,
    split: str,
    *,
    seq_len: int | None,
    global_batch_size: int | None,
    **kwargs,
) -> grain.DatasetIterator:
    """``make_dataset`` over the split, shaped by the section unless seq_len/global_batch_size are given."""
    dataset = make_dataset(
        prepared.open(split),
        prepared.tokenizer,
        seq_len=cfg.seq_len if seq_len is None else seq_len,
        global_batch_size=cfg.global_batch_size if global_batch_size is None else global_batch_size,
        read_threads=cfg.read_threads,
        **kwargs,
    )
    return iter(dataset)
