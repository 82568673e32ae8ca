"""mile.dense: values and gradients against a float64 NumPy formula, and the platform split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mile.dense import dense


@pytest.mark.parametrize(
    "x_shape, w_shape, contract",
    [
        ((2, 5, 3), (3, 7), 1),  # x narrower than dy: x is transposed for the weight gradient
        ((2, 5, 7), (7, 3), 1),  # dy narrower: dy is transposed, then the small result
        ((2, 5, 2, 3), (2, 3, 4), 2),  # attention's output projection: heads x head_dim contracted
    ],
)
def test_dense_value_and_gradients_match_float64_formula(x_shape, w_shape, contract):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    out_shape = x_shape[: len(x_shape) - contract] + w_shape[contract:]
    cotangent = rng.normal(size=out_shape)

    def loss(x, w):
        return jnp.sum(dense(x, w, contract) * cotangent.astype(np.float32))

    value, (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        x.astype(np.float32), w.astype(np.float32)
    )

    k = int(np.prod(w_shape[:contract]))
    x2, w2, c2 = x.reshape(-1, k), w.reshape(k, -1), cotangent.reshape(-1, int(np.prod(w_shape[contract:])))
    np.testing.assert_allclose(value, np.sum((x2 @ w2) * c2), rtol=1e-5)
    np.testing.assert_allclose(dx, (c2 @ w2.T).reshape(x_shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, (x2.T @ c2).reshape(w_shape), rtol=1e-5, atol=1e-5)


def test_only_cpu_gets_the_explicit_transpose():
    """Lowered for CPU the weight gradient carries the barrier; lowered for TPU it is the plain dot."""
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(dense(x, w)), argnums=1))
    args = (jnp.ones((8, 3)), jnp.ones((3, 5)))
    cpu = grad.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    tpu = grad.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "optimization_barrier" in cpu
    assert "optimization_barrier" not in tpu and "dot_general" in tpu
