"""Checkpoints: the train state, the data iterator, the step, the config and the head model.

A `Checkpointer` wraps an orbax `CheckpointManager` over one directory (one
subfolder per step). Each checkpoint holds four items:

    state        any pytree of arrays (model parameters, optimizer state, step, ...)
    data         the grain iterator's position (`grain.checkpoint.CheckpointSave`:
                 one file per process), when an iterator is given
    config       the run's config as JSON
    meta         {"step", "fingerprint"}: the head model's fingerprint string

Saving is asynchronous (the arrays are copied to host, then written in the
background); `wait_until_finished()` must run before the process exits. Orbax
writes each step into a temporary folder and renames it when complete, so a run
killed mid-write leaves no partial checkpoint behind, and it keeps the newest
`max_to_keep` steps.

`restore` reads the newest (or a given) step into an abstract target whose leaves
are `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`: orbax places every array as
the target's sharding says, so a checkpoint written on one mesh restores onto
another (8 devices saved, 4 restored). Before reading any array it refuses, with a
`CheckpointMismatchError` saying which, a checkpoint of another head model or one
whose tree structure, shapes or dtypes differ from the target.

`PreemptionFlag` turns SIGTERM (a preempted cloud VM, a cluster's time limit) into
a flag that the training loop checks after each step: save, wait, exit.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

STATE, DATA, CONFIG, META = "state", "data", "config", "meta"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit this run (another head model, other shapes)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` read.

    Attributes:
      step: the checkpoint's step.
      state: the state, laid out as the target's shardings say.
      config: the config saved with it (JSON values).
    """

    step: int
    state: Any
    config: dict[str, Any]


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _flat_leaves(tree: Any) -> dict[str, Any]:
    """Leaves by "/"-joined path (dict keys, attribute names and indices alike)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def check_tree_matches(saved: Any, target: Any, origin: str) -> None:
    """Raises unless two trees have the same paths and, leaf by leaf, shapes and dtypes.

    Args:
      saved: the checkpoint's tree (array metadata or arrays).
      target: the tree it would restore into (arrays or `jax.ShapeDtypeStruct`).
      origin: names the checkpoint in the message.

    Raises:
      CheckpointMismatchError: naming the first path missing on either side, or the
        first leaf whose shape or dtype differs, with both values.
    """
    saved_leaves, target_leaves = _flat_leaves(saved), _flat_leaves(target)
    for path in sorted(saved_leaves.keys() | target_leaves.keys()):
        if path not in target_leaves:
            raise CheckpointMismatchError(
                f"{origin}: the checkpoint's state has {path!r}, which the target lacks "
                "(another model or optimizer structure)"
            )
        if path not in saved_leaves:
            raise CheckpointMismatchError(
                f"{origin}: the target's state has {path!r}, which the checkpoint lacks "
                "(another model or optimizer structure)"
            )
        have, want = saved_leaves[path], target_leaves[path]
        if tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
            raise CheckpointMismatchError(
                f"{origin}: {path!r} is {tuple(have.shape)} {have.dtype} in the checkpoint "
                f"but {tuple(want.shape)} {want.dtype} in the target"
            )


class Checkpointer:
    """Saves and restores training checkpoints in one directory (module docstring)."""

    def __init__(self, directory: str | Path, *, fingerprint: str, max_to_keep: int = 3):
        """Opens (creating if needed) a checkpoint directory.

        Args:
          directory: one subfolder per saved step goes here.
          fingerprint: the run's head-model fingerprint (`str(model.fingerprint)`);
            restoring a checkpoint saved with another one is refused.
          max_to_keep: the newest steps kept; older ones are deleted after a save.
        """
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be positive, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=True
        )
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            DATA: grain.checkpoint.CheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
            META: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def save(
        self,
        step: int,
        state: Any,
        *,
        config: dict[str, Any],
        data_iterator: Any | None = None,
    ) -> None:
        """Starts writing a checkpoint of `step`; returns once the arrays are on host.

        Args:
          step: the training step (the subfolder's name).
          state: a pytree of arrays.
          config: the run's config, JSON-serialisable (`config.to_dict()`).
          data_iterator: the data iterator (`get_state`/`set_state` bytes, as
            `GlobalBatchIterator`), or None for none.
        """
        items = {
            STATE: ocp.args.StandardSave(state),
            CONFIG: ocp.args.JsonSave(config),
            META: ocp.args.JsonSave({"step": int(step), "fingerprint": self.fingerprint}),
        }
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps kept, ascending."""
        return sorted(self._manager.all_steps())

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config saved with the newest (or a given) checkpoint, as JSON values.

        Raises:
          FileNotFoundError: if there is no checkpoint (of that step).
        """
        step = self._existing_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )
        return restored[CONFIG]

    def _existing_step(self, step: int | None) -> int:
        """`step`, or the newest when None; refused when no such checkpoint is kept."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint {step} in {self.directory} (kept: {self.all_steps()})"
            )
        return step

    def restore(
        self, target: Any, *, step: int | None = None, data_iterator: Any | None = None
    ) -> Restored:
        """Reads a checkpoint into `target`'s structure and shardings.

        Args:
          target: the abstract state: leaves `jax.ShapeDtypeStruct(shape, dtype,
            sharding=...)` (or arrays, whose shardings are used).
          step: the step to read; None: the newest.
          data_iterator: an iterator to move to the saved position; None leaves data alone.

        Returns:
          The step, the state laid out as the target says, and the saved config.

        Raises:
          FileNotFoundError: if there is no checkpoint (of that step).
          CheckpointMismatchError: on another head model's checkpoint, or a state whose
            tree, shapes or dtypes differ from the target's (naming the first difference).
        """
        step = self._existing_step(step)
        origin = f"checkpoint {self.directory / str(step)}"
        meta = self._manager.restore(
            step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
        saved_fingerprint = meta[META]["fingerprint"]
        if saved_fingerprint != self.fingerprint:
            raise CheckpointMismatchError(
                f"{origin} was trained with head model {saved_fingerprint!r}, but this run "
                f"uses {self.fingerprint!r}"
            )
        check_tree_matches(self._manager.item_metadata(step)[STATE], target, origin)
        items = {STATE: ocp.args.StandardRestore(target), CONFIG: ocp.args.JsonRestore()}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return Restored(step=step, state=restored[STATE], config=restored[CONFIG])

    def wait_until_finished(self) -> None:
        """Blocks until every started save is written (call before the process exits)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """The restore target of a state: `jax.ShapeDtypeStruct` leaves with the given shardings.

    Args:
      state: arrays or shape/dtype structs (e.g. from `jax.eval_shape`).
      shardings: a matching tree of `jax.sharding.Sharding`.
    """
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state,
        shardings,
    )


class PreemptionFlag:
    """Set by SIGTERM (or the given signals); the training loop saves and exits when set.

    Use as a context manager: the previous handlers come back on exit. Signal
    handlers run in the main thread, so install it there.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM,)):
        """Remembers which signals to catch (installed on `__enter__`)."""
        self._signals = tuple(signals)
        self._previous: dict[signal.Signals, Any] = {}
        self._event = threading.Event()
        self.received: signal.Signals | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)
        self._event.set()

    def __enter__(self) -> PreemptionFlag:
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __bool__(self) -> bool:
        """True once a signal has arrived."""
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """Waits up to `timeout` seconds for a signal; True if one arrived."""
        return self._event.wait(timeout)
