"""Global batches: a process's local numpy batches made global jax arrays; checkpointable.

Every process reads the batch rows of its own devices (`uika_jax.data.pipeline`).
`GlobalBatchIterator` puts them together with `jax.make_array_from_process_local_data`,
the batch (leading) axis split over the mesh axes of the logical "batch" axis
(`uika_jax.sharding.batch_sharding`), and turns the uint8 images and masks into
float32 in [0, 1] on device (a quarter of the host-to-device bytes of float input).
Its position is the local grain iterator's state: `get_state()` returns bytes and
`set_state(bytes)` restores them, the protocol of `grain.checkpoint.CheckpointSave`
and `CheckpointRestore` (orbax), which save one file per process beside the model.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.sharding import Rules, batch_axes, batch_sharding

UINT8_KEYS = ("source_image", "source_mask", "target_image", "target_mask")
"""Keys stored as uint8 in local batches (float32 in [0, 1] in global ones)."""


@jax.jit
def to_unit_float(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its uint8 images and masks (`UINT8_KEYS`) as float32 in [0, 1]."""
    return {k: v.astype(jnp.float32) / 255.0 if k in UINT8_KEYS else v for k, v in batch.items()}


class GlobalBatchIterator:
    """Global batches from a process's local batches (module docstring)."""

    def __init__(
        self,
        local: grain.DatasetIterator,
        mesh: jax.sharding.Mesh,
        rules: Rules,
        global_batch_size: int,
        local_batch_size: int,
    ):
        """Wraps a local iterator.

        Args:
          local: yields this process's local batches (numpy).
          mesh: the device mesh.
          rules: logical axis rules; the "batch" rule names the mesh axes of the batch.
          global_batch_size: rows of a global batch.
          local_batch_size: rows of a local batch.

        Raises:
          ValueError: if the batch axes do not split the global batch evenly, or do not
            give this process exactly its local rows.
        """
        axes = batch_axes(rules)
        shards = int(np.prod([mesh.shape[a] for a in axes]))
        if global_batch_size % shards:
            raise ValueError(
                f"global batch {global_batch_size} does not split over the batch axes {axes} "
                f"({shards} shards) of mesh {dict(mesh.shape)}"
            )
        shape = (global_batch_size,)
        rows = set()
        for index in (
            batch_sharding(mesh, rules, shape).addressable_devices_indices_map(shape).values()
        ):
            rows.update(range(*index[0].indices(global_batch_size)))
        if len(rows) != local_batch_size:
            raise ValueError(
                f"this process's devices hold {len(rows)} rows of the batch, but it reads "
                f"{local_batch_size}: the mesh's batch axes {axes} must give each of the "
                f"{jax.process_count()} processes an equal, distinct share"
            )
        self._local = local
        self._mesh = mesh
        self._rules = rules
        self.global_batch_size = global_batch_size

    def __iter__(self) -> GlobalBatchIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self._local)
        arrays = {}
        for key, value in local.items():
            shape = (self.global_batch_size, *value.shape[1:])
            sharding = batch_sharding(self._mesh, self._rules, shape)
            arrays[key] = jax.make_array_from_process_local_data(sharding, value, shape)
        return to_unit_float(arrays)

    def get_state(self) -> bytes:
        """The position, as JSON bytes."""
        return json.dumps(self._local.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        """Moves to a position from `get_state` (of this process)."""
        self._local.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        """Starts reading ahead (orbax's restore calls it)."""
        self._local.start_prefetch()
