"""Local documents -> a TFDS dataset stored as ArrayRecord, written and read without TensorFlow.

``build_text_dataset`` writes ``<data_dir>/mile_text_corpus/1.0.0/`` with splits ``train`` and
``validation`` (every ``validation_every``-th document, counting from 1, is held out) and one
feature, ``text`` (string). ``data_dir`` is keyed by a fingerprint of the documents and the
split rule, so a changed corpus gets a fresh dataset instead of a stale one.

``open_source`` opens any ArrayRecord TFDS dataset (this one, or a catalogue one such as
``c4/en``) as a random-access source of documents (``str``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Sequence

from etils import epath
import tensorflow_datasets as tfds

DATASET_NAME = "mile_text_corpus"
_VERSION = "1.0.0"


def split_documents(docs: Sequence[str], validation_every: int) -> tuple[list[str], list[str]]:
    """Deterministic hold-out: document i (0-based) is validation iff (i + 1) % validation_every == 0."""
    if validation_every < 2:
        raise ValueError(
            f"validation_every={validation_every} must be >= 2 (1 in N documents is held out); e.g. 50."
        )
    train = [d for i, d in enumerate(docs) if (i + 1) % validation_every]
    validation = [d for i, d in enumerate(docs) if (i + 1) % validation_every == 0]
    if not validation:
        raise ValueError(
            f"corpus has {len(docs)} documents, too few to hold out 1 in {validation_every}; add documents or lower data.validation_every."
        )
    return train, validation


def fingerprint(docs: Sequence[str], validation_every: int) -> str:
    """A short stable hash of the documents (and their order) plus the split rule."""
    h = hashlib.sha256(f"{DATASET_NAME}:{_VERSION}:{validation_every}:{len(docs)}".encode())
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed, so doc boundaries count.
        h.update(data)
    return h.hexdigest()[:16]


class MileTextCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents given in memory; reading an already-built copy needs no documents."""

    VERSION = tfds.core.Version(_VERSION)
    # TFDS derives this from the module's package resources, which imports `importlib_resources`
    # (not installed here); the file's own path is all it needs (to look for checksums.tsv).
    code_path = epath.Path(__file__)

    def __init__(self, *, documents: Sequence[str] | None = None, validation_every: int = 50, **kwargs):
        self._documents = documents
        self._validation_every = validation_every
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            # Keep document order: the split rule and tests rely on it; the pipeline shuffles.
            disable_shuffling=True,
            description="Local text documents, one example per document.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        if self._documents is None:
            raise ValueError(
                "MileTextCorpus needs documents= to build; use mile.data.tfds_corpus.build_text_dataset."
            )
        train, validation = split_documents(self._documents, self._validation_every)
        return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


def build_text_dataset(
    docs: Sequence[str], cache_dir: str | os.PathLike, validation_every: int = 50
) -> pathlib.Path:
    """Builds (once) the ArrayRecord dataset for these documents; returns its TFDS data_dir."""
    data_dir = pathlib.Path(cache_dir) / "tfds" / fingerprint(docs, validation_every)
    builder = MileTextCorpus(documents=docs, validation_every=validation_every, data_dir=str(data_dir))
    if not builder.is_prepared():
        # A one-off build of a small local corpus: TFDS's nested progress bars are only noise.
        tfds.disable_progress_bar()
        # TFDS writes into a temp dir and renames at the end, so a crash leaves no half dataset.
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return data_dir


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
