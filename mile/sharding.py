"""Device mesh, logical-axis rules and the shardings of model/optimiser state and batches.

Parameters name their dimensions with logical axes ('embed', 'vocab', ...; see mile.model).
A rule table maps each logical axis to a mesh axis, a tuple of mesh axes, or None
(replicated). `logical_to_spec` turns names into a PartitionSpec:
  * a mesh axis is used at most once per spec; a later dimension asking for an axis that is
    already taken drops it (so a table may map several names to 'tensor' safely);
  * a dimension whose size is not divisible by the mesh axes it maps to keeps the longest
    prefix of those axes that divides it, possibly none (replicated). We fall back rather
    than raise so tiny test models and odd vocab sizes still run on any mesh; the cost is
    only memory for that one dimension.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis / tuple of mesh axes / None. The config copies this table.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto (GSPMD) axes; one size may be -1 = the rest."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {axis: int(getattr(mesh_cfg, axis)) for axis in MESH_AXES}
    described = " ".join(f"{axis}={size}" for axis, size in sizes.items())
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh {described} is invalid: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if count % known:
            raise ValueError(
                f"mesh {described}: {count} devices are not divisible by {known}; "
                f"choose sizes whose product divides {count}"
            )
        sizes[rest[0]] = count // known
    elif known != count:
        raise ValueError(
            f"mesh {described} needs {known} devices but {count} are available; "
            f"set --config.mesh.data=-1 to use the rest"
        )
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices
    )


def _rule_table(rules) -> dict[str, tuple[str, ...]]:
    """Normalise a rule table (pairs or a mapping; lists from configs allowed) to name -> axes."""
    items = rules.items() if isinstance(rules, Mapping) else rules
    table = {}
    for name, target in items:
        if target is None:
            table[name] = ()
        elif isinstance(target, str):
            table[name] = (target,)
        else:
            table[name] = tuple(target)
    return table


def logical_to_spec(
    names: Sequence[str | None],
    rules,
    *,
    shape: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> P:
    """PartitionSpec for logical axis `names`; with `shape` and `mesh`, non-divisible dims fall back.

    Raises ValueError for a logical name the rule table does not know (a typo would otherwise
    silently replicate a huge weight).
    """
    table = _rule_table(rules)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match array shape {tuple(shape)}")
    used: set[str] = set()
    entries = []
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = [axis for axis in table[name] if axis not in used]
        if shape is not None and mesh is not None:
            # Longest prefix of the axes whose combined size divides this dimension.
            while axes and shape[dim] % math.prod(mesh.shape[axis] for axis in axes):
                axes.pop()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*entries)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: jax.sharding.Mesh, rules):
    """NamedShardings mirroring `state` (an nnx.State, concrete or abstract, or a Module).

    A Variable's logical names come from its `out_sharding` metadata; optimiser moments copy
    their parameter's metadata (nnx.Optimizer does this), so they shard like the parameter.
    Variables without names (step counters, scalars) and plain arrays are replicated.
    The result has the same pytree structure as `state`: use it for jit in/out_shardings.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def leaf_sharding(x):
        if _is_variable(x):
            names = x.get_metadata().get("out_sharding")
            value = x.get_value()
            spec = logical_to_spec(names, rules, shape=value.shape, mesh=mesh) if names else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf_sharding, state, is_leaf=_is_variable)


BATCH_AXES = ("data", "fsdp")  # the mesh axes a token batch's rows are split over


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Token batches [batch, seq]: batch split over data and fsdp, sequence whole."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def abstract_sharded(build: Callable[[], object], mesh: jax.sharding.Mesh, rules):
    """(graphdef, abstract state) of `build()`: ShapeDtypeStruct leaves carrying target shardings.

    Nothing is allocated. Use it for an orbax restore target, or for jit shardings before any
    state exists. (Avoid nnx.eval_shape under a mesh here: it reads `out_sharding` names as mesh
    axes, and our names are logical.)
    """
    graphdefs = []

    def build_state():
        graphdef, state = nnx.split(build())
        graphdefs.append(graphdef)
        return state

    shapes = jax.eval_shape(build_state)
    shardings = state_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    return graphdefs[-1], abstract


def create_sharded(build: Callable[[], object], mesh: jax.sharding.Mesh, rules):
    """Run `build()` so every array is created directly with its target sharding.

    `build` makes any NNX graph: a model, or a tuple (model, nnx.Optimizer(model, tx,
    wrt=nnx.Param)). It is traced once abstractly to learn shapes and logical names, then run
    under jax.jit with out_shardings, so no full copy of the state ever sits on one device.
    Returns what `build` returns, sharded.
    """
    graphdef, abstract = abstract_sharded(build, mesh, rules)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def vocab_parallel_axis(mesh: jax.sharding.Mesh, rules, embed_dim: int, vocab_size: int) -> str | None:
    """The mesh axis the rule table shards the LM head's vocabulary over, for the fused loss to
    split its softmax the same way (see `mile.fused`): None when the head's vocabulary is not
    sharded (one device on that axis, no rule, or a size that does not divide), or is sharded
    over several axes or over a batch axis, where the loss falls back to the replicated head."""
    spec = logical_to_spec(("embed", "vocab"), rules, shape=(embed_dim, vocab_size), mesh=mesh)
    axis = spec[1] if len(spec) > 1 else None
    if not isinstance(axis, str) or axis in BATCH_AXES or mesh.shape[axis] == 1:
        return None
    return axis
