"""Collective traffic per chip from compiled HLO (mile.hlo_traffic), against hand counts.

Each program is small enough to count by hand: a known array moved by one collective, inside a
loop whose trip count is known, over a known device group. Compiled for XLA:CPU (8 fake devices)
and, with libtpu, for a 4-chip TPU v5p slice, whose compiler rewrites collectives its own way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from mile import aot
from mile.hlo_traffic import collective_traffic


def _compile(fn, devices, shape, dtype=jnp.float32):
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharded = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("x")))
    body = jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
    return jax.jit(body).lower(sharded).compile().as_text()


def _programs(n):
    """(name, fn, global input shape, bytes each chip sends counted by hand, kind)."""
    rows, width = 16, 64  # per device: f32[16, 64] = 4 KiB
    block = 4 * rows * width

    def psum_loop(x):  # 5 iterations, each an all-reduce of f32[16, 64] that depends on the carry
        return lax.fori_loop(0, 5, lambda i, c: lax.psum(c * 0.5, "x"), x)

    def gather_scan(x):  # 3 iterations, each gathers f32[16, 64] into f32[16 n, 64]
        def step(c, _):
            g = lax.all_gather(c * 0.5, "x", tiled=True)
            return c + g.reshape(n, rows, width).sum(0), None

        return lax.scan(step, x, None, length=3)[0]

    def scatter_once(x):  # f32[128, 128] in, f32[128 / n, 128] out per chip. (XLA:TPU turns a
        return lax.psum_scatter(x * x, "x", tiled=True)  # small one into an all-reduce + slice.)

    return [
        ("psum_loop", psum_loop, (rows * n, width), 5 * 2 * (n - 1) / n * block, "all-reduce"),
        ("gather_scan", gather_scan, (rows * n, width), 3 * (n - 1) / n * block * n, "all-gather"),
        ("scatter_once", scatter_once, (128 * n, 128), (n - 1) / n * 4 * 128 * 128, "reduce-scatter"),
    ]


def _check(devices):
    n = len(devices)
    for name, fn, shape, want, kind in _programs(n):
        traffic = collective_traffic(_compile(fn, devices, shape), n)
        assert traffic["unread_trip_counts"] == 0, name
        np.testing.assert_allclose(traffic["bytes_by_kind"][kind], want, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(traffic["bytes_per_chip"], want, rtol=0.01, err_msg=name)


def test_hand_counted_traffic_on_cpu():
    _check(jax.devices()[:4])


def test_hand_counted_traffic_on_a_tpu_slice():
    pytest.importorskip("libtpu", reason="libtpu (requirements-tpu.txt) compiles for TPU slices")
    _check(aot.topology_devices(aot.parse_slice("v5p-8")))


def test_a_loop_it_cannot_read_is_counted_once_and_reported():
    devices = jax.devices()[:4]

    def data_dependent(x):  # the trip count depends on the data: no constant bound to read
        return lax.while_loop(lambda c: c[0, 0] < 100.0, lambda c: lax.psum(c + 1.0, "x"), x)

    traffic = collective_traffic(_compile(data_dependent, devices, (8, 4)), 4)
    assert traffic["unread_trip_counts"] == 1
    np.testing.assert_allclose(traffic["bytes_by_kind"]["all-reduce"], 2 * 3 / 4 * 4 * 2 * 4)


def test_sizes_of_hlo_types():
    from mile.hlo_traffic import _bytes

    assert _bytes("bf16[2,3]{1,0:T(8,128)}") == [12]
    assert _bytes("(f32[4], s32[], pred[8], bf16[1,1024,16,64]{3,2,1,0})") == [16, 4, 8, 2 * 1024 * 16 * 64]


def test_not_hlo_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        collective_traffic("hello", 4)

