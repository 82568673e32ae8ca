"""The training state: the model and its optax optimiser, built from a run config.

The trainer builds it sharded, `mile.aot` abstractly, and `mile.restore` as the target that a
checkpoint is read into: all three go through `state_builder`, so they build the same tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from mile import fields
from mile import sharding as msharding
from mile.model import Llama


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The run config's `optim` section: AdamW + linear warmup + cosine decay + global-norm clipping."""

    learning_rate: float = 3e-3  # peak, reached after warmup_steps
    end_learning_rate: float = 0.0  # where the cosine decay ends, at train.steps
    warmup_steps: int = 30  # linear warmup from 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ("norm",)  # parameters whose path contains one of these get no decay
    clip_norm: float = 1.0  # global gradient norm
    num_microbatches: int = 1  # gradient accumulation: the global batch is split into this many

    @classmethod
    def from_cfg(cls, cfg) -> "OptimConfig":
        return fields.section(cls, cfg)

    def __post_init__(self):
        object.__setattr__(self, "no_decay", tuple(self.no_decay))
        fields.whole_number("optim.num_microbatches", self.num_microbatches)
        fields.whole_number("optim.warmup_steps", self.warmup_steps, minimum=0)
        for name in ("learning_rate", "end_learning_rate", "weight_decay"):
            fields.finite_number(f"optim.{name}", getattr(self, name), 0.0)
        for name in ("clip_norm", "eps"):
            fields.finite_number(f"optim.{name}", getattr(self, name), 0.0, low_ok=False)
        for name in ("b1", "b2"):
            fields.finite_number(f"optim.{name}", getattr(self, name), 0.0, high=1.0)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to end_learning_rate."""
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.end_learning_rate,
    )


def _decay_mask(params: nnx.State, no_decay) -> Any:
    """True for parameters that get weight decay: none whose path contains a `no_decay` string."""

    def decays(path, _):
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        return not any(word in name for word in no_decay)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule above (no decay where `no_decay` says).

    `optim_cfg`: an OptimConfig or the ConfigDict section (not validated here: the run checks it,
    and tests build deliberately broken optimisers)."""
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    no_decay = tuple(optim_cfg.no_decay)
    return optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=lambda p: _decay_mask(p, no_decay),
        ),
    )


def state_builder(cfg):
    """A function that builds (model, optimiser) for `cfg` (run it sharded, or abstractly)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps)

    def build():
        model = Llama(cfg.model, rngs=nnx.Rngs(cfg.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return build


def build_state(cfg, mesh, rules):
    """(graphdef, sharded state, build) of model + optimiser, created directly with target shardings."""
    build = state_builder(cfg)
    model, optimizer = msharding.create_sharded(build, mesh, rules)
    graphdef, state = nnx.split((model, optimizer))
    return graphdef, state, build
