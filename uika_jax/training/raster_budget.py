"""The rasterizer's capacity for a training run, sized for the largest Gaussians the head makes.

Under `jit` the rasterizer needs a static number of intersection slots per frame. The
Gaussian head soft-caps every scale at `model.gaussians.max_scale`, so the most
intersections a frame can have come from every Gaussian at that scale, opaque. With
`render.capacity` None, `raster_config` measures exactly that case on the template
anchors (zero offsets) posed for a sample batch's target frames and seen through their
cameras (`uika_jax.render.capacity.calibrate_capacity`), times `render.capacity_headroom`,
so that a long run, whose Gaussians grow, does not start overflowing half-way. The
count is still checked every step (`raster/dropped` in the metrics).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from uika_jax import sharding
from uika_jax.head.anchors import Anchors
from uika_jax.head.model import HeadModel
from uika_jax.models.avatar import drive
from uika_jax.models.gaussians import CanonicalGaussians
from uika_jax.render import RasterConfig
from uika_jax.render.capacity import calibrate_capacity
from uika_jax.training.step import target_params

_CAMERA_KEYS = (
    "target_pose", "target_expression", "target_translation", "shape", "target_viewmat",
    "target_intrinsics",
)  # fmt: skip

OPAQUE_LOGIT = 10.0
"""Opacity logit of the calibration's Gaussians (opacity 0.99995: the widest radii)."""


def largest_gaussians(anchors: Anchors, batch_size: int, max_scale: float) -> CanonicalGaussians:
    """Canonical Gaussians on the template anchors, every scale at `max_scale`, opaque."""
    k = anchors.num_anchors

    def full(shape, value):
        return jnp.full((batch_size, *shape), value, jnp.float32)

    positions = jnp.broadcast_to(jnp.asarray(anchors.positions, jnp.float32), (batch_size, k, 3))
    return CanonicalGaussians(
        means=positions,
        quats=jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0, 0.0]), (batch_size, k, 4)),
        log_scales=full((k, 3), math.log(max_scale)),
        opacity_logits=full((k,), OPAQUE_LOGIT),
        colors=full((k, 3), 0.5),
        offsets=full((k, 3), 0.0),
        fusion_weights=full((k, 1), 0.0),
        pred_colors=full((k, 3), 0.5),
        aggr_colors=full((k, 3), 0.0),
    )


def raster_config(
    config: ml_collections.ConfigDict,
    head: HeadModel,
    anchors: Anchors,
    batch: Mapping[str, jax.Array],
) -> RasterConfig:
    """The run's `RasterConfig`: the config's capacity, or one calibrated (module docstring).

    Args:
      config: the run's config (`render`, `model.gaussians.max_scale`).
      head: the head model.
      anchors: the Gaussians' anchors.
      batch: a sample batch (its target frames' parameters and cameras): host arrays or
        global arrays (gathered from every process, so all processes agree).
    """
    r = config.render
    base = RasterConfig(backend=r.backend, tile_cap=r.tile_cap, warn_on_overflow=False)
    if r.capacity is not None:
        return dataclasses.replace(base, capacity=int(r.capacity))
    batch = {k: jnp.asarray(sharding.to_host(batch[k])) for k in _CAMERA_KEYS}
    b = batch["target_pose"].shape[0]
    gaussians = largest_gaussians(anchors, b, float(config.model.gaussians.max_scale))
    posed = drive(head, anchors, gaussians, target_params(batch))
    size = int(config.model.image_size)
    calibrated = calibrate_capacity(
        posed.means,
        posed.quats,
        posed.scales(),
        posed.opacities(),
        batch["target_viewmat"][..., None, :, :],
        batch["target_intrinsics"][..., None, :, :],
        size,
        size,
        headroom=float(r.capacity_headroom),
        with_tile_cap=False,
        base=base,
    )
    logging.info(
        "rasterizer capacity %d intersections a frame (every Gaussian at max_scale %.4g, "
        "x%.2f headroom)", calibrated.capacity, config.model.gaussians.max_scale,
        r.capacity_headroom,
    )  # fmt: skip
    return calibrated
