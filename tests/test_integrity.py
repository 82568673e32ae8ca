"""Checkpoint integrity: content checksums, and every kind of damage to a checkpoint on disk gives a
one-line CorruptCheckpointError, with the walk back to the newest step that verifies."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mile import integrity
from mile.checkpoint import Checkpointer, CorruptCheckpointError
from mile.restore import restore_latest_verified, set_aside

CONFIG = {"model": {"num_layers": 2}, "seed": 0}


def _numpy_checksum(x: np.ndarray) -> int:
    """Independent reference: sum_i bits_i * (odd multiplier of i) mod 2**32, in NumPy uint64."""
    x = np.ascontiguousarray(x)
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).reshape(-1).astype(np.uint64)
    idx = np.arange(bits.size, dtype=np.uint64)
    mult = ((idx * 0x9E3779B1 + 0x7F4A7C15) % 2**32) | 1
    return int(np.sum(bits * mult, dtype=np.uint64) % 2**32)


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(40,)), jnp.bfloat16),
        "count": jnp.asarray(7, jnp.int32),
        "rng": jax.random.key(3),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_checksum_matches_numpy_reference_and_ignores_sharding():
    state = _state()
    sums = integrity.tree_checksums(state)
    assert sums["['w']"] == _numpy_checksum(np.asarray(state["w"]))
    assert sums["['b']"] == _numpy_checksum(np.asarray(state["b"]))
    assert sums["['count']"] == _numpy_checksum(np.asarray(state["count"]).reshape(1))
    assert sums["['rng']"] == _numpy_checksum(np.asarray(jax.random.key_data(state["rng"])))
    # The same values sharded over 8 devices (as a restore may place them) give the same sums.
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    sharded = dict(state, w=jax.device_put(state["w"], NamedSharding(mesh, P("a", "b"))))
    assert integrity.tree_checksums(sharded) == sums


def test_every_single_bit_flip_changes_the_checksum():
    x = np.asarray(_state()["w"])
    base = integrity.tree_checksums({"w": x})["['w']"]
    rng = np.random.default_rng(1)
    for flat, bit in zip(rng.integers(0, x.size, 64), list(range(32)) * 2):
        y = x.copy().reshape(-1).view(np.uint32)
        y[flat] ^= np.uint32(1 << int(bit))
        assert integrity.tree_checksums({"w": y.view(np.float32).reshape(x.shape)})["['w']"] != base


# --- damage on disk -----------------------------------------------------------------------------


def _save(directory, steps=(2, 4)):
    with Checkpointer(directory, max_to_keep=5, async_save=False) as ck:
        for step in steps:
            ck.save(step, _state(step), data_state={"pos": step}, config=CONFIG)


def _largest_state_file(directory, step):
    files = [f for f in glob.glob(f"{directory}/{step}/state/**/*", recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _flip_bit(directory, step):
    path = _largest_state_file(directory, step)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


def _truncate(directory, step):
    path = _largest_state_file(directory, step)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _remove_state(directory, step):
    shutil.rmtree(f"{directory}/{step}/state")


def _edit_data_state(directory, step):
    with open(f"{directory}/{step}/data_state/metadata", "w") as f:
        json.dump({"pos": 999}, f)


DAMAGE = {
    "flipped bit": (
        _flip_bit,
        r"checkpoint step 4 in .* failed its integrity check \(checksum of \['\w+'\] differs\)",
    ),
    "truncated file": (_truncate, r"checkpoint step 4 in .* cannot be read \(OUT_OF_RANGE: Error reading"),
    "no state item": (_remove_state, r"checkpoint step 4 in .* is incomplete \(no state/\)"),
    "edited data state": (_edit_data_state, r"step 4 in .* failed its integrity check \(data_state differs"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_is_refused_and_the_previous_one_restores(tmp_path, damage):
    directory = str(tmp_path / "checkpoints")
    _save(directory)
    mutate, message = DAMAGE[damage]
    mutate(directory, 4)
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ck:
        with pytest.raises(CorruptCheckpointError, match=message) as info:
            ck.restore(4, _abstract(_state()))
    assert "\n" not in str(info.value)
    restored = restore_latest_verified(directory, _abstract(_state()))
    assert restored.step == 2 and restored.data_state == {"pos": 2}
    assert [e.step for e in restored.rejected] == [4]
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)),
        jax.tree.map(
            lambda x: jax.random.key_data(x) if x.dtype == jax.random.key(0).dtype else x, restored.state
        ),
        jax.tree.map(
            lambda x: jax.random.key_data(x) if x.dtype == jax.random.key(0).dtype else x, _state(2)
        ),
    )
    # Moving it aside keeps every byte and leaves step 2 as the latest.
    moved = set_aside(directory, 4)
    assert moved == str(tmp_path / "corrupt_checkpoints" / "4") and os.path.isdir(moved)
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ck:
        assert ck.steps() == [2]


def test_no_verified_checkpoint_is_one_error_and_nothing_moves(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _save(directory)
    _flip_bit(directory, 4)
    _truncate(directory, 2)
    before = sorted(os.listdir(directory))
    with pytest.raises(CorruptCheckpointError) as info:
        restore_latest_verified(directory, _abstract(_state()))
    text = str(info.value)
    assert text.startswith(f"no checkpoint in {directory} can be restored (step 4 failed its integrity check")
    assert "step 2 cannot be read" in text and "nothing was changed" in text and "\n" not in text
    assert sorted(os.listdir(directory)) == before


def test_saved_config_is_checked(tmp_path):
    directory = str(tmp_path / "checkpoints")
    _save(directory, steps=(2,))
    with open(f"{directory}/2/config/metadata", "w") as f:
        json.dump({"model": {"num_layers": 3}, "seed": 0}, f)
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ck:
        with pytest.raises(CorruptCheckpointError, match=r"failed its integrity check \(config differs"):
            ck.saved_config(2)


def test_half_deleted_old_step_is_never_resumed_from(tmp_path):
    # A kill while orbax deletes an old step leaves its directory partly emptied.
    directory = str(tmp_path / "checkpoints")
    _save(directory)
    os.remove(f"{directory}/2/_CHECKPOINT_METADATA")
    shutil.rmtree(f"{directory}/2/config")
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ck:
        assert ck.steps() == [2, 4] and ck.latest_step() == 4  # a directory, not a usable step
        with pytest.raises(
            CorruptCheckpointError, match=r"step 2 .* is incomplete \(no _CHECKPOINT_METADATA, config/\)"
        ):
            ck.saved_config(2)
    restored = restore_latest_verified(directory, _abstract(_state()))
    assert restored.step == 4 and restored.rejected == []  # older leftovers are not reported


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    _save(directory, steps=(2,))
    shutil.rmtree(f"{directory}/2/integrity")  # as written before checksums existed
    with Checkpointer(directory, max_to_keep=None, read_only=True) as ck:
        state, data_state = ck.restore(2, _abstract(_state()))
    assert data_state == {"pos": 2}
    assert "has no checksums" in caplog.text


def test_only_asyncio_noise_of_abandoned_reads_is_dropped():
    """Whichever report asyncio makes about a read orbax abandoned (it depends on timing: the
    flaky launch test printed them under load) is dropped; any other asyncio record is kept."""
    import logging

    from mile.checkpoint import _AbandonedReadFilter

    keep = _AbandonedReadFilter().filter

    def record(message, exc=None):
        exc_info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, exc_info)

    read_error = ValueError("Error reading ... tensorstore_spec={'driver': 'zarr'}")
    pending = "Task was destroyed but it is pending!\ntask: <Task pending coro=<_read_array_index_and_device_put() running>>"
    assert not keep(record("Future exception was never retrieved", read_error))
    assert not keep(record("Task exception was never retrieved", read_error))
    assert not keep(record(pending))
    assert keep(record("Task was destroyed but it is pending!\ntask: <Task pending coro=<my_job() running>>"))
    assert keep(record("Future exception was never retrieved", ValueError("something else")))
    assert keep(record("Executing <Task ...> took 0.5 seconds"))
