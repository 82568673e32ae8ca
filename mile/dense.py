"""`dense(x, w)`: x's last dims contracted with w's first, with a weight gradient XLA:CPU runs well.

The weight gradient of `x @ w` contracts over the tokens, the leading dimension of both x
[tokens, K] and the output gradient dy [tokens, N]. XLA:CPU feeds its matmuls (YNNPACK) by
writing one of them out transposed, and in the autodiff graph it picks dy: for the SwiGLU gate that copy is fused with the SiLU backward and
reads four [tokens, 704] arrays column by column, about 12% of the CPU step's op time
(experiments/profile_step.py). Here the narrower operand is transposed on its own (a plain,
tiled transpose) behind an optimization barrier that keeps XLA from folding it back, so every
matmul is in the form the library wants. Each output element sums the same products; the
step's losses are unchanged. Other platforms choose layouts themselves and get the plain formula
(`jax.lax.platform_dependent` picks when the step is lowered, so TPU compiles on a CPU host
get theirs).
"""

from __future__ import annotations

import math

import jax


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., *K] with w [*K, *N] -> [..., *N], K the last `contract` dims of x."""
    k_shape, n_shape = w.shape[:contract], w.shape[contract:]
    batch_shape = x.shape[: x.ndim - contract]
    x2 = x.reshape(math.prod(batch_shape), math.prod(k_shape))
    y2 = _matmul(x2, w.reshape(x2.shape[1], math.prod(n_shape)))
    return y2.reshape(*batch_shape, *n_shape)


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
    x, w = residuals
    return dy @ w.T, jax.lax.platform_dependent(x, dy, cpu=_weight_grad_cpu, default=_weight_grad)


def _weight_grad(x, dy):
    """x [T, K], dy [T, N] -> x^T dy [K, N], as autodiff writes it."""
    return x.T @ dy


def _weight_grad_cpu(x, dy):
    """The same sums, with the narrower operand transposed on its own (module docstring)."""
    if x.shape[1] <= dy.shape[1]:
        return jax.lax.optimization_barrier(x.T) @ dy
    return (jax.lax.optimization_barrier(dy.T) @ x).T  # the small [N, K] result transposes cheaply


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
