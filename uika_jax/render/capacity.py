"""Sizing the rasterizer's static capacities from sample data: `calibrate_capacity()`.

`RasterConfig.capacity` (intersection slots per scene) and `tile_cap` (slots
per tile) are static shapes. This measures them exactly on sample scenes
(projection plus the exact per-tile counts; no compositing), adds headroom and
rounds up, so a training or evaluation run can use strict mode and still never
overflow on data like the sample.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render import binning, projection
from uika_jax.render.rasterize import RasterConfig, sanitize


def calibrate_capacity(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    width: int,
    height: int,
    *,
    headroom: float = 1.5,
    with_tile_cap: bool = True,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
    base: RasterConfig | None = None,
) -> RasterConfig:
    """Sizes `capacity` (and `tile_cap`) from sample scenes, with headroom.

    Runs projection and exact intersection counting (no compositing) on the
    sample, takes the largest per-scene total and the largest per-tile count,
    multiplies by `headroom` and rounds up (capacity to a multiple of 1024,
    tile_cap to a multiple of 32).

    Args:
      means: sample centres (..., N, 3), leading dims a batch of sample scenes.
      quats: (..., N, 4).
      scales: (..., N, 3).
      opacities: (..., N).
      viewmats: (..., C, 4, 4).
      Ks: (..., C, 3, 3).
      width: image width.
      height: image height.
      headroom: factor >= 1 applied to the measured maxima.
      with_tile_cap: also set `tile_cap` (needed by fixed-shape kernels).
      near_plane: as in `rasterization`.
      far_plane: as in `rasterization`.
      eps2d: as in `rasterization`.
      tile_size: as in `rasterization`.
      base: the config whose other fields are kept (default `RasterConfig()`).

    Returns:
      A `RasterConfig` with the capacities set.
    """
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    base = base or RasterConfig()
    tiles_x, tiles_y = binning.tile_grid(width, height, tile_size)
    nb = means.ndim - 2

    def count(means, quats, scales, opacities, viewmats, Ks):
        _, _, _, gauss_ok, cam_ok = sanitize(
            means, quats, scales, opacities, jnp.zeros_like(means), viewmats, Ks
        )
        proj = projection.project(
            means, quats, scales, opacities, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
            radius_rule=base.radius_rule, valid=cam_ok[:, None] & gauss_ok[None, :],
        )  # fmt: skip
        lo, hi = binning.tile_rects(proj.means2d, proj.radii, tile_size, tiles_x, tiles_y)
        span = hi - lo
        per_tile = binning.true_tile_counts(lo, hi, tiles_x, tiles_y)
        return jnp.sum(span[..., 0] * span[..., 1]), jnp.max(per_tile)

    fn = count
    for _ in range(nb):
        fn = jax.vmap(fn)
    args = [jnp.asarray(x) for x in (means, quats, scales, opacities, viewmats, Ks)]
    total, max_tile = jax.jit(fn)(*args)
    total, max_tile = int(np.max(total)), int(np.max(max_tile))
    capacity = max(1024, -(-math.ceil(total * headroom) // 1024) * 1024)
    tile_cap = max(32, -(-math.ceil(max_tile * headroom) // 32) * 32) if with_tile_cap else None
    return dataclasses.replace(base, capacity=capacity, tile_cap=tile_cap)
