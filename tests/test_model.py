"""Tests for mile.model: a float64 NumPy forward, causality, RoPE, RMSNorm, GQA, scan/remat/bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import paper
from mile import model as model_lib
from mile.model import Llama, param_count
from model_helpers import tiny_model_config


def random_tokens(batch=2, seq=12, vocab=50, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab, dtype=jnp.int32)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def params_of(model):
    return nnx.state(model, nnx.Param)


# ---------------------------------------------------------------- independent NumPy reference
def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, base):
    """Rotate-half RoPE via complex numbers: pair (i, i + d/2) is one complex coordinate."""
    seq, half = x.shape[-3], x.shape[-1] // 2
    inv_freq = base ** (-np.arange(half) * 2.0 / x.shape[-1])
    phase = np.exp(1j * np.arange(seq)[:, None] * inv_freq[None, :])[:, None, :]  # [S, 1, half]
    z = (x[..., :half] + 1j * x[..., half:]) * phase
    return np.concatenate([z.real, z.imag], axis=-1)


def np_forward(params, tokens, cfg):
    """float64 forward pass of an unscanned Llama from its raw weights, loops over heads."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), nnx.to_pure_dict(params))
    x = p["embedding"][np.asarray(tokens)]
    seq = x.shape[1]
    group = cfg.num_heads // cfg.num_kv_heads
    causal = np.tril(np.ones((seq, seq), bool))
    for i in range(cfg.num_layers):
        layer = p["layers"][i]
        h = np_rms_norm(x, layer["attn_norm"]["scale"], cfg.norm_eps)
        q = np_rope(np.einsum("bsd,dhk->bshk", h, layer["attn"]["q"]), cfg.rope_base)
        k = np_rope(np.einsum("bsd,dhk->bshk", h, layer["attn"]["k"]), cfg.rope_base)
        v = np.einsum("bsd,dhk->bshk", h, layer["attn"]["v"])
        heads = []
        for head in range(cfg.num_heads):
            kv = head // group
            scores = np.einsum("bsk,btk->bst", q[:, :, head], k[:, :, kv]) / np.sqrt(cfg.head_dim)
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            heads.append(np.einsum("bst,btk->bsk", probs, v[:, :, kv]))
        attn = np.stack(heads, axis=2)
        x = x + np.einsum("bshk,hkd->bsd", attn, layer["attn"]["o"])
        h = np_rms_norm(x, layer["mlp_norm"]["scale"], cfg.norm_eps)
        gate = h @ layer["mlp"]["gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ layer["mlp"]["up"])) @ layer["mlp"]["down"]
    return np_rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)


def randomise_norm_scales(model, seed=1):
    """Norm scales start at 1; make them random so the tests see them used."""
    key = jax.random.key(seed)
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "scale" and isinstance(var, nnx.Param):
            key, sub = jax.random.split(key)
            var[...] = 1.0 + 0.3 * jax.random.normal(sub, var.shape)


# ------------------------------------------------------------------------------------- tests
def test_forward_matches_float64_numpy():
    cfg = tiny_model_config(init_std=0.2)  # large weights so attention/MLP really move the residual
    model = Llama(cfg, rngs=nnx.Rngs(0))
    randomise_norm_scales(model)
    tokens = random_tokens()
    expected = np_forward(params_of(model), tokens, cfg)
    np.testing.assert_allclose(np.asarray(forward(model, tokens)), expected, rtol=2e-4, atol=2e-4)
    head = np.asarray(params_of(model)["head"][...], np.float64)
    np.testing.assert_allclose(np.asarray(model.logits(tokens)), expected @ head, rtol=2e-4, atol=2e-4)


def test_shapes_and_head():
    cfg = tiny_model_config()
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = random_tokens(batch=3, seq=7)
    assert model(tokens).shape == (3, 7, cfg.embed_dim)
    assert model.unembedding().shape == (cfg.embed_dim, cfg.vocab_size)
    logits = model.logits(tokens)
    assert logits.shape == (3, 7, cfg.vocab_size) and logits.dtype == jnp.float32


def test_too_long_sequence_raises():
    model = Llama(tiny_model_config(max_seq_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(seq=9))


def test_causal():
    cfg = tiny_model_config(init_std=0.2)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = random_tokens(batch=1, seq=10)
    t = 6
    changed = tokens.at[0, t].set((tokens[0, t] + 1) % cfg.vocab_size)
    before, after = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
    np.testing.assert_array_equal(before[:, :t], after[:, :t])
    assert np.abs(before[:, t:] - after[:, t:]).max(axis=-1).min() > 1e-4


def test_rope_matches_numpy():
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 3, 16)), np.float64)
    cos, sin = model_lib.rope_tables(9, 16, 500.0)
    got = model_lib.apply_rope(jnp.asarray(x, jnp.float32), cos, sin)
    np.testing.assert_allclose(np.asarray(got), np_rope(x, 500.0), rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_numpy():
    cfg = model_lib.ModelConfig.from_cfg(tiny_model_config(norm_eps=1e-3))
    norm = model_lib.RMSNorm(cfg)
    norm.scale[...] = jnp.linspace(0.5, 1.5, cfg.embed_dim)
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, cfg.embed_dim)), np.float64) * 3
    expected = np_rms_norm(x, np.linspace(0.5, 1.5, cfg.embed_dim), 1e-3)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x, jnp.float32))), expected, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    gqa = Llama(tiny_model_config(num_heads=4, num_kv_heads=2, init_std=0.2), rngs=nnx.Rngs(0))
    mha = Llama(tiny_model_config(num_heads=4, num_kv_heads=4, init_std=0.2), rngs=nnx.Rngs(1))
    group = 2
    state = nnx.to_pure_dict(params_of(gqa))
    for layer in state["layers"].values():
        for name in ("k", "v"):  # [embed, kv_heads, head_dim] -> [embed, heads, head_dim]
            layer["attn"][name] = jnp.repeat(layer["attn"][name], group, axis=1)
    nnx.replace_by_pure_dict(mha_state := params_of(mha), state)
    nnx.update(mha, mha_state)
    tokens = random_tokens()
    np.testing.assert_allclose(
        np.asarray(forward(gqa, tokens)), np.asarray(forward(mha, tokens)), rtol=1e-5, atol=1e-5
    )


def copy_scanned_into_unscanned(scanned, unscanned, num_layers):
    stacked = nnx.to_pure_dict(params_of(scanned))
    layers = stacked.pop("layers")
    stacked["layers"] = {i: jax.tree.map(lambda a: a[i], layers) for i in range(num_layers)}
    state = params_of(unscanned)
    nnx.replace_by_pure_dict(state, stacked)
    nnx.update(unscanned, state)


def test_scan_layers_matches_loop():
    cfg = tiny_model_config(init_std=0.2, num_layers=3)
    scanned = Llama(tiny_model_config(init_std=0.2, num_layers=3, scan_layers=True), rngs=nnx.Rngs(0))
    looped = Llama(cfg, rngs=nnx.Rngs(1))
    assert params_of(scanned)["layers"]["attn"]["q"].shape == (3, 32, 4, 8)
    copy_scanned_into_unscanned(scanned, looped, 3)
    tokens = random_tokens()
    np.testing.assert_allclose(
        np.asarray(forward(scanned, tokens)), np.asarray(forward(looped, tokens)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_same_values_and_gradients(scan_layers):
    tokens = random_tokens()

    def value_and_grads(remat):
        model = Llama(tiny_model_config(init_std=0.2, remat=remat, scan_layers=scan_layers), rngs=nnx.Rngs(0))
        loss = lambda m: jnp.mean(m.logits(tokens) ** 2)
        return nnx.jit(nnx.value_and_grad(loss))(model)

    plain_loss, plain_grads = value_and_grads("none")
    remat_loss, remat_grads = value_and_grads("full")
    np.testing.assert_allclose(plain_loss, remat_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bfloat16_compute_close_to_float32():
    tokens = random_tokens()
    full = Llama(tiny_model_config(init_std=0.2), rngs=nnx.Rngs(0))
    half = Llama(tiny_model_config(init_std=0.2, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert half.embedding.dtype == jnp.float32  # params stay fp32
    assert half.unembedding().dtype == jnp.bfloat16
    out = forward(half, tokens)
    assert out.dtype == jnp.bfloat16
    error = np.abs(np.asarray(out, np.float32) - np.asarray(forward(full, tokens)))
    assert error.mean() < 0.02 and error.max() < 0.2  # hidden states have unit RMS


@pytest.mark.parametrize("scan_layers", [False, True])
def test_param_count_formula(scan_layers):
    cfg = tiny_model_config(scan_layers=scan_layers, num_layers=3)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    counted = sum(x.size for x in jax.tree.leaves(params_of(model)))
    assert counted == param_count(cfg)


def test_param_count_of_paper_468m():
    cfg = paper.get_config("468m,ce").model  # the shipped config, not a copy of its numbers
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    counted = sum(x.size for x in jax.tree.leaves(params_of(abstract)))
    assert counted == param_count(cfg)
    assert round(param_count(cfg) / 1e6) == 468


def test_init_statistics():
    cfg = tiny_model_config(vocab_size=512, embed_dim=64, init_std=0.01)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    for weight in (model.embedding, model.head, model.layers[0].mlp.gate, model.layers[1].attn.q):
        values = np.asarray(weight[...])
        assert abs(values.std() - 0.01) < 0.0005 and abs(values.mean()) < 0.0005
    np.testing.assert_array_equal(np.asarray(model.final_norm.scale[...]), 1.0)


def test_logical_axis_names():
    model = Llama(tiny_model_config(scan_layers=True), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(params_of(model))
    assert specs["embedding"].get_value() == jax.P("vocab", "embed")
    assert specs["head"].get_value() == jax.P("embed", "vocab")
    assert specs["layers"]["attn"]["q"].get_value() == jax.P("layers", "embed", "heads", "head_dim")
    assert specs["layers"]["attn"]["k"].get_value() == jax.P("layers", "embed", "kv_heads", "head_dim")
    assert specs["layers"]["attn"]["o"].get_value() == jax.P("layers", "heads", "head_dim", "embed")
    assert specs["layers"]["mlp"]["down"].get_value() == jax.P("layers", "mlp", "embed")
    assert specs["final_norm"]["scale"].get_value() == jax.P("embed")


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Llama(tiny_model_config(num_heads=4, num_kv_heads=3), rngs=nnx.Rngs(0))
