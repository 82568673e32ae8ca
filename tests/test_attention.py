"""Attention implementations (model.attention): the same numbers as the XLA path where they run here.

jax.nn.dot_product_attention runs with its XLA backend on this CPU (its cuDNN backend needs a GPU),
and the Pallas TPU splash kernel runs in the Pallas interpreter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mile import attention as A
from mile.checkpoint import config_mismatch
from mile.model import Llama, ModelConfig
from model_helpers import tiny_model_config


def _qkv(seed=0, batch=2, seq=128, heads=4, kv_heads=2, head_dim=16):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim))
    k = rng.standard_normal((batch, seq, kv_heads, head_dim))
    v = rng.standard_normal((batch, seq, kv_heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _numpy_attention(q, k, v):
    """Float64 causal grouped-query attention, straight from the definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    seq, heads, head_dim = q.shape[1:]
    k, v = (np.repeat(x, heads // x.shape[2], axis=2) for x in (k, v))  # head h reads kv h // group
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", probs, v)


IMPLS = {
    "xla": A.xla_attention,
    "jax.nn (xla backend)": lambda q, k, v: A.jax_nn_attention(q, k, v, implementation="xla"),
    "splash (interpreted)": A.splash_attention,
}


@pytest.mark.parametrize("name", list(IMPLS))
def test_attention_matches_float64_and_xla_gradients(name):
    q, k, v = _qkv()
    fn = jax.jit(IMPLS[name])
    np.testing.assert_allclose(fn(q, k, v), _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(fn), grads(A.xla_attention)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("seq", [256, 250])  # 250 does not split into 8 blocks: the whole-matrix path
def test_cpu_query_blocks_equal_the_whole_causal_matrix(seq):
    """The CPU path skips the keys above the diagonal block by block; values and gradients must be
    those of the float64 definition and of the whole masked matrix."""
    q, k, v = _qkv(seed=2, seq=seq, head_dim=8)
    blocked, whole = jax.jit(A._causal_in_query_blocks), jax.jit(A._causal_whole)
    np.testing.assert_allclose(blocked(q, k, v), _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)
    weights = jnp.sin(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads(A._causal_in_query_blocks), grads(A._causal_whole)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    if seq % A.CPU_QUERY_BLOCKS == 0:  # the CPU program holds no score for a key above the block
        hlo = blocked.lower(q, k, v).as_text()
        block = seq // A.CPU_QUERY_BLOCKS
        assert f"tensor<2x2x2x{block}x{block}xf32>" in hlo and f"2x2x2x{seq}x{seq}xf32" not in hlo


def test_splash_runs_per_shard_under_a_mesh():
    """Batch over data x fsdp and heads over tensor, each shard running its own kernel."""
    q, k, v = _qkv(seed=1, batch=4)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        out = jax.jit(A.splash_attention)(q, k, v)
        hlo = jax.jit(A.splash_attention).lower(q, k, v).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo
    np.testing.assert_allclose(out, _numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def _model(attention, **overrides):
    return Llama(tiny_model_config(attention=attention, **overrides), rngs=nnx.Rngs(0))


def test_model_with_splash_equals_xla_and_decode_still_works():
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 50, dtype=jnp.int32)
    xla, splash = (_model(a, max_seq_len=128, num_layers=1) for a in ("xla", "splash"))

    @nnx.jit
    def forward_and_grads(model):
        return model(tokens), nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)

    (h_xla, g_xla), (h_splash, g_splash) = forward_and_grads(xla), forward_and_grads(splash)
    np.testing.assert_allclose(h_splash, h_xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_splash), jax.tree.leaves(g_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # Decoding keeps its own (XLA, kv-cache) attention: prefill then one step equals the forward.
    decode = nnx.jit(lambda m, t, cache, pos: m.decode(t, cache, pos))
    prefill, cache = decode(splash, tokens[:, :127], splash.init_cache(2, 128), jnp.zeros(2, jnp.int32))
    last, _ = decode(splash, tokens[:, 127:], cache, jnp.full(2, 127, jnp.int32))
    np.testing.assert_allclose(prefill, h_splash[:, :127], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, h_splash[:, 127:], rtol=1e-5, atol=1e-5)


def test_attention_bad_input():
    with pytest.raises(ValueError, match="model.attention='flash'; expected one of xla, cudnn, splash"):
        ModelConfig.from_cfg(tiny_model_config(attention="flash"))
    with pytest.raises(ValueError, match="needs model.dtype='bfloat16'"):
        ModelConfig.from_cfg(tiny_model_config(attention="cudnn"))
    q, k, v = _qkv(seq=200)
    with pytest.raises(ValueError, match="multiple of 128"):
        A.splash_attention(q, k, v)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            A.causal_attention(q.astype(jnp.bfloat16), k, v, "cudnn")


def test_attention_choice_does_not_block_resume():
    """The implementation changes no parameter: a checkpoint may be resumed with another one."""
    saved = {"model": {"num_layers": 2, "attention": "xla"}}
    assert config_mismatch(saved, {"model": {"num_layers": 2, "attention": "splash"}}) is None
    assert (
        config_mismatch({"model": {"num_layers": 2}}, {"model": {"num_layers": 2, "attention": "xla"}})
        is None
    )
    assert "num_layers" in config_mismatch(saved, {"model": {"num_layers": 3, "attention": "xla"}})
    # Nor do rematerialisation and the compute dtype (parameters are stored in param_dtype).
    steps = {"model": {"num_layers": 2, "remat": "none", "dtype": "float32", "param_dtype": "float32"}}
    changed = {"model": {"num_layers": 2, "remat": "full", "dtype": "bfloat16", "param_dtype": "float32"}}
    assert config_mismatch(steps, changed) is None
    changed["model"]["param_dtype"] = "bfloat16"
    assert (
        config_mismatch(steps, changed)
        == "model.param_dtype: checkpoint has 'float32', config has 'bfloat16'"
    )
