"""Device mesh, logical axis rules and the shardings of model states and batches.

The mesh has three axes, `MESH_AXES = ("data", "fsdp", "tensor")`, all
`AxisType.Auto` (sharding propagation by XLA; set explicitly, as `jax.make_mesh`
defaults to Explicit axes). Every weight carries logical axis names
(`nnx.with_partitioning` metadata, `out_sharding`): embed, heads,
mlp, patch, tokens, layers, readout, conv_in, conv_out, gaussian_attr, or None. A
config's `sharding.rules` maps each name to a mesh axis (or None: replicated), e.g.

    embed -> fsdp      heads, mlp, conv_out, readout -> tensor      batch -> (data, fsdp)

so a (embed, mlp) kernel is split over fsdp x tensor. Activations carry the logical
name "batch" on their leading dim (`batch_sharding`, `shard_batch`).

`state_shardings` resolves a state's names through `nnx.get_named_sharding` under
`nnx.logical_axis_rules(rules)` and then fits each spec to its array: a dim whose size
is not divisible by its mesh axes (a 3-channel output conv, a 4-wide rotation layer) is
replicated along that dim instead of failing, and a mesh axis already used by an
earlier dim of the same array is dropped. A logical name missing from the rules is an
error (`check_rules`), never silently replicated.

Typical use (abstract state, nothing allocated):

    mesh = make_mesh(config.sharding.mesh_shape)
    rules = logical_rules(config)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UIKA.from_config(config, rngs=...)))
    shardings = state_shardings(state, mesh, rules)
    jax.jit(step, in_shardings=(shardings, batch_sharding(...)), ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
"""Names of the mesh axes, outermost first."""

Rules = tuple[tuple[str, Any], ...]
"""Logical axis rules: (logical name, mesh axis, a tuple of mesh axes, or None) pairs."""


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with `AxisType.Auto` axes.

    Args:
      shape: sizes of (data, fsdp, tensor); at most one may be -1, meaning every device
        the others leave.
      devices: the devices (default: all of `jax.devices()`).

    Returns:
      The mesh.

    Raises:
      ValueError: if the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must give sizes of {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"bad mesh shape {shape}: positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh shape {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_rules(config: Any) -> Rules:
    """The logical axis rules of a full config (`config.sharding.rules`) as hashable tuples."""
    rules = []
    for name, axes in config.sharding.rules:
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
        if axes is not None and not set(axes if isinstance(axes, tuple) else (axes,)) <= set(
            MESH_AXES
        ):
            raise ValueError(f"rule {name!r} -> {axes!r} names an axis outside {MESH_AXES}")
        rules.append((str(name), axes))
    return tuple(rules)


def logical_names(state: Any) -> set[str]:
    """Every logical axis name the variables of a state (or module) carry."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    names: set[str] = set()
    for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        sharding = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        names.update(n for n in sharding or () if n is not None)
    return names


def check_rules(state: Any, rules: Rules) -> None:
    """Raises a ValueError naming every logical axis of `state` that `rules` does not map."""
    missing = logical_names(state) - {name for name, _ in rules}
    if missing:
        raise ValueError(f"logical axes without a sharding rule: {sorted(missing)}")


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """Replicates the dims of `spec` that `shape` cannot split evenly, and repeated axes."""
    used: set[str] = set()
    fitted = []
    for i, size in enumerate(shape):
        axes = tuple(a for a in _axes(spec[i] if i < len(spec) else None) if a not in used)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            fitted.append(axes[0] if len(axes) == 1 else axes)
        else:
            fitted.append(None)
    return PartitionSpec(*fitted)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for every leaf of an NNX state (abstract or concrete).

    Args:
      state: an `nnx.State` (e.g. from `nnx.split` of an `nnx.eval_shape` model).
      mesh: the device mesh.
      rules: logical axis rules (`logical_rules`); must cover every name (`check_rules`).

    Returns:
      A tree of the state's structure with a `NamedSharding` per array.
    """
    check_rules(state, rules)
    with nnx.logical_axis_rules(rules):
        named = nnx.get_named_sharding(state, mesh)

    def fit(sharding: NamedSharding, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, fit_spec(sharding.spec, np.shape(leaf), mesh))

    return jax.tree.map(fit, named, state)


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes of the logical "batch" axis (none if the rules do not map it)."""
    return _axes(dict(rules).get("batch"))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """The sharding of an activation of `shape` whose leading dim is the batch."""
    axes = batch_axes(rules)
    spec = PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None))
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """Puts every array of a batch pytree on the mesh, split along its leading dim.

    Scalars and arrays whose leading dim the batch axes do not divide are replicated.
    """

    def put(x: Any) -> jax.Array:
        shape = np.shape(x)
        if not shape:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        return jax.device_put(x, batch_sharding(mesh, rules, shape))

    return jax.tree.map(put, batch)


def to_host(x: Any) -> np.ndarray:
    """An array's whole value as NumPy on every process.

    A global array spread over several processes is gathered; anything else is
    converted as it is.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sharded_fraction(shardings: Any, state: Any) -> dict[str, float]:
    """Per leaf path: the fraction of the array each device holds (1.0: replicated)."""
    out = {}
    for (path, s), leaf in zip(
        jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(state), strict=True
    ):
        shape = np.shape(leaf)
        shard = s.shard_shape(shape)
        out[jax.tree_util.keystr(path)] = math.prod(shard) / max(math.prod(shape), 1)
    return out
