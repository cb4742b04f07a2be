"""Stage 3-4 of the reference rasterizer: tile compositing and its custom VJP.

Numerics (gsplat's CUDA forward): each tile composites its sorted
intersections front to back for all of its tile_size x tile_size pixels. Per
pixel: ``alpha = min(0.999, o exp(-sigma))``, skipped when ``alpha < 1/255``
or ``sigma < 0``; the pixel stops (that Gaussian excluded) when
``T (1 - alpha) <= 1e-4``. A tile ends when every pixel has stopped (early
termination) or its slot list, cut at the per-tile cap, is exhausted.

Traversal: a work queue. The tiles with work are queued longest first; each
of `lanes` lanes composites one tile, `block` slots per step (their
attributes read as contiguous rows of a slot table gathered once, alpha for
block x pixels in one vectorised op, T as a running product over the block),
and takes the next queued tile as soon as its own ends. Work is proportional
to the slots each tile really walks: empty tiles cost nothing, no tile waits
for the longest, and a tile stops at its own early termination.

Residuals are O(pixels): the final transmittance and, per pixel, the number of
slots it consumed (`last`). The backward pass walks each tile back to front
from there with the same queue, recovering T by division exactly as gsplat's
backward does, writes one gradient row per intersection slot, and reduces the
rows to Gaussians with a sort by Gaussian and a segmented scan
(`segment_sum_sorted`: a fixed summation order on every backend, no float
atomics). Nothing of size [tiles, pixels, slots] is ever materialised.

`composite()` returns (accumulated colour, T_final, truncated pixels); the
background term ``T_final * bg`` and ``alpha = 1 - T_final`` are added by the
caller in plain jnp. Other backends (Pallas kernels) implement the same
signature and outputs and register with `rasterization.register_backend`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from uika_kernels.tiles import (
    ALPHA_THRESHOLD,
    MAX_ALPHA,
    T_THRESHOLD,
    segment_sum_sorted,
    tile_grid,
    tiles_to_image,
)


class _Traversal(NamedTuple):
    """Static layout of one compositing call (hashable: a non-differentiable argument)."""

    n_cams: int
    width: int
    height: int
    tile_size: int
    lanes: int
    block: int


def _tile_origin(tile: jax.Array, trav: _Traversal) -> tuple[jax.Array, jax.Array]:
    """Column and row (L,) of the top-left pixel of the given global tiles (L,)."""
    tiles_x, tiles_y = tile_grid(trav.width, trav.height, trav.tile_size)
    local = tile % (tiles_x * tiles_y)
    return (local % tiles_x) * trav.tile_size, (local // tiles_x) * trav.tile_size


def _inside(tile: jax.Array, trav: _Traversal) -> jax.Array:
    """Which of the P pixels of the given tiles (L,) lie inside the image (L, P)."""
    col, row = _tile_origin(tile, trav)
    p = jnp.arange(trav.tile_size * trav.tile_size, dtype=jnp.int32)
    col = col[:, None] + p % trav.tile_size
    row = row[:, None] + p // trav.tile_size
    return (col < trav.width) & (row < trav.height)


def _local_centres(trav: _Traversal, dtype) -> tuple[jax.Array, jax.Array]:
    """Pixel centres (P,) x and y relative to their tile's top-left corner."""
    p = jnp.arange(trav.tile_size * trav.tile_size, dtype=jnp.int32)
    return (p % trav.tile_size).astype(dtype) + 0.5, (p // trav.tile_size).astype(dtype) + 0.5


def _slot_table(means2d, conics, opacities, colors, flat_ids):
    """Per-slot attribute rows (S, 6 + D): mean x, y, conic a, b, c, opacity, colour.

    Gathered once in slot order, so that each step reads its lanes' blocks as
    contiguous rows instead of scattered Gaussians.
    """
    per_gauss = jnp.concatenate(
        [
            means2d.reshape(-1, 2),
            conics.reshape(-1, 3),
            opacities.reshape(-1, 1),
            colors.reshape(-1, colors.shape[-1]),
        ],
        -1,
    )
    return per_gauss[flat_ids]


class _Queue(NamedTuple):
    """Tiles to walk, longest walk first (longest processing time first balances the lanes)."""

    order: jax.Array  # (T,) tile indices
    n_busy: jax.Array  # tiles with work; order[n_busy:] have none

    @classmethod
    def of(cls, work: jax.Array) -> _Queue:
        """Queue of the tiles with work (T,) > 0."""
        order = jnp.argsort(-work, stable=True).astype(jnp.int32)
        return cls(order, jnp.sum(work > 0, dtype=jnp.int32))

    def tiles(self, position: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tile (L,) at each lane's queue position (L,), and whether the lane holds one."""
        tile = self.order[jnp.minimum(position, self.order.shape[0] - 1)]
        return tile, position < self.n_busy

    @staticmethod
    def advance(finished, position, next_position):
        """Lanes whose tile finished take the next queued tiles, in lane order."""
        rank = jnp.cumsum(finished, dtype=jnp.int32) - 1
        position = jnp.where(finished, next_position + rank, position)
        return position, next_position + jnp.sum(finished, dtype=jnp.int32)


def _gather_block(table, tile_start, tile, offsets, trav):
    """Slots (L, B) at `offsets` into each lane's tile, and their (mean, conic, opacity, colour).

    Means are relative to the tile's top-left corner, so that pixel centres are
    the same (P,) vectors for every tile (an integer shift: exact).
    """
    slot = tile_start[tile][:, None] + offsets
    rows = table[jnp.clip(slot, 0, table.shape[0] - 1)]
    origin = jnp.stack(_tile_origin(tile, trav), -1).astype(rows.dtype)
    mean = rows[..., 0:2] - origin[:, None, :]
    return slot, (mean, rows[..., 2:5], rows[..., 5], rows[..., 6:])


def _block_alpha(mean, conic, opac, px, py, counted):
    """dx, dy, exp(-sigma) and alpha (L, B, P) of B Gaussians per lane at the P pixels (px, py).

    Alpha is zero where the slot does not count (`counted` false: outside the
    walked list) or is skipped (``sigma < 0`` or ``alpha < 1/255``), so a
    skipped slot leaves T unchanged (``1 - 0`` is exactly 1).
    """
    dx = mean[..., 0:1] - px
    dy = mean[..., 1:2] - py
    sigma = 0.5 * (conic[..., 0:1] * dx * dx + conic[..., 2:3] * dy * dy)
    sigma = sigma + conic[..., 1:2] * dx * dy
    vis = jnp.exp(-sigma)
    alpha = jnp.minimum(MAX_ALPHA, opac[..., None] * vis)
    counted = counted & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    return dx, dy, vis, jnp.where(counted, alpha, 0.0)


def _front_to_back(tr, done, alpha, n_in):
    """Composites one block of B slots per lane, front to back, at every lane pixel.

    The recurrence ``T <- T (1 - alpha)`` is a running product over the block
    (in slot order); a pixel stops at the first slot that would take T to
    `T_THRESHOLD` or below (that slot excluded), so it uses exactly the slots
    whose running product stays above the threshold.

    Args:
      tr: transmittance (L, P) before the block.
      done: pixels already stopped (L, P).
      alpha: alpha (L, B, P) of the block's slots, zero where skipped.
      n_in: slots (L,) of the block within their tile's list.

    Returns:
      (weights alpha T (L, B, P), T after the block, slots consumed in the block (L, P),
      pixels that stopped in the block).
    """
    running = jax.lax.cumprod(jnp.concatenate([tr[:, None], 1.0 - alpha], 1), axis=1)
    t_before, t_after = running[:, :-1], running[:, 1:]
    above = t_after > T_THRESHOLD
    weights = jnp.where(above & ~done[:, None], alpha * t_before, 0.0)
    consumed = jnp.minimum(jnp.sum(above, axis=1, dtype=jnp.int32), n_in[:, None])
    consumed = jnp.where(done, 0, consumed)
    t_last = jnp.min(jnp.where(above, t_after, tr[:, None]), axis=1)
    return weights, jnp.where(done, tr, t_last), consumed, ~done & ~above[:, -1]


def _back_to_front(tr, bv, alpha, col_v, t_final, v_t):
    """Walks one block of B slots per lane back to front, as gsplat's backward does.

    T before each slot is recovered by division from the T after it (a running
    product of ``1 / (1 - alpha)`` over the block, in walk order).

    Args:
      tr: T (L, P) after the block's last slot.
      bv: (colour composited behind the block) . v_colour (L, P).
      alpha: alpha (L, B, P) of the block's slots, back to front, zero where not
        composited in the forward pass.
      col_v: slot colour . v_colour (L, B, P).
      t_final: final transmittance (L, P).
      v_t: its cotangent (L, P).

    Returns:
      (weight alpha T (L, B, P), v_alpha (L, B, P), T before the block, bv before it).
    """
    ra = 1.0 / (1.0 - alpha)
    t_before = jax.lax.cumprod(jnp.concatenate([tr[:, None], ra], 1), axis=1)[:, 1:]
    fac = alpha * t_before
    behind = jnp.cumsum(jnp.concatenate([bv[:, None], fac * col_v], 1), axis=1)
    v_alpha = col_v * t_before - (behind[:, :-1] + t_final[:, None] * v_t[:, None]) * ra
    return fac, v_alpha, t_before[:, -1], behind[:, -1]


def _sum_pixels(terms: list[jax.Array]) -> tuple[jax.Array, ...]:
    """Sums of each (L, B, P) term over its pixels, in one variadic reduction."""

    def add(a, b):
        return tuple(x + y for x, y in zip(a, b, strict=True))

    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return jax.lax.reduce(tuple(terms), zeros, add, (2,))


def _lanes(trav: _Traversal, n_tiles: int) -> tuple[int, jax.Array]:
    """Lane count (no more than tiles) and the lanes' first queue positions."""
    lanes = min(trav.lanes, n_tiles)
    return lanes, jnp.arange(lanes, dtype=jnp.int32)


def _forward(means2d, conics, opacities, colors, flat_ids, tile_start, limit, trav):
    """Front-to-back pass. Returns per-tile (T_final, colour (T, D, P), last, done)."""
    dtype, d = colors.dtype, colors.shape[-1]
    table = _slot_table(means2d, conics, opacities, colors, flat_ids)
    n_t, n_p = limit.shape[0], trav.tile_size * trav.tile_size
    queue = _Queue.of(limit)
    lanes, first = _lanes(trav, n_t)
    steps = jnp.arange(trav.block, dtype=jnp.int32)
    px, py = _local_centres(trav, dtype)

    def fresh(tile):
        """Lane state (k, T, colour, last, done) at the start of the given tiles."""
        inside = _inside(tile, trav)
        return (
            jnp.zeros((lanes,), jnp.int32),
            jnp.ones((lanes, n_p), dtype),
            jnp.zeros((lanes, d, n_p), dtype),
            jnp.zeros((lanes, n_p), jnp.int32),
            ~inside,
        )

    def body(s):
        position, next_position, lane, out = s
        k, tr, acc, last, done = lane
        tile, busy = queue.tiles(position)
        n_in = jnp.where(busy, jnp.clip(limit[tile] - k, 0, trav.block), 0)
        offsets = k[:, None] + steps
        _, (mean, conic, opac, col) = _gather_block(table, tile_start, tile, offsets, trav)
        _, _, _, alpha = _block_alpha(mean, conic, opac, px, py, (steps < n_in[:, None])[..., None])
        weights, tr, consumed, stopped = _front_to_back(tr, done, alpha, n_in)
        done = done | stopped
        last = jnp.where(consumed > 0, k[:, None] + consumed, last)
        acc = acc + jnp.sum(weights[:, :, None, :] * col[..., None], axis=1)
        k = k + trav.block
        finished = busy & ((k >= limit[tile]) | jnp.all(done, axis=1))
        dest = jnp.where(finished, tile, n_t)
        out = tuple(
            o.at[dest].set(x, mode="drop") for o, x in zip(out, (tr, acc, last, done), strict=True)
        )
        position, next_position = _Queue.advance(finished, position, next_position)
        restart = fresh(queue.tiles(position)[0])
        lane = tuple(
            jnp.where(finished.reshape((lanes,) + (1,) * (x.ndim - 1)), r, x)
            for r, x in zip(restart, (k, tr, acc, last, done), strict=True)
        )
        return position, next_position, lane, out

    inside = _inside(jnp.arange(n_t, dtype=jnp.int32), trav)
    empty = (
        jnp.ones((n_t, n_p), dtype),
        jnp.zeros((n_t, d, n_p), dtype),
        jnp.zeros((n_t, n_p), jnp.int32),
        ~inside,
    )
    init = (first, jnp.int32(lanes), fresh(queue.tiles(first)[0]), empty)
    cond = lambda s: jnp.any(queue.tiles(s[0])[1])  # noqa: E731
    return jax.lax.while_loop(cond, body, init)[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _composite_tiles(means2d, conics, opacities, colors, flat_ids, tile_start, limit, trav):
    tr, acc, _, done = _forward(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit, trav
    )
    return acc, tr, done


def _composite_fwd(means2d, conics, opacities, colors, flat_ids, tile_start, limit, trav):
    tr, acc, last, done = _forward(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit, trav
    )
    res = (means2d, conics, opacities, colors, flat_ids, tile_start, tr, last)
    return (acc, tr, done), res


def _composite_bwd(trav, res, cts):
    means2d, conics, opacities, colors, flat_ids, tile_start, t_final, last = res
    v_acc, v_t = cts[0], cts[1]  # v_acc (T, D, P)
    dtype, d = colors.dtype, colors.shape[-1]
    table = _slot_table(means2d, conics, opacities, colors, flat_ids)
    n_slots, n_t = flat_ids.shape[0], t_final.shape[0]
    work = jnp.max(last, axis=1, initial=0)  # slots each tile walks back from
    queue = _Queue.of(work)
    lanes, first = _lanes(trav, n_t)
    steps = jnp.arange(trav.block, dtype=jnp.int32)
    px, py = _local_centres(trav, dtype)

    def body(s):
        position, next_position, k, tr, bv, grads = s
        tile, busy = queue.tiles(position)
        offsets = k[:, None] - 1 - steps  # back to front
        in_range = busy[:, None] & (offsets >= 0)
        slot, (mean, conic, opac, col) = _gather_block(table, tile_start, tile, offsets, trav)
        tf, lst, va, vt = t_final[tile], last[tile], v_acc[tile], v_t[tile]
        walked = in_range[..., None] & (offsets[..., None] < lst[:, None])
        dx, dy, vis, alpha = _block_alpha(mean, conic, opac, px, py, walked)
        col_v = sum(col[:, :, i, None] * va[:, None, i] for i in range(d))
        fac, v_alpha, tr, bv = _back_to_front(tr, bv, alpha, col_v, tf, vt)
        op = opac[..., None]
        unclamped = (alpha > 0) & (op * vis <= MAX_ALPHA)
        v_sigma = jnp.where(unclamped, -op * vis * v_alpha, 0.0)
        c0, c1, c2 = conic[..., 0:1], conic[..., 1:2], conic[..., 2:3]
        terms = [
            v_sigma * (c0 * dx + c1 * dy),
            v_sigma * (c1 * dx + c2 * dy),
            0.5 * v_sigma * dx * dx,
            v_sigma * dx * dy,
            0.5 * v_sigma * dy * dy,
            jnp.where(unclamped, vis * v_alpha, 0.0),
        ]
        terms += [fac * va[:, None, i] for i in range(d)]
        rows = jnp.stack(_sum_pixels(terms), -1)  # (L, B, 6 + D): summed over the tile
        grads = grads.at[jnp.where(in_range, slot, n_slots)].set(rows, mode="drop")
        k = k - trav.block
        finished = busy & (k <= 0)
        position, next_position = _Queue.advance(finished, position, next_position)
        new_tile = queue.tiles(position)[0]
        k = jnp.where(finished, work[new_tile], k)
        tr = jnp.where(finished[:, None], t_final[new_tile], tr)
        bv = jnp.where(finished[:, None], 0.0, bv)
        return position, next_position, k, tr, bv, grads

    tile0 = queue.tiles(first)[0]
    init = (
        first,
        jnp.int32(lanes),
        work[tile0],
        t_final[tile0],
        jnp.zeros(t_final[tile0].shape, dtype),
        jnp.zeros((n_slots, 6 + d), dtype),
    )
    cond = lambda s: jnp.any(queue.tiles(s[0])[1])  # noqa: E731
    grads = jax.lax.while_loop(cond, body, init)[-1]
    order = jnp.argsort(flat_ids, stable=True)
    per_gauss = segment_sum_sorted(grads[order], flat_ids[order], opacities.size)
    shape = opacities.shape
    v_means2d = per_gauss[:, 0:2].reshape((*shape, 2))
    v_conics = per_gauss[:, 2:5].reshape((*shape, 3))
    v_opac = per_gauss[:, 5].reshape(shape)
    v_colors = per_gauss[:, 6:].reshape((*shape, d))
    return v_means2d, v_conics, v_opac, v_colors, None, None, None


_composite_tiles.defvjp(_composite_fwd, _composite_bwd)

# Traversal defaults, tuned on a 2-core CPU (benchmarks/rasterizer.py scenes): lanes
# grow with the tile count (more work per step) within [MIN_LANES, MAX_LANES].
TILES_PER_LANE = 16
MIN_LANES, MAX_LANES = 16, 64
BLOCK = 8


def default_lanes(n_tiles: int) -> int:
    """Lanes for `n_tiles` tiles (all cameras): one per `TILES_PER_LANE`, within bounds."""
    return min(MAX_LANES, max(MIN_LANES, n_tiles // TILES_PER_LANE))


def composite(
    means2d: jax.Array,
    conics: jax.Array,
    opacities: jax.Array,
    colors: jax.Array,
    flat_ids: jax.Array,
    tile_start: jax.Array,
    tile_count: jax.Array,
    width: int,
    height: int,
    *,
    tile_size: int = 16,
    tile_cap: int | None = None,
    lanes: int | None = None,
    block: int = BLOCK,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Composites binned Gaussians front to back (reference backend), differentiable.

    Args:
      means2d: image-space means (C, N, 2).
      conics: conics (C, N, 3).
      opacities: opacities (C, N), 0 for culled Gaussians.
      colors: colours or features (C, N, D).
      flat_ids: sorted intersections as (camera * N + Gaussian) (capacity,).
      tile_start: first slot per tile (C * n_tiles,).
      tile_count: stored slots per tile (C * n_tiles,).
      width: image width.
      height: image height.
      tile_size: tile side in pixels.
      tile_cap: if given, at most this many slots per tile are composited.
      lanes: tiles composited side by side (speed only: each tile's result is the same);
        None: `default_lanes` of the tile count.
      block: slots per tile and step (speed only: results equal up to float rounding).

    Returns:
      (colour sum_k c_k alpha_k T_k (C, H, W, D), T_final (C, H, W), truncated (C, H, W)
      bool: pixels still open when their tile's cap cut the list short).
    """
    lanes = default_lanes(tile_count.shape[0]) if lanes is None else lanes
    if lanes < 1 or block < 1:
        raise ValueError(f"lanes and block must be positive, got {lanes} and {block}")
    limit = tile_count if tile_cap is None else jnp.minimum(tile_count, tile_cap)
    n_cams = means2d.shape[0]
    trav = _Traversal(n_cams, int(width), int(height), int(tile_size), int(lanes), int(block))
    acc, tr, done = _composite_tiles(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit.astype(jnp.int32), trav
    )
    truncated = ~done & (tile_count > limit)[:, None]
    return (
        tiles_to_image(jnp.swapaxes(acc, 1, 2), n_cams, width, height, tile_size),
        tiles_to_image(tr, n_cams, width, height, tile_size),
        tiles_to_image(truncated, n_cams, width, height, tile_size),
    )
