"""mile: MiLe loss and a JAX/Flax trainer for decoder-only language models.

The loss library is pure JAX (jax and numpy only):
  mile.losses  cross-entropy, the paper's focal baseline and MiLe on logits, per-token values
               (`per_token`) and additive terms for micro-batch accumulation;
  mile.fused   the same losses straight from `hidden @ unembedding`, tile by tile.
Their main functions are also reachable here, e.g. `mile.mile_loss`, `mile.per_token`,
`mile.fused_loss`. The trainer (mile.model, mile.train, ...) is imported explicitly.

`import mile` itself imports nothing: the names below load their module (and jax) on first use.
"""

from __future__ import annotations

import importlib

# name -> submodule that defines it; loaded on first access (PEP 562 module __getattr__).
_LAZY = {
    "losses": None,
    "fused": None,
    "LossSpec": "losses",
    "get_loss": "losses",
    "resolve_loss": "losses",
    "cross_entropy_loss": "losses",
    "focal_loss": "losses",
    "mile_loss": "losses",
    "per_token": "losses",
    "loss_terms": "losses",
    "combine_terms": "losses",
    "finalize_terms": "losses",
    "fused_loss": "fused",
    "fused_loss_terms": "fused",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mile' has no attribute {name!r}")
    module_name = _LAZY[name]
    if module_name is None:  # a submodule: importing it also binds it on this package
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
