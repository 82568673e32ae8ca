"""Checkpointer: round trip, resharding on restore, retention, no overwrite, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mile.checkpoint import Checkpointer, config_mismatch

CONFIG = {
    "model": {"num_layers": 4, "d_model": 64, "dims": (1, 2)},
    "data": {"seq_len": 32},
    "seed": 0,
    "train": {"lr": 1e-3},
}


def _state(offset=0.0):
    return {
        "params": {
            "w": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) + offset,
            "b": jnp.ones((8,), jnp.bfloat16) * 1.5,
        },
        "opt": {"count": jnp.asarray(7, jnp.int32), "mu": [jnp.zeros((3,), jnp.float32)]},
        "rng": jax.random.key(0),
        "step": jnp.asarray(3, jnp.int32),
    }


def _abstract(tree, sharding_for=None):
    def f(x):
        s = sharding_for(x) if sharding_for else x.sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(f, tree)


def _assert_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(
            np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x),
            np.asarray(y.astype(jnp.float32) if y.dtype == jnp.bfloat16 else y),
        )


def test_round_trip_sync_and_saved_config(tmp_path):
    state = _state()
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=3, async_save=False) as ck:
        assert ck.latest_step() is None and ck.saved_config() is None
        assert ck.save(5, state, data_state={"epoch": 1, "pos": [3, 4]}, config=CONFIG)
        assert ck.latest_step() == 5
        restored, data_state = ck.restore(5, _abstract(state))
        _assert_tree_equal(state, restored)
        # next draws from the restored typed key match the original
        np.testing.assert_array_equal(
            jax.random.normal(restored["rng"], (4,)), jax.random.normal(state["rng"], (4,))
        )
        assert data_state == {"epoch": 1, "pos": [3, 4]}
        saved = ck.saved_config()
        assert saved["model"]["num_layers"] == 4 and saved["train"]["lr"] == 1e-3
        assert config_mismatch(saved, CONFIG) is None  # tuple vs JSON list compares equal
    # a fresh manager on the same directory sees it
    with Checkpointer(tmp_path / "checkpoints", max_to_keep=3) as ck:
        assert ck.latest_step() == 5
        assert ck.saved_config(5) == saved


def test_restore_into_different_sharding(tmp_path):
    devs = jax.devices()
    assert len(devs) == 8
    mesh8 = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    mesh24 = jax.make_mesh((2, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    w = jax.device_put(
        jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8), NamedSharding(mesh8, P("x", None))
    )
    state = {"w": w, "v": jax.device_put(jnp.arange(8.0), NamedSharding(mesh8, P("x")))}
    with Checkpointer(tmp_path, max_to_keep=2, async_save=True) as ck:
        ck.save(1, state, data_state={}, config=CONFIG)
        ck.wait()
        target = {"w": NamedSharding(mesh24, P("b", "a")), "v": NamedSharding(mesh24, P())}
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k]) for k, v in state.items()}
        restored, data_state = ck.restore(1, abstract)
    assert data_state == {}
    for k in state:
        assert restored[k].sharding == target[k]
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored["v"].sharding.is_fully_replicated


def test_max_to_keep_async_and_no_overwrite(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ck:  # async by default
        for step in (10, 20, 30):
            assert ck.save(step, _state(step), data_state={"step": step}, config=CONFIG)
        ck.wait()
        assert ck.steps() == [20, 30]
        assert ck.latest_step() == 30
        # an existing step is never clobbered: the save is skipped and the old content kept
        assert ck.save(30, _state(-1.0), data_state={"step": -1}, config=CONFIG) is False
        ck.wait()
        restored, data_state = ck.restore(30, _abstract(_state()))
        assert data_state == {"step": 30}
        _assert_tree_equal(restored, _state(30))
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["20", "30"]


def test_config_mismatch():
    import copy

    assert config_mismatch(CONFIG, copy.deepcopy(CONFIG)) is None
    new = copy.deepcopy(CONFIG)
    new["train"]["lr"] = 0.5  # not a compatibility field
    assert config_mismatch(CONFIG, new) is None
    new["model"]["num_layers"] = 6
    assert config_mismatch(CONFIG, new) == "model.num_layers: checkpoint has 4, config has 6"
    new = copy.deepcopy(CONFIG)
    new["seed"] = 1
    assert config_mismatch(CONFIG, new) == "seed: checkpoint has 0, config has 1"
    new = copy.deepcopy(CONFIG)
    new["model"]["extra"] = True
    assert config_mismatch(CONFIG, new) == "model.extra: checkpoint lacks it, config has True"
    new = copy.deepcopy(CONFIG)
    del new["data"]["seq_len"]
    assert config_mismatch(CONFIG, new) == "data.seq_len: checkpoint has 32, config lacks it"
    assert config_mismatch(CONFIG, new, prefixes=("model.",)) is None


def test_config_mismatch_fields_added_later():
    """An older checkpoint lacks fields added since; it matches only their old implicit value."""
    import copy

    from mile.checkpoint import ADDED_FIELDS

    assert ADDED_FIELDS  # the loop below must check something
    for key, implicit in ADDED_FIELDS.items():
        section, name = key.split(".")
        new = copy.deepcopy(CONFIG)
        new.setdefault(section, {})[name] = implicit
        assert config_mismatch(CONFIG, new) is None, key
        new[section][name] = "something else"
        assert config_mismatch(CONFIG, new) == f"{key}: checkpoint lacks it, config has 'something else'"
