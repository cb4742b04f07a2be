"""Stage 2 of the rasterizer: tile intersections in exact (camera, tile, depth) order.

Integer-only and static-shaped: intersections live in `capacity` slots. Each
visible (camera, Gaussian) covers the tile rectangle gsplat's `isect_tiles`
computes (floor/ceil of (mean -/+ radius) / tile_size, clamped to the grid).
The true intersection total and the true per-tile counts are always computed
(per-tile counts exactly, by a 2D difference array, independent of capacity),
so an overflow is counted, never silent.

Order, with one sort over the (camera, Gaussian) pairs and one over the
intersections: the pairs are sorted by depth (float32 bits mapped
monotonically to uint32; stable, so ties keep (camera, Gaussian) index order)
and each pair's tiles are written, row-major, in that order; one stable sort
by the tile key ``camera * n_tiles + tile`` then gives gsplat's (camera, tile,
depth) order exactly, ties broken by Gaussian index as its stable radix sort
does. Neither sort needs 64-bit integers, and the intersection sort has one
uint32 key and one payload (XLA's fast GPU radix sort). Because the
intersections are written nearest first, a total above `capacity` drops the
farthest ones (over all cameras of the scene).

Counting cannot wrap with 64-bit types off: running totals are saturating
int32 sums (`saturating_cumsum`), so the total reads 2^31 - 1 when it is at
least that, never a wrapped negative or small number.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from uika_kernels.tiles import tile_grid

INT32_MAX = 2**31 - 1
_SENTINEL = 0xFFFFFFFF


class Bins(NamedTuple):
    """Sorted intersections and per-tile ranges for C cameras.

    Attributes:
      flat_ids: for each sorted slot, the (camera * N + Gaussian) index (capacity,) int32;
        slots past the stored total hold 0.
      tile_start: first slot of each tile (C * n_tiles,) int32.
      tile_count: number of stored slots of each tile (C * n_tiles,) int32.
      true_tile_count: number of intersections each tile really has (C * n_tiles,) int32.
      n_isects: the true intersection total () int32, which may exceed capacity;
        saturates at 2^31 - 1.
      tiles_per_gauss: tiles each (camera, Gaussian) covers (C, N) int32.
    """

    flat_ids: jax.Array
    tile_start: jax.Array
    tile_count: jax.Array
    true_tile_count: jax.Array
    n_isects: jax.Array
    tiles_per_gauss: jax.Array


def depth_key(depths: jax.Array) -> jax.Array:
    """Maps float32 depths to uint32 keys with the same order (negative values included)."""
    bits = jax.lax.bitcast_convert_type(depths.astype(jnp.float32), jnp.uint32)
    neg = (bits >> 31) == 1
    return jnp.where(neg, ~bits, bits | jnp.uint32(0x80000000))


def tile_rects(
    means2d: jax.Array, radii: jax.Array, tile_size: int, tiles_x: int, tiles_y: int
) -> tuple[jax.Array, jax.Array]:
    """Tile rectangles [min, max) (..., 2) int32 per Gaussian, empty where culled."""
    m = jax.lax.stop_gradient(means2d).astype(jnp.float32) / tile_size
    r = radii.astype(jnp.float32) / tile_size
    hi_lim = jnp.array([tiles_x, tiles_y], jnp.float32)
    # Clip before the integer cast: huge (or inf) coordinates must not wrap.
    lo = jnp.clip(jnp.floor(m - r), 0, hi_lim).astype(jnp.int32)
    hi = jnp.clip(jnp.ceil(m + r), 0, hi_lim).astype(jnp.int32)
    visible = (radii > 0).all(-1, keepdims=True)
    return jnp.where(visible, lo, 0), jnp.where(visible, hi, 0)


def saturating_cumsum(counts: jax.Array) -> jax.Array:
    """Inclusive running totals of non-negative int32 counts, saturating at 2^31 - 1.

    Saturating addition of non-negative numbers is associative, so this is one
    parallel scan (in uint32, where two saturated terms still fit); no 64-bit types.
    """
    cap = jnp.uint32(INT32_MAX)
    sums = jax.lax.associative_scan(lambda a, b: jnp.minimum(a + b, cap), counts.astype(jnp.uint32))
    return sums.astype(jnp.int32)


def true_tile_counts(lo: jax.Array, hi: jax.Array, tiles_x: int, tiles_y: int) -> jax.Array:
    """Exact per-tile intersection counts (C, tiles_y * tiles_x) by a 2D difference array."""
    c = lo.shape[0]
    cam = jnp.broadcast_to(jnp.arange(c)[:, None], lo.shape[:2])
    grid = jnp.zeros((c, tiles_y + 1, tiles_x + 1), jnp.int32)
    grid = grid.at[cam, lo[..., 1], lo[..., 0]].add(1)
    grid = grid.at[cam, lo[..., 1], hi[..., 0]].add(-1)
    grid = grid.at[cam, hi[..., 1], lo[..., 0]].add(-1)
    grid = grid.at[cam, hi[..., 1], hi[..., 0]].add(1)
    counts = jnp.cumsum(jnp.cumsum(grid, axis=1), axis=2)
    return counts[:, :tiles_y, :tiles_x].reshape(c, -1)


def bin_gaussians(
    means2d: jax.Array,
    radii: jax.Array,
    depths: jax.Array,
    width: int,
    height: int,
    *,
    tile_size: int = 16,
    capacity: int,
) -> Bins:
    """Builds the sorted tile intersections of C cameras' projected Gaussians.

    Args:
      means2d: image-space means (C, N, 2).
      radii: integer radii (C, N, 2); 0 means culled.
      depths: camera depths (C, N).
      width: image width.
      height: image height.
      tile_size: tile side in pixels.
      capacity: static number of intersection slots; beyond it the farthest
        intersections are dropped (and counted).

    Returns:
      The `Bins`.
    """
    c, n = depths.shape
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    n_tiles = tiles_x * tiles_y
    if c * n_tiles >= _SENTINEL:
        raise ValueError(f"{c} cameras x {n_tiles} tiles do not fit a 32-bit tile key")
    lo, hi = tile_rects(means2d, radii, tile_size, tiles_x, tiles_y)
    span = hi - lo
    per_gauss = span[..., 0] * span[..., 1]  # (C, N), each at most n_tiles

    # (camera, Gaussian) pairs nearest first; ties keep index order.
    pairs = jnp.arange(c * n, dtype=jnp.int32)
    _, by_depth = jax.lax.sort((depth_key(depths).reshape(-1), pairs), num_keys=1, is_stable=True)
    counts = per_gauss.reshape(-1)[by_depth]
    ends = saturating_cumsum(counts)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    n_isects = ends[-1]

    # Slot -> rank in depth order: mark each run's start, then a running max.
    rank = jnp.zeros((capacity,), jnp.int32)
    rank = rank.at[jnp.where(counts > 0, starts, capacity)].max(pairs, mode="drop")
    rank = jax.lax.cummax(rank)
    slot = jnp.arange(capacity, dtype=jnp.int32)
    used = slot < n_isects
    owner = by_depth[rank]
    local = slot - starts[rank]
    lo_f, span_f = lo.reshape(-1, 2)[owner], span.reshape(-1, 2)[owner]
    w = jnp.maximum(span_f[:, 0], 1)
    tx = lo_f[:, 0] + local % w
    ty = lo_f[:, 1] + local // w
    tile_key = ((owner // n) * n_tiles + ty * tiles_x + tx).astype(jnp.uint32)
    tile_key = jnp.where(used, tile_key, jnp.uint32(_SENTINEL))

    tile_key, flat_ids = jax.lax.sort((tile_key, owner), num_keys=1, is_stable=True)
    stored_slot = tile_key != jnp.uint32(_SENTINEL)
    # Stored slots per tile (sentinel slots go to an extra bin that is dropped).
    bin_index = jnp.minimum(tile_key, jnp.uint32(c * n_tiles)).astype(jnp.int32)
    stored = jnp.zeros((c * n_tiles + 1,), jnp.int32).at[bin_index].add(1)[:-1]
    return Bins(
        flat_ids=jnp.where(stored_slot, flat_ids, 0),
        tile_start=jnp.cumsum(stored) - stored,
        tile_count=stored,
        true_tile_count=true_tile_counts(lo, hi, tiles_x, tiles_y).reshape(-1),
        n_isects=n_isects,
        tiles_per_gauss=per_gauss,
    )
