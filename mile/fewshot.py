"""The one few-shot sampling rule, shared by multiple choice (mile.multiple_choice) and QA (mile.qa).

Example `index` gets `k` demonstrations drawn without replacement by NumPy's generator seeded with
`[seed, index]`: from `pool` when one is given, otherwise from the task's other examples (never the
example itself). So a draw depends only on (seed, index, the candidates), not on the order in
which examples are processed.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")


def draw_shots(
    examples: Sequence[T], index: int, k: int, seed: int, pool: Sequence[T] | None = None
) -> list[T]:
    """The k demonstrations of examples[index] (empty for k = 0)."""
    if k < 0:
        raise ValueError(f"k_shot={k} is negative; pass 0 or more (--k-shot)")
    if k == 0:
        return []
    candidates = list(pool) if pool is not None else [e for i, e in enumerate(examples) if i != index]
    if len(candidates) < k:
        source = "the shot pool" if pool is not None else "the task's other examples"
        raise ValueError(
            f"k_shot={k} needs at least {k} shot examples, {source} has {len(candidates)}; lower --k-shot."
        )
    rng = np.random.default_rng([seed, index])
    return [candidates[j] for j in rng.choice(len(candidates), size=k, replace=False)]
