"""A TFDS ArrayRecord dataset built here (no TensorFlow), for the data.source="tfds" tests."""

import tensorflow_datasets as tfds
from etils import epath


class MileTestCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents given in memory, one split each; a "text" feature."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS looks for checksums beside the builder's module; this file is all it needs.
    code_path = epath.Path(__file__)

    def __init__(self, *, splits=None, **kwargs):
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # the tests compare documents in order
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(docs) for name, docs in self._splits.items()}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc}


def build_tfds_dataset(data_dir, splits):
    """Writes `mile_test_corpus` with the given {split: documents} under data_dir; returns data_dir."""
    builder = MileTestCorpus(splits=splits, data_dir=str(data_dir))
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir
