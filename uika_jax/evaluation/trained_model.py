"""A trained run read back: its config, its weights, its head model and anchors.

`load_trained_model(workdir)` is how `evaluate.py` and the `uika` avatar tools get a
model out of a training run's folder (`train.py --workdir`). It reads the newest (or
a given) checkpoint of `WORKDIR/checkpoints` onto one device; nothing of the training
loop runs.

Config: the checkpoint's own config (saved with it) is the default. A config given by
the caller (another file, or overrides) may change anything but the model: the
`model` and `head` blocks must equal the checkpoint's (the head model's files may
move), else `ModelMismatchError` names the keys that differ and both values, before
any array is read. The head model
is rebuilt from the config (`head.model_path`, or the built-in head) and its
fingerprint must match the checkpoint's (`Checkpointer.restore` refuses another).

The state is restored whole (the stage's layout: `uika_jax.training.train_state`) and
merged into a `UIKA` module; optimizer moments are read and dropped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from ml_collections.config_dict import placeholder

from uika_jax.config import flat_items
from uika_jax.head.anchors import Anchors
from uika_jax.head.model import HeadModel
from uika_jax.models.avatar import UIKA, AvatarOutput, build_head
from uika_jax.models.gaussians import mean_anchor_spacing
from uika_jax.training import train_state as ts
from uika_jax.training.checkpointing import Checkpointer, abstract_like

CHECKPOINT_DIR = "checkpoints"
"""The checkpoints' folder inside a run's workdir (as `train.py` writes it)."""

MODEL_BLOCKS = ("model", "head")
"""The config blocks that define the network and its head model: fixed by a checkpoint."""


HEAD_MODEL_FILES = ("head.model_path", "head.uv_path")
"""Where the head model's files are: free to change (the head model's fingerprint, checked
against the checkpoint's, says whether it is the same model)."""


class ModelMismatchError(ValueError):
    """A config whose model differs from the checkpoint's."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A run's model, ready to reconstruct avatars.

    Attributes:
      config: the config in force (the checkpoint's model with the caller's settings).
      model: the network with the checkpoint's weights.
      head: the head model the run was trained with.
      anchors: its anchors at the decoder map size.
      step: the checkpoint's step.
      workdir: the run's folder.
    """

    config: ml_collections.ConfigDict
    model: UIKA
    head: HeadModel
    anchors: Anchors
    step: int
    workdir: Path

    @property
    def fingerprint(self) -> str:
        """The head model's fingerprint string."""
        return str(self.head.fingerprint)

    def reconstruct_fn(self):
        """A jitted `(images (B, N, H, W, 3) in [0, 1], view_mask (B, N)) -> AvatarOutput`.

        The estimator's own UV maps are reprojected (no teacher); one compile per input
        shape.
        """
        graphdef, state = nnx.split(self.model)
        anchors = jax.tree.map(np.asarray, self.anchors)

        @jax.jit
        def forward(state: Any, images: jax.Array, view_mask: jax.Array) -> AvatarOutput:
            return nnx.merge(graphdef, state)(images, view_mask, anchors)

        return lambda images, view_mask: forward(state, images, view_mask)


def _checkpointer(workdir: Path, fingerprint: str) -> Checkpointer:
    directory = workdir / CHECKPOINT_DIR
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{workdir}: not a training run (no {CHECKPOINT_DIR}/ folder); give the --workdir "
            "of a train.py run"
        )
    return Checkpointer(directory, fingerprint=fingerprint)


def saved_config(workdir: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a run's newest (or a given) checkpoint (null settings overridable).

    Raises:
      FileNotFoundError: if `workdir` holds no checkpoint (of that step).
    """
    workdir = Path(workdir)
    with _checkpointer(workdir, fingerprint="") as checkpointer:
        return _overridable(checkpointer.saved_config(step))


def _overridable(tree: dict[str, Any]) -> ml_collections.ConfigDict:
    """A JSON config as a ConfigDict whose null settings can still be overridden.

    JSON keeps no type for a null setting; a `placeholder(object)` takes any literal
    (`--config.eval.manifest=PATH`, `--config.render.capacity=4096`).
    """

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return ml_collections.ConfigDict({k: convert(v) for k, v in value.items()})
        return placeholder(object) if value is None else value

    return convert(tree)


def check_same_model(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, origin: str
) -> None:
    """Refuses a config whose `model` or `head` block differs from the checkpoint's.

    Raises:
      ModelMismatchError: naming up to five differing keys with both values.
    """

    def blocks(c: ml_collections.ConfigDict) -> dict[str, Any]:
        as_json = json.loads(c.to_json_best_effort())
        items = flat_items({k: as_json.get(k) for k in MODEL_BLOCKS})
        return {k: v for k, v in items if k not in HEAD_MODEL_FILES}

    want, got = blocks(saved), blocks(config)
    differing = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if differing:
        shown = "; ".join(
            f"{k}: checkpoint {want.get(k, '(absent)')!r}, config {got.get(k, '(absent)')!r}"
            for k in differing[:5]
        )
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise ModelMismatchError(
            f"the config's model does not match {origin} ({shown}{more}): evaluation settings "
            "may change, the model and head model may not"
        )


def load_trained_model(
    workdir: str | Path,
    config: ml_collections.ConfigDict | None = None,
    *,
    step: int | None = None,
) -> TrainedModel:
    """Reads a run's checkpoint onto the default device (module docstring).

    Args:
      workdir: the run's folder (`train.py --workdir`).
      config: the config to evaluate with; None: the checkpoint's own. Its `model` and
        `head` blocks must equal the checkpoint's.
      step: the checkpoint's step; None: the newest.

    Returns:
      The `TrainedModel`.

    Raises:
      FileNotFoundError: if there is no such run or checkpoint.
      ModelMismatchError: if `config`'s model differs from the checkpoint's.
      CheckpointMismatchError: if the head model or the weights' shapes differ.
    """
    workdir = Path(workdir)
    saved = saved_config(workdir, step)
    origin = f"the checkpoint in {workdir / CHECKPOINT_DIR}"
    if config is None:
        config = saved
    else:
        check_same_model(saved, config, origin)
    head, anchors = build_head(config)
    spacing = mean_anchor_spacing(np.asarray(anchors.positions))

    def make_model() -> UIKA:
        return UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)

    with _checkpointer(workdir, str(head.fingerprint)) as checkpointer:
        step = checkpointer.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / CHECKPOINT_DIR}")
        # The state's layout (stage, optimizer) is the checkpoint's own schedule's.
        stage = ts.stage_of_step(saved, min(step, ts.total_steps(saved) - 1))
        abstract = ts.abstract_state(make_model, stage, ts.optimizer_of(saved, stage))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
        restored = checkpointer.restore(abstract_like(abstract, shardings), step=step)
    graphdef = nnx.graphdef(nnx.eval_shape(make_model))
    model = nnx.merge(graphdef, restored.state.params, restored.state.rest)
    return TrainedModel(
        config=config, model=model, head=head, anchors=anchors, step=step, workdir=workdir
    )
