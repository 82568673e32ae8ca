"""Typed config sections: configs/base.py and the dataclasses' defaults say the same thing."""

import dataclasses

import pytest

from configs import base
from mile import fields
from mile.data import DataConfig
from mile.state import OptimConfig
from mile.train import TrainConfig

# Defaults that differ on purpose: a library caller must name its data source; None and "" both
# mean "no TFDS data_dir"; the synthetic generator's parameters live in configs/synthetic.py.
_DATA_DIFFERS = {"source", "tfds_data_dir", "synthetic"}


@pytest.mark.parametrize(
    "cls, name, differs",
    [(OptimConfig, "optim", set()), (TrainConfig, "train", set()), (DataConfig, "data", _DATA_DIFFERS)],
)
def test_base_config_section_equals_the_dataclass_defaults(cls, name, differs):
    section = base.get_config()[name].to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    assert set(section) == set(defaults) - {"synthetic"}
    for key in set(section) - differs:
        value = section[key]
        assert (tuple(value) if isinstance(value, (list, tuple)) else value) == defaults[key], key


def test_section_fills_defaults_ignores_unknown_keys_and_passes_instances_through():
    got = fields.section(TrainConfig, {"steps": 7, "not_a_field": 1, "log_every": None})
    assert got == TrainConfig(steps=7)
    assert fields.section(TrainConfig, got) is got


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (TrainConfig, {"keep_checkpoints": 0}, r"^train.keep_checkpoints=0 must be a whole number >= 1 \(0 would"),
        (TrainConfig, {"steps": True}, r"^train.steps=True must be a whole number >= 1"),
        (TrainConfig, {"distributed": "maybe"}, r"^train.distributed='maybe'; use one of auto, yes, no$"),
        (OptimConfig, {"eps": 0.0}, r"^optim.eps=0.0 must be a finite number > 0; set --config.optim.eps"),
        (OptimConfig, {"b1": 1.0}, r"^optim.b1=1.0 must be a finite number >= 0 and < 1"),
        (OptimConfig, {"num_microbatches": 0}, r"^optim.num_microbatches=0 must be a whole number >= 1"),
    ],
)
def test_a_bad_field_is_one_line_naming_it(cls, values, message):
    with pytest.raises(ValueError, match=message) as e:
        cls(**values)
    assert "\n" not in str(e.value)


def test_paper_config_takes_keyword_variants_and_the_old_form():
    from configs import paper

    assert paper.get_config("size=6.7b,loss=ce") == paper.get_config("6.7b,ce")
    assert paper.get_config("loss=focal,size=1.2b") == paper.get_config("1.2b,focal")
    got = paper.get_config("size=6.7b,loss=ce")
    assert (got.model.num_layers, got.model.embed_dim, got.loss.name) == (32, 4096, "ce")
    assert got.data.global_batch_size * got.data.seq_len == 4_194_304  # tokens per update (paper-spec)
    with pytest.raises(ValueError, match="unknown setting 'lr=1'"):
        paper.get_config("size=468m,lr=1")
