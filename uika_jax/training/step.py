"""One pure training step per stage, and the avatar forward pass it shares with evaluation.

`make_train_step(config, graphdef, stage, raster, lpips_fn)` returns

    train_step(state, batch, assets) -> (state, metrics)

to run under `jax.jit` with the state donated. `batch` is a global batch
(`uika_jax.data.pipeline`'s layout); `assets` (`StepAssets`: the head model, the anchors
and the LPIPS weights) are arguments, not constants, so they are neither folded into
the program nor checkpointed. The step:

* splits the batch into `micro_batches` equal micro-batches along the batch axis and
  accumulates the mean gradient over them in a `lax.scan` (one update a step; a
  device holds one micro-batch's activations at a time); the estimator loss divides
  by the whole batch's pixel counts, so the update equals the unsplit batch's;
* estimator stage: `correspondence_stage_loss` of the estimator on the source views;
  avatar stage: reconstruct from the sources (`UIKA.__call__`, with the ground-truth UV
  and masks under teacher forcing), drive to the targets' FLAME parameters, render
  through their cameras, `total_loss`;
* takes the background colour from a key folded from the step (random backgrounds) or
  the config (fixed);
* applies the update unless the loss or the gradient is not finite: then parameters and
  optimizer moments stay bitwise as they were and the optimizer counts the skip
  (`optimizer.skipped_update_count`);
* counts the rasterizer's overflow (intersections beyond capacity, tiles over their
  cap) in the metrics and in `TrainState.overflow_steps`.

Metrics are replicated scalars: the loss terms (micro-batch means), `grad_norm`,
`learning_rate`, `skipped_updates` (total), `raster/isects` (the largest frame's
intersection count), `raster/dropped`, `raster/overflow_frames` and
`raster/overflow_steps` (total).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from uika_jax.head.anchors import Anchors
from uika_jax.head.lbs import FlameParams
from uika_jax.head.model import HeadModel
from uika_jax.models.avatar import UIKA, AvatarOutput, Rendered, drive, render
from uika_jax.render import RasterConfig
from uika_jax.training.losses import (
    LpipsFn,
    Prediction,
    correspondence_counts,
    correspondence_stage_loss,
    total_loss,
)
from uika_jax.training.optimizer import learning_rate_schedule, skipped_update_count
from uika_jax.training.train_state import (
    STAGES,
    TrainState,
    optimizer_of,
    stage_optim,
    stage_range,
)

Batch = Mapping[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepAssets:
    """What every step reads but never trains (pytree arguments, replicated).

    Attributes:
      head: the head model.
      anchors: the Gaussians' anchors.
      lpips_params: LPIPS VGG weights, or None when the LPIPS weight is 0.
    """

    head: HeadModel
    anchors: Anchors
    lpips_params: Any = None


def abstract_batch(
    config: ml_collections.ConfigDict,
    head: HeadModel,
    batch_size: int,
    sharding: jax.sharding.Sharding | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays of a global batch the train step reads, as shapes and dtypes.

    Images and masks are float, as `global_batches.to_unit_float` makes them; used to
    lower or compile the step without data.

    Args:
      config: the full config (`model` sizes).
      head: the head model (its expression and shape coefficient counts).
      batch_size: B.
      sharding: every array's sharding (e.g. split along the batch axes), or None.
    """
    m = config.model
    b, n, s, f = batch_size, m.num_views, m.image_size, m.num_drive
    e, betas, joints = head.num_expression, head.num_shape, head.num_joints
    f32, boolean = jnp.float32, jnp.bool_
    layout = {
        "source_image": ((b, n, s, s, 3), f32),
        "source_mask": ((b, n, s, s), f32),
        "source_uv": ((b, n, s, s, 2), f32),
        "source_uv_valid": ((b, n, s, s), boolean),
        "view_mask": ((b, n), boolean),
        "target_image": ((b, f, s, s, 3), f32),
        "target_mask": ((b, f, s, s), f32),
        "target_expression": ((b, f, e), f32),
        "target_pose": ((b, f, joints, 3), f32),
        "target_translation": ((b, f, 3), f32),
        "target_viewmat": ((b, f, 4, 4), f32),
        "target_intrinsics": ((b, f, 3, 3), f32),
        "shape": ((b, betas), f32),
    }
    return {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        for key, (shape, dtype) in layout.items()
    }


def target_params(batch: Batch) -> FlameParams:
    """The target frames' FLAME parameters, (B, N_d, ...), with the identity's shape."""
    pose = batch["target_pose"]
    b, f = pose.shape[:2]
    shape = jnp.broadcast_to(batch["shape"][:, None], (b, f, batch["shape"].shape[-1]))
    return FlameParams(
        shape=shape,
        expression=batch["target_expression"],
        pose=pose,
        translation=batch["target_translation"],
    )


def teacher_maps(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Ground-truth (UV, head mask as a probability) of the sources, for teacher forcing."""
    return batch["source_uv"], batch["source_uv_valid"].astype(jnp.float32)


def render_targets(
    model: UIKA,
    batch: Batch,
    assets: StepAssets,
    *,
    background: jax.Array,
    raster: RasterConfig,
    teacher_forcing: bool = False,
    use_shape: bool = False,
) -> tuple[AvatarOutput, Rendered]:
    """Reconstructs each sample from its sources and renders its target frames.

    Args:
      model: the network.
      batch: a batch with the sources, view mask and targets' parameters and cameras.
      assets: the head model and anchors.
      background: (3,) the colour rendered behind the Gaussians.
      raster: the rasterizer's settings.
      teacher_forcing: reproject the ground-truth UV maps and masks.
      use_shape: drive with the dataset's shape coefficients (else beta = 0).

    Returns:
      (the forward pass's output, the rendered targets (B, N_d, S, S, ...)).
    """
    teacher = teacher_maps(batch) if teacher_forcing else None
    out = model(batch["source_image"], batch["view_mask"], assets.anchors, teacher=teacher)
    posed = drive(
        assets.head, assets.anchors, out.gaussians, target_params(batch), use_shape=use_shape
    )
    size = batch["target_image"].shape[-2]
    rendered = render(
        posed,
        batch["target_viewmat"],
        batch["target_intrinsics"],
        size,
        size,
        background=background,
        config=raster,
    )
    return out, rendered


def step_background(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """The step's background colour: random (a key folded from the step) or fixed."""
    if config.train.random_background:
        key = jax.random.fold_in(jax.random.key(int(config.train.seed)), step)
        return jax.random.uniform(key, (3,), jnp.float32)
    return jnp.asarray(config.render.background, jnp.float32)


def _micro_batches(batch: Batch, count: int) -> Batch:
    """(B, ...) -> (count, B / count, ...), micro-batch i = rows i, i + count, ...

    Splitting along the inner axis keeps each device's rows on that device (the batch
    axis is sharded in contiguous blocks).
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % count:
            raise ValueError(f"batch of {x.shape[0]} does not split into {count} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


_NOT_MEANS = {
    "raster/isects": jnp.maximum,
    "raster/dropped": jnp.add,
    "raster/overflow_frames": jnp.add,
}
"""Metrics that are maxima or counts over a step's micro-batches, and how they combine;
every other metric is summed over the micro-batches and divided by their number."""


def _raster_metrics(meta: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {
        "raster/isects": jnp.max(meta["n_isects"]).astype(jnp.float32),
        "raster/dropped": jnp.sum(meta["isects_dropped"]).astype(jnp.float32),
        "raster/overflow_frames": jnp.sum(meta["overflow"]).astype(jnp.float32),
    }


def make_loss_fn(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    stage: str,
    raster: RasterConfig,
    lpips_fn: LpipsFn | None,
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """`loss_fn(params, rest, micro_batch, assets, background, counts) -> (loss, metrics)`.

    `counts`: the estimator loss's normalisers (`losses.correspondence_counts` of the
    whole batch over the number of micro-batches), or None for the micro-batch's own;
    the avatar loss, a plain mean, ignores them.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    weights = {k: float(v) for k, v in config.loss.items()}
    teacher_forcing = bool(config.train.teacher_forcing)
    use_shape = bool(config.head.use_dataset_shape)

    def estimator_loss(params, rest, batch, assets, background, counts):
        model = nnx.merge(graphdef, params, rest)
        pred = model.correspondence(batch["source_image"], batch["view_mask"])
        loss, terms = correspondence_stage_loss(pred, batch, counts=counts)
        return loss, {**terms, "loss": loss}

    def avatar_loss(params, rest, batch, assets, background, counts):
        model = nnx.merge(graphdef, params, rest)
        out, rendered = render_targets(
            model,
            batch,
            assets,
            background=background,
            raster=raster,
            teacher_forcing=teacher_forcing,
            use_shape=use_shape,
        )
        pred = Prediction(rendered.images, out.gaussians.offsets, background)
        lpips = None if lpips_fn is None else (lpips_fn, assets.lpips_params)
        loss, terms = total_loss(pred, batch, weights, lpips=lpips)
        return loss, {**terms, **_raster_metrics(rendered.meta)}

    return estimator_loss if stage == STAGES[0] else avatar_loss


def make_train_step(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    stage: str,
    raster: RasterConfig,
    lpips_fn: LpipsFn | None = None,
) -> Callable[[TrainState, Batch, StepAssets], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure step of a stage (module docstring); jit it with the state donated.

    Args:
      config: the run's config.
      graphdef: the model's graph (`train_state.split_model`).
      stage: "estimator" or "avatar".
      raster: the rasterizer's settings (static).
      lpips_fn: `load_lpips()[0]` when the LPIPS weight is above 0.

    Returns:
      `train_step(state, batch, assets) -> (state, metrics)`.
    """
    loss_fn = make_loss_fn(config, graphdef, stage, raster, lpips_fn)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    tx = optimizer_of(config, stage)
    schedule = learning_rate_schedule(stage_optim(config, stage))
    micro = int(stage_optim(config, stage).get("micro_batches", 1))
    first_step = stage_range(config, stage)[0]
    if micro < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro}")

    def train_step(
        state: TrainState, batch: Batch, assets: StepAssets
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        background = step_background(config, state.step)
        if micro == 1:
            (loss, metrics), grads = grad_fn(
                state.params, state.rest, batch, assets, background, None
            )
        else:
            counts = jax.tree.map(lambda c: c / micro, correspondence_counts(batch))

            def accumulate(total, micro_batch):
                (loss, metrics), grads = grad_fn(
                    state.params, state.rest, micro_batch, assets, background, counts
                )
                total_loss, total_metrics, total_grads = total
                return (
                    total_loss + loss,
                    {
                        k: _NOT_MEANS.get(k, jnp.add)(total_metrics[k], v)
                        for k, v in metrics.items()
                    },
                    jax.tree.map(jnp.add, total_grads, grads),
                ), None

            shapes = jax.eval_shape(
                grad_fn,
                state.params,
                state.rest,
                jax.tree.map(lambda x: x[0], _micro_batches(batch, micro)),
                assets,
                background,
                counts,
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (*shapes[0], shapes[1]))
            (loss, metrics, grads), _ = jax.lax.scan(
                accumulate, zeros, _micro_batches(batch, micro)
            )
            loss, grads = loss / micro, jax.tree.map(lambda g: g / micro, grads)
            metrics = {k: v if k in _NOT_MEANS else v / micro for k, v in metrics.items()}
        # A non-finite loss poisons the gradient so the optimizer skips the update.
        finite = jnp.isfinite(loss)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        overflowed = metrics.get("raster/overflow_frames", jnp.zeros(())) > 0
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            overflow_steps=state.overflow_steps + overflowed.astype(jnp.int32),
        )
        skipped = skipped_update_count(state.opt_state)
        metrics = {
            **metrics,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step - first_step - skipped),
            "skipped_updates": skipped_update_count(opt_state),
        }
        if "raster/overflow_frames" in metrics:
            metrics["raster/overflow_steps"] = new_state.overflow_steps
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return train_step
