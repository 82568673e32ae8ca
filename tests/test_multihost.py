"""Global batches from data streams (one process, 8 fake devices): every layout of streams over
devices gives the rows of stream s in block s, and the streams' positions round-trip."""

import jax
import ml_collections
import numpy as np
import pytest

from mile import multihost
from mile import sharding as msharding
from mile import train as T
from train_helpers import tiny_config


class _CountingStream:
    """Stream s, batch t, row r holds 1000 * s + 10 * t + r: the expected global batch is obvious."""

    def __init__(self, s, rows):
        self.s, self.rows, self.t = s, rows, 0

    def __next__(self):
        values = 1000 * self.s + 10 * self.t + np.arange(self.rows)
        self.t += 1
        return {"inputs": np.repeat(values[:, None], 3, axis=1).astype(np.int32)}

    def get_state(self):
        return {"t": self.t}

    def set_state(self, state):
        self.t = state["t"]


def _mesh(data, fsdp=1, tensor=1):
    cfg = ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})
    return msharding.make_mesh(cfg, devices=jax.devices()[: data * fsdp * tensor])


@pytest.mark.parametrize(
    "streams,mesh_shape",
    [(2, (8, 1, 1)), (8, (2, 1, 1)), (4, (2, 2, 2)), (1, (4, 1, 1)), (4, (1, 1, 8))],
)
def test_stream_s_fills_block_s_of_the_global_batch(streams, mesh_shape):
    rows = 8
    mesh = _mesh(*mesh_shape)
    batches = multihost.StreamBatches(
        lambda s: _CountingStream(s, rows // streams),
        num_streams=streams,
        sharding=msharding.batch_sharding(mesh),
        global_batch_size=rows,
    )
    assert batches.streams == list(range(streams)) and batches.whole  # one process reads all
    for t in range(3):
        got = next(batches)["inputs"]
        assert got.sharding == msharding.batch_sharding(mesh)
        per = rows // streams
        want = np.array([1000 * (r // per) + 10 * t + r % per for r in range(rows)])
        np.testing.assert_array_equal(np.asarray(got), np.repeat(want[:, None], 3, axis=1))


def test_positions_of_every_stream_round_trip():
    make = lambda: multihost.StreamBatches(
        lambda s: _CountingStream(s, 2),
        num_streams=4,
        sharding=msharding.batch_sharding(_mesh(8)),
        global_batch_size=8,
    )
    a = make()
    for _ in range(3):
        next(a)
    state = a.get_state()
    assert state == [{"t": 3}] * 4
    b = make()
    b.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(b)["inputs"]), np.asarray(next(a)["inputs"]))


def test_number_of_streams():
    assert multihost.resolve_num_streams(0, 2, None) == 2  # default: one per process
    assert multihost.resolve_num_streams(4, 2, None) == 4
    assert multihost.resolve_num_streams(0, 1, [{}, {}]) == 2  # resuming keeps the checkpoint's
    with pytest.raises(ValueError, match="checkpoint holds 2 data streams but data.shards=4"):
        multihost.resolve_num_streams(4, 1, [{}, {}])
    with pytest.raises(ValueError, match="cannot be split into 3 data streams"):
        multihost.StreamBatches(
            lambda s: _CountingStream(s, 1),
            num_streams=3,
            sharding=msharding.batch_sharding(_mesh(8)),
            global_batch_size=8,
        )


def test_shards_must_divide_the_batch(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.shards": 3})
    with pytest.raises(ValueError, match="cannot be split into data.shards=3"):
        T.check_config(cfg, msharding.make_mesh(cfg.mesh))


@pytest.mark.parametrize(
    "env,kwargs,match",
    [
        ({"JAX_NUM_PROCESSES": "2"}, {}, "missing --coordinator_address, --process_id$"),
        ({"JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "h:1"}, {}, "missing --num_processes$"),
        ({}, {"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, "must be in \\[0, "),
        ({"JAX_NUM_PROCESSES": "two"}, {}, "JAX_NUM_PROCESSES='two' is not an integer"),
        ({}, {"mode": "maybe"}, "must be 'auto', 'yes' or 'no'"),
        ({}, {"coordinator_address": "h:1"}, "missing --num_processes, --process_id$"),
        ({}, {"mode": "no", "num_processes": 2}, "train.distributed='no' but process flags were given"),
    ],
)
def test_incomplete_process_descriptions_are_refused(monkeypatch, env, kwargs, match):
    from mile import distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)
