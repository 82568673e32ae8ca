"""Tests for mile.sharding on the 8 fake CPU devices from conftest.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mile import sharding
from mile.model import Llama
from mile.sharding import DEFAULT_RULES, logical_to_spec
from model_helpers import tiny_model_config


def mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def model_cfg(**overrides):
    return tiny_model_config(**{"vocab_size": 64, "init_std": 0.2, "scan_layers": True, **overrides})


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(mesh_cfg(2, 2, 2))


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "sizes, shape",
    [
        ((2, 2, 2), (2, 2, 2)),
        ((-1, 2, 1), (4, 2, 1)),
        ((1, -1, 2), (1, 4, 2)),
        ((1, 1, -1), (1, 1, 8)),
    ],
)
def test_make_mesh_shapes(sizes, shape):
    mesh = sharding.make_mesh(mesh_cfg(*sizes))
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_wrong_size_message():
    with pytest.raises(
        ValueError,
        match=r"mesh data=3 fsdp=2 tensor=1 needs 6 devices but 8 are "
        r"available; set --config.mesh.data=-1",
    ):
        sharding.make_mesh(mesh_cfg(3, 2, 1))


@pytest.mark.parametrize("sizes", [(-1, -1, 2), (3, -1, 1), (0, 8, 1)])
def test_make_mesh_invalid(sizes):
    with pytest.raises(ValueError, match="mesh data="):
        sharding.make_mesh(mesh_cfg(*sizes))


def test_logical_to_spec_rules():
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), DEFAULT_RULES) == P(
        None, "fsdp", "tensor", None
    )
    assert logical_to_spec(("batch", "seq"), DEFAULT_RULES) == P(("data", "fsdp"), None)
    assert logical_to_spec((), DEFAULT_RULES) == P()
    assert logical_to_spec((None, "embed"), DEFAULT_RULES) == P(None, "fsdp")


def test_logical_to_spec_drops_reused_mesh_axis():
    # 'heads' and 'mlp' both map to 'tensor': the second use is dropped.
    assert logical_to_spec(("heads", "mlp"), DEFAULT_RULES) == P("tensor", None)
    rules = (("a", ("data", "fsdp")), ("b", ("fsdp", "tensor")))
    assert logical_to_spec(("a", "b"), rules) == P(("data", "fsdp"), "tensor")


def test_logical_to_spec_accepts_config_style_rules():
    rules = [["vocab", ["tensor"]], ["embed", "fsdp"], ["layers", None]]
    assert logical_to_spec(("layers", "vocab", "embed"), rules) == P(None, "tensor", "fsdp")
    assert logical_to_spec(("vocab",), {"vocab": ("data", "tensor")}) == P(("data", "tensor"))


def test_logical_to_spec_non_divisible_falls_back(mesh):
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES, shape=(63, 32), mesh=mesh) == P(None, "fsdp")
    # batch of 2 on data=2 x fsdp=2: keep the prefix that divides.
    assert logical_to_spec(("batch", "seq"), DEFAULT_RULES, shape=(2, 5), mesh=mesh) == P("data", None)


def test_logical_to_spec_unknown_name():
    with pytest.raises(ValueError, match="'embd' has no rule"):
        logical_to_spec(("embd",), DEFAULT_RULES)


def test_batch_sharding(mesh):
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


def build_model_and_optimizer(cfg):
    model = Llama(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)


@pytest.fixture(scope="module")
def sharded(mesh):
    return sharding.create_sharded(lambda: build_model_and_optimizer(model_cfg()), mesh, DEFAULT_RULES)


def test_created_params_follow_rule_table(sharded):
    model, _ = sharded
    assert model.embedding.sharding.spec == P("tensor", "fsdp")
    assert model.head.sharding.spec == P("fsdp", "tensor")
    assert model.layers.attn.q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.layers.attn.k.sharding.spec == P(None, "fsdp", "tensor", None)
    assert model.layers.attn.o.sharding.spec == P(None, "tensor", None, "fsdp")
    assert model.layers.mlp.down.sharding.spec == P(None, "tensor", "fsdp")
    assert model.final_norm.scale.sharding.spec == P("fsdp")
    # Each device holds a quarter of the embedding (vocab/2 x embed/2).
    shard_shapes = {s.data.shape for s in model.embedding[...].addressable_shards}
    assert shard_shapes == {(32, 16)}


# Every parameter of model_cfg() (scan_layers: a leading layers axis of 2) on the 2 x 2 x 2 mesh
# under DEFAULT_RULES, written out by hand: vocab -> tensor, embed -> fsdp, heads / kv_heads /
# mlp -> tensor, layers and head_dim whole. All sizes divide by 2, so nothing falls back.
TINY_PARAM_SPECS = {
    ("embedding",): P("tensor", "fsdp"),  # [64, 32]
    ("head",): P("fsdp", "tensor"),  # [32, 64]
    ("final_norm", "scale"): P("fsdp"),  # [32]
    ("layers", "attn_norm", "scale"): P(None, "fsdp"),  # [2, 32]
    ("layers", "mlp_norm", "scale"): P(None, "fsdp"),
    ("layers", "attn", "q"): P(None, "fsdp", "tensor", None),  # [2, 32, 4, 8]
    ("layers", "attn", "k"): P(None, "fsdp", "tensor", None),  # [2, 32, 2, 8]
    ("layers", "attn", "v"): P(None, "fsdp", "tensor", None),
    ("layers", "attn", "o"): P(None, "tensor", None, "fsdp"),  # [2, 4, 8, 32]
    ("layers", "mlp", "gate"): P(None, "fsdp", "tensor"),  # [2, 32, 48]
    ("layers", "mlp", "up"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down"): P(None, "tensor", "fsdp"),  # [2, 48, 32]
}


def _expected_spec(path):
    """(model, optimizer) state path -> its hand-written spec: parameters and Adam's two moments
    per TINY_PARAM_SPECS, the scalars (Adam's count, the optimizer step) replicated."""
    if path[0] == 0:
        return TINY_PARAM_SPECS[path[1:]]
    if path[:3] == (1, "opt_state", 0) and path[3] in ("mu", "nu"):
        return TINY_PARAM_SPECS[path[4:]]
    assert path in ((1, "opt_state", 0, "count"), (1, "step")), path
    return P()


def test_optimizer_moments_mirror_params(sharded, mesh):
    model, optimizer = sharded
    state = nnx.state((model, optimizer))
    assert {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))} == set(TINY_PARAM_SPECS)
    paths = [path for path, _ in nnx.to_flat_state(state)]
    assert len(paths) == 3 * len(TINY_PARAM_SPECS) + 2  # params, mu, nu, count, step
    # Where the arrays are, and what state_shardings asks for, both against the hand table.
    for path, leaf in nnx.to_flat_state(state):
        assert leaf.get_value().sharding == jax.sharding.NamedSharding(mesh, _expected_spec(path)), path
    for path, leaf in nnx.to_flat_state(sharding.state_shardings(state, mesh, DEFAULT_RULES)):
        assert leaf.get_value() == jax.sharding.NamedSharding(mesh, _expected_spec(path)), path


def test_sharded_creation_matches_unsharded_values(sharded):
    model, _ = sharded
    plain = Llama(model_cfg(), rngs=nnx.Rngs(0))
    for a, b in zip(
        jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(plain, nnx.Param))
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)  # jit vs eager: ulps


def test_jitted_sharded_forward_and_train_step(mesh):
    """The trainer's pattern: split at the step boundary, jit with explicit shardings."""
    model, optimizer = sharding.create_sharded(
        lambda: build_model_and_optimizer(model_cfg()), mesh, DEFAULT_RULES
    )
    plain_model, plain_optimizer = build_model_and_optimizer(model_cfg())
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, 64, dtype=jnp.int32)

    graphdef, state = nnx.split((model, optimizer))
    state_sh = sharding.state_shardings(state, mesh, DEFAULT_RULES)
    batch_sh = sharding.batch_sharding(mesh)

    def loss_fn(m, batch):
        return jnp.mean(m.logits(batch) ** 2)

    def train_step(state, batch):
        m, opt = nnx.merge(graphdef, state)
        hidden = m(batch)
        loss, grads = nnx.value_and_grad(loss_fn)(m, batch)
        opt.update(m, grads)
        return nnx.state((m, opt)), loss, hidden, grads

    step = jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None, None, None),
        donate_argnums=0,
    )
    new_state, loss, hidden, sharded_grads = step(state, jax.device_put(tokens, batch_sh))

    # Same step without sharding.
    plain_loss, grads = nnx.value_and_grad(loss_fn)(plain_model, tokens)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(plain_model(tokens)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    plain_optimizer.update(plain_model, grads)
    new_model, _ = nnx.merge(graphdef, new_state)
    assert new_model.layers.attn.q.sharding.spec == P(None, "fsdp", "tensor", None)
    # Adam's first step is ~lr * sign(grad): near-zero gradients amplify float noise, hence atol.
    for a, b in zip(
        jax.tree.leaves(nnx.state(new_model, nnx.Param)), jax.tree.leaves(nnx.state(plain_model, nnx.Param))
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_tiny_model_with_odd_vocab_still_shards(mesh):
    model = sharding.create_sharded(
        lambda: Llama(model_cfg(vocab_size=63, scan_layers=False), rngs=nnx.Rngs(0)), mesh, DEFAULT_RULES
    )
    assert model.embedding.sharding.spec == P(None, "fsdp")
    assert model.layers[1].mlp.up.sharding.spec == P("fsdp", "tensor")


def test_abstract_sharded_allocates_nothing(mesh):
    build = lambda: build_model_and_optimizer(model_cfg())
    graphdef, abstract = sharding.abstract_sharded(build, mesh, DEFAULT_RULES)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    model_state = abstract[0]
    assert model_state["embedding"].get_value().sharding.spec == P("tensor", "fsdp")
    assert model_state["layers"]["attn"]["q"].get_value().shape == (2, 32, 4, 8)
    # Works inside a mesh context too (the trainer may already be under jax.set_mesh).
    with jax.set_mesh(mesh):
        _, again = sharding.abstract_sharded(build, mesh, DEFAULT_RULES)
    assert jax.tree.structure(again) == jax.tree.structure(abstract)
