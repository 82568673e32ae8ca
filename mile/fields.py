"""Typed config sections: ml_collections ConfigDicts in, validated frozen dataclasses out.

Config files and `--config.section.field=value` overrides stay ml_collections; each section's
owner (model -> mile.model.ModelConfig, data -> mile.data.config.DataConfig, optim ->
mile.state.OptimConfig, train -> mile.train.TrainConfig) reads it through `section()`, which
fills defaults from the dataclass and validates in one place. Every error is one line that names
the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def section(cls: type[T], cfg: Any) -> T:
    """`cls` (a frozen dataclass) from a ConfigDict, dict, or an instance (returned as is).

    Fields the section lacks take the dataclass defaults; keys the dataclass does not know are
    ignored (a config may carry settings for other tools)."""
    if isinstance(cfg, cls):
        return cfg
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    missing = object()
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = get(f.name, missing)
        if value is not missing and value is not None:
            kwargs[f.name] = value
    return cls(**kwargs)


def whole_number(key: str, value: Any, minimum: int = 1, why: str = "") -> None:
    """ValueError unless `value` is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"{key}={value!r} must be a whole number >= {minimum}{why}; "
            f"pass --config.{key}=N with N >= {minimum}"
        )


def finite_number(key: str, value: Any, low: float, *, low_ok: bool = True, high: float | None = None) -> None:
    """ValueError unless `value` is a finite number above `low` (or equal, if `low_ok`) and below `high`."""
    number = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = (
        number
        and math.isfinite(value)
        and (value >= low if low_ok else value > low)
        and (high is None or value < high)
    )
    if not ok:
        bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ValueError(f"{key}={value!r} must be a finite number {bound}; set --config.{key} in that range")


def one_of(key: str, value: Any, choices) -> None:
    """ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{key}={value!r}; use one of {', '.join(map(str, choices))}")
