"""Shared pieces of the Pallas compositing kernels: static settings and per-pixel maths.

Both kernels (`raster_triton`, `raster_mosaic`) composite one 16x16 tile per
grid step with exactly the reference's numerics (constants in `uika_kernels.tiles`):
``alpha = min(0.999, o exp(-sigma))``, skipped when ``alpha < 1/255`` or
``sigma < 0``, stop (Gaussian excluded) when ``T (1 - alpha) <= 1e-4``. The
per-slot attributes are gathered once outside the kernels into a slot table
with `GEO_WIDTH` geometry columns: mean x, mean y, conic a, b, c, opacity.
The functions here work on pixel vectors of any shape (1-D for Triton,
(rows, 128) for Mosaic TPU) and on scalar slot attributes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from uika_kernels.tiles import ALPHA_THRESHOLD, MAX_ALPHA, T_THRESHOLD, tile_grid

GEO_WIDTH = 6
# Typed constants: kernels stay 32-bit even with jax_enable_x64 on (Mosaic has no 64-bit).
ONE, ZERO = np.float32(1), np.float32(0)
I_ONE, I_ZERO = np.int32(1), np.int32(0)


def as_int(mask: jax.Array) -> jax.Array:
    """Boolean mask to int32 0/1."""
    return jnp.where(mask, I_ONE, I_ZERO)


@dataclasses.dataclass(frozen=True)
class KernelStatic:
    """Static settings of one compositing call (hashable).

    Attributes:
      n_cams: cameras C.
      width: image width.
      height: image height.
      tile_size: tile side in pixels (a power of two).
      interpret: run the kernel in Pallas interpret mode (any platform, for tests).
      chunk: slots per DMA chunk of the Mosaic kernel (a power of two).
    """

    n_cams: int
    width: int
    height: int
    tile_size: int
    interpret: bool = False
    chunk: int = 128

    @property
    def n_pixels(self) -> int:
        """Pixels per tile."""
        return self.tile_size * self.tile_size

    @property
    def tiles(self) -> tuple[int, int]:
        """(tiles across, tiles down) of one camera."""
        return tile_grid(self.width, self.height, self.tile_size)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Kernel grid (tiles down, tiles across, cameras): no integer division in kernels."""
        tiles_x, tiles_y = self.tiles
        return tiles_y, tiles_x, self.n_cams

    def block_index(self, *trailing: int):
        """Index map: the current tile's block along the leading (tile) axis."""
        return lambda ty, tx, cam, *_: (tile_index(ty, tx, cam, self), *trailing)


def tile_index(ty, tx, cam, static: KernelStatic):
    """Global tile index (camera * n_tiles + row-major tile), int32 arithmetic only."""
    i32 = np.int32
    tiles_x, tiles_y = static.tiles
    return (cam * i32(tiles_y) + ty) * i32(tiles_x) + tx


def grid_tile(static: KernelStatic):
    """(global tile index, tile column, tile row) of the current program of `static.grid`."""
    ty, tx, cam = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return tile_index(ty, tx, cam, static), tx, ty


def pixel_coords(tx, ty, p, static: KernelStatic):
    """Pixel centres and inside-image mask of the pixels p (int32, row-major) of tile (tx, ty)."""
    i32 = np.int32
    tile_size = static.tile_size
    col = tx * i32(tile_size) + jnp.bitwise_and(p, i32(tile_size - 1))
    row = ty * i32(tile_size) + jnp.right_shift(p, i32(tile_size.bit_length() - 1))
    inside = (col < i32(static.width)) & (row < i32(static.height))
    return col.astype(jnp.float32) + 0.5, row.astype(jnp.float32) + 0.5, inside


def gaussian_alpha(mx, my, ca, cb, cc, op, px, py):
    """dx, dy, sigma, exp(-sigma), alpha of one Gaussian (scalars) at pixel centres (vectors)."""
    dx = mx - px
    dy = my - py
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    vis = jnp.exp(-sigma)
    return dx, dy, sigma, vis, jnp.minimum(MAX_ALPHA, op * vis)


def forward_step(k, tr, last, done, alpha, sigma):
    """One front-to-back step for slot k (< limit) of every pixel.

    Returns:
      (weight alpha T where the Gaussian contributes else 0, new T, new last, new done).
    """
    active = jnp.logical_not(done)
    use = active & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    next_t = tr * (1.0 - alpha)
    stop = use & (next_t <= T_THRESHOLD)
    use = use & jnp.logical_not(stop)
    weight = jnp.where(use, alpha * tr, 0.0)
    tr = jnp.where(use, next_t, tr)
    last = jnp.where(active & jnp.logical_not(stop), k + I_ONE, last)
    return weight, tr, last, done | stop


def backward_step(k, last, tr, alpha, sigma, vis, op):
    """One back-to-front step: recovers T before slot k and the per-pixel factors.

    Returns:
      (T before k, 1 / (1 - alpha), weight alpha T, unclamped mask).
    """
    valid = (k < last) & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    ra = 1.0 / (1.0 - jnp.where(valid, alpha, 0.0))
    tr = jnp.where(valid, tr * ra, tr)
    fac = jnp.where(valid, alpha * tr, 0.0)
    unclamped = valid & (op * vis <= MAX_ALPHA)
    return tr, ra, fac, unclamped


def geometry_grads(v_alpha, unclamped, vis, dx, dy, op, ca, cb, cc):
    """Per-slot gradients (mean x, mean y, conic a, b, c, opacity) summed over pixels."""
    v_sigma = jnp.where(unclamped, -op * vis * v_alpha, 0.0)
    return (
        jnp.sum(v_sigma * (ca * dx + cb * dy)),
        jnp.sum(v_sigma * (cb * dx + cc * dy)),
        jnp.sum(0.5 * v_sigma * dx * dx),
        jnp.sum(v_sigma * dx * dy),
        jnp.sum(0.5 * v_sigma * dy * dy),
        jnp.sum(jnp.where(unclamped, vis * v_alpha, 0.0)),
    )


def any_true(mask: jax.Array) -> jax.Array:
    """Scalar bool: any element set (a float max reduction, which every Pallas backend lowers)."""
    return jnp.max(jnp.where(mask, ONE, ZERO)) > ZERO
