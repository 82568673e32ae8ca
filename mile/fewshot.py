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
    # Candidate j is pool[j], or the j-th of the other examples: no per-example copy of the task.
    n = len(pool) if pool is not None else len(examples) - 1
    if n < k:
        source = "the shot pool" if pool is not None else "the task's other examples"
        raise ValueError(f"k_shot={k} needs at least {k} shot examples, {source} has {n}; lower --k-shot.")
    picks = np.random.default_rng([seed, index]).choice(n, size=k, replace=False)
    return [pool[j] if pool is not None else examples[j + (j >= index)] for j in picks]
