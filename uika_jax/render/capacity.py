"""Sizing the rasterizer's static capacities: exact counts, rounding, `calibrate_capacity()`.

`RasterConfig.capacity` (intersection slots per scene) and `tile_cap` (slots
per tile) are static shapes. `scene_counts` measures what a scene needs
exactly (projection plus the exact per-tile counts; no compositing). On
concrete inputs `rasterization()` sizes its own capacity from it
(`round_capacity`: a few sizes per octave, so that recompiles stay rare);
`calibrate_capacity()` adds headroom on sample scenes, so that a jitted
training or evaluation run can use fixed capacities and never overflow on data
like the sample.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render import binning, projection
from uika_jax.render.config import MAX_CAPACITY, RasterConfig
from uika_kernels.tiles import tile_grid

MIN_CAPACITY = 1024
_STEPS_PER_OCTAVE_LOG2 = 2  # capacities 1, 1.25, 1.5, 1.75 x 2^k: at most 25% unused


def round_capacity(n_isects: int) -> int:
    """Slots for `n_isects` intersections: rounded up to 4 sizes an octave, >= MIN_CAPACITY.

    Raises:
      ValueError: more intersections than `MAX_CAPACITY` (int32 slot indices) allows.
    """
    if n_isects > MAX_CAPACITY:
        raise ValueError(
            f"the scene has {n_isects} tile intersections (saturating count), more than the "
            f"{MAX_CAPACITY} that int32 slot indices address: render fewer cameras per call, "
            f"fewer or smaller Gaussians, or a smaller image"
        )
    n = max(int(n_isects), MIN_CAPACITY)
    step = 1 << max(n.bit_length() - 1 - _STEPS_PER_OCTAVE_LOG2, 0)
    return min(-(-n // step) * step, MAX_CAPACITY)


def _count_scene(means, quats, scales, opacities, viewmats, Ks, *, width, height, near_plane,
                 far_plane, eps2d, tile_size, radius_rule):  # fmt: skip
    _, _, _, gauss_ok, cam_ok = projection.sanitize(
        means, quats, scales, opacities, jnp.zeros_like(means), viewmats, Ks
    )
    proj = projection.project(
        means, quats, scales, opacities, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
        radius_rule=radius_rule, valid=cam_ok[:, None] & gauss_ok[None, :],
    )  # fmt: skip
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    lo, hi = binning.tile_rects(proj.means2d, proj.radii, tile_size, tiles_x, tiles_y)
    span = hi - lo
    total = binning.saturating_cumsum((span[..., 0] * span[..., 1]).reshape(-1))[-1]
    return total, jnp.max(binning.true_tile_counts(lo, hi, tiles_x, tiles_y))


@functools.partial(
    jax.jit,
    static_argnames=("width", "height", "near_plane", "far_plane", "eps2d", "tile_size",
                     "radius_rule"),
)  # fmt: skip
def scene_counts(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    *,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
    radius_rule: str = "opacity",
) -> tuple[jax.Array, jax.Array]:
    """Exact intersection counts of each scene (arguments as `rasterization`).

    Returns:
      (total intersections, int32 saturating at 2^31 - 1; the largest per-tile count),
      each of shape batch (the leading dims of `means` beyond (N, 3)).
    """
    fn = functools.partial(
        _count_scene, width=width, height=height, near_plane=near_plane, far_plane=far_plane,
        eps2d=eps2d, tile_size=tile_size, radius_rule=radius_rule,
    )  # fmt: skip
    for _ in range(means.ndim - 2):
        fn = jax.vmap(fn)
    return fn(means, quats, scales, opacities, viewmats, Ks)


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
    multiplies by `headroom` and rounds up (capacity by `round_capacity`,
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

    Raises:
      ValueError: headroom below 1, or more intersections than int32 slots address.
    """
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom}")
    base = base or RasterConfig()
    args = [jnp.asarray(x) for x in (means, quats, scales, opacities, viewmats, Ks)]
    total, max_tile = scene_counts(
        *args, width=int(width), height=int(height), near_plane=float(near_plane),
        far_plane=float(far_plane), eps2d=float(eps2d), tile_size=int(tile_size),
        radius_rule=base.radius_rule,
    )  # fmt: skip
    total, max_tile = int(np.max(total)), int(np.max(max_tile))
    needed = total if total > MAX_CAPACITY else min(math.ceil(total * headroom), MAX_CAPACITY)
    capacity = round_capacity(needed)  # raises when the sample alone does not fit
    tile_cap = max(32, -(-math.ceil(max_tile * headroom) // 32) * 32) if with_tile_cap else None
    return dataclasses.replace(base, capacity=capacity, tile_cap=tile_cap)
