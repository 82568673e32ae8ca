"""Content checksums of a checkpoint: computed when it is saved, checked when it is restored.

The checksum is over the *values* (what training would resume from), not over files: it is computed
on the devices from the sharded arrays in one jitted pass, so it needs no gathering to one host,
and it is the same whatever sharding the arrays are saved or restored with. A bit flipped in a data
file either makes the read fail or changes a value, and a changed value changes the checksum.

Per array leaf: ``sum_i bits_i * m_i (mod 2**32)`` where ``bits_i`` is element i's bit pattern
read as an unsigned integer and ``m_i`` an odd multiplier that depends on i. Flipping bit k of one
element changes the sum by ``±2**k * m_i``, which is never 0 mod 2**32 (m_i is odd and k < 32), so
any single flipped bit is always caught; moved or swapped elements change it too.

JSON items (the data iterator position, the config) are checked by a SHA-256 of canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MULT = np.uint32(0x9E3779B1)  # Knuth's multiplicative-hash constant
_OFFSET = np.uint32(0x7F4A7C15)
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _bits(x: jax.Array) -> jax.Array:
    """The element bit patterns of x as uint32 (64-bit elements become two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in _UNSIGNED:
        return lax.bitcast_convert_type(x, _UNSIGNED[size]).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # [..., size // 4]


def _leaf_checksum(x: jax.Array) -> jax.Array:
    bits = _bits(x).reshape(-1)
    multiplier = (lax.iota(jnp.uint32, bits.shape[0]) * _MULT + _OFFSET) | np.uint32(1)
    return jnp.sum(bits * multiplier, dtype=jnp.uint32)  # unsigned sums wrap mod 2**32


@jax.jit
def _checksums(leaves):
    return [_leaf_checksum(x) for x in leaves]


def tree_checksums(tree: Any) -> dict[str, int]:
    """{leaf path: checksum} of a pytree of (possibly sharded) arrays; every process gets it all."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree)
    sums = jax.device_get(_checksums([x for _, x in paths_and_leaves]))
    return {jax.tree_util.keystr(p): int(s) for (p, _), s in zip(paths_and_leaves, sums)}


def json_digest(obj: Any) -> str:
    """SHA-256 of canonical JSON (sorted keys), as obj will read back from a JSON file."""
    text = json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def first_mismatch(expected: dict[str, int], actual: dict[str, int]) -> str | None:
    """A short description of the first differing leaf, or None when the checksums agree."""
    for key in sorted(set(expected) | set(actual)):
        if key not in actual:
            return f"{key} is missing"
        if key not in expected:
            return f"{key} was not saved"
        if int(expected[key]) != int(actual[key]):
            return f"checksum of {key} differs"
    return None
