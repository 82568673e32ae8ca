"""TFDS datasets stored as ArrayRecord, read without TensorFlow (data.source="tfds").

``open_source`` opens an ArrayRecord TFDS dataset (a catalogue one such as ``c4/en``, or one a
Beam pipeline built) as a random-access source of documents (``str``).
"""

from __future__ import annotations

import os
from typing import Sequence

import tensorflow_datasets as tfds


class _TextSource:
    """Random-access documents: wraps a TFDS data source and returns the text feature as ``str``."""

    def __init__(self, source, text_key: str):
        self._source = source
        self._text_key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return _as_str(self._source[index][self._text_key])

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        return [_as_str(r[self._text_key]) for r in self._source.__getitems__(indices)]

    _getitems = __getitems__  # grain's name for a batched read

    def __repr__(self) -> str:
        return f"_TextSource({self._source!r}, text_key={self._text_key!r})"


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_source(
    name: str, data_dir: str | os.PathLike | None, split: str, text_key: str = "text"
) -> _TextSource:
    """Opens a prepared ArrayRecord TFDS dataset split as a sequence of document strings.

    Works for this module's ``mile_text_corpus`` and for catalogue datasets (``c4/en``, ``lm1b``,
    ``wikipedia/20230601.en``: text key ``text``). Those must be generated ONCE in a separate
    environment that has TensorFlow (never in the training venv), e.g.::

        pip install tensorflow tensorflow-datasets apache-beam   # separate venv
        tfds build c4/en --file_format=array_record --data_dir=gs://bucket/tfds

    then point ``data.tfds_data_dir`` at that directory. Reading needs no TensorFlow.
    """
    try:
        source = tfds.data_source(
            name, split=split, data_dir=None if data_dir is None else str(data_dir), download=False
        )
    except Exception as e:  # TFDS raises several types; the message is what the user needs.
        raise ValueError(
            f"cannot open TFDS dataset {name!r} split {split!r} in {data_dir}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"-- prepare it with `tfds build {name} --file_format=array_record --data_dir=...` in a TF env."
        ) from None
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if features is not None and text_key not in features:
        raise ValueError(
            f"TFDS dataset {name!r} has no feature {text_key!r} (has {list(features)}); set data.text_key."
        )
    return _TextSource(source, text_key)
