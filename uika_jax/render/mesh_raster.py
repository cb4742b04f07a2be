"""A z-buffer triangle rasterizer in JAX with perspective-correct barycentrics.

`rasterize_triangles` takes triangles already projected to image coordinates
(x = column, y = row; pixel (i, j) has its centre at (j + 0.5, i + 0.5), as in
`uika_jax.render.camera`) plus the camera depth of each corner, and returns per
pixel the nearest triangle, its perspective-correct barycentrics and the depth.

Algorithm (static shapes, jittable, vmappable):

* Each triangle gets a fixed `max_extent` x `max_extent` window of candidate
  pixels anchored at the minimum corner of its pixel bounding box (the pixels
  whose centres lie in the triangle's bounding box, clipped to the image). A
  triangle whose box is larger than the window in either direction loses the
  pixels outside the window; it is counted in `Fragments.overflow`, never
  dropped silently. With `max_extent=None` in an eager call the window is sized
  from the data so that nothing overflows.
* Inside test with edge functions at the pixel centre, both windings accepted.
  A pixel centre exactly on an edge counts as inside, so both triangles sharing
  that edge claim it and the z-buffer picks one. Each edge function is evaluated
  with its two endpoints in a canonical (lexicographic) order, so the two
  triangles sharing an edge compute bitwise-opposite values there: a mesh
  without gaps rasterizes without cracks.
* Culled (never drawn, not counted as overflow): triangles with zero area, with
  a non-finite coordinate, with any corner depth <= `near` (there is no near
  plane clipping: a triangle crossing it disappears whole), or whose box misses
  the image.
* Z-buffer resolve by `jax.ops.segment_min` over the interpolated depth, then a
  deterministic tie-break: the smallest triangle id among the candidates at the
  minimal depth. Triangles are processed in chunks (`lax.scan`) of at most
  `chunk_candidates` candidate pixels (triangles x window pixels; default
  `CANDIDATES_PER_CHUNK`, about 60 MB of temporaries), so memory stays bounded
  whatever the number of triangles and the window.
* Barycentrics, depth and attributes are recomputed from the winning triangle's
  corners, so they are differentiable with respect to the corners and corner
  depths (visibility itself is piecewise constant and has no gradient).

Perspective-correct barycentrics: with screen-space barycentrics l_k of the
pixel centre, b_k = (l_k / z_k) / sum_m (l_m / z_m) and the depth is
1 / sum_m (l_m / z_m); b interpolates any attribute that is linear on the 3D
triangle.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

CANDIDATES_PER_CHUNK = 1 << 21
"""Upper bound on the candidate pixels (triangles x window) processed at once."""

DEFAULT_NEAR = 1e-4
"""Triangles with a corner depth at or below this are culled."""

EXTENT_QUANTUM = 8
"""max_extent=None rounds the needed window up to a multiple of this."""

_NO_TRIANGLE = np.iinfo(np.int32).max


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fragments:
    """The rasterizer's per-pixel output (H, W = image height and width).

    Attributes:
      triangle_id: (H, W) int32, the visible triangle, -1 where empty.
      barycentrics: (H, W, 3) float32, perspective-correct barycentrics of the
        pixel centre w.r.t. the visible triangle's three corners; 0 where empty.
      depth: (H, W) float32, interpolated camera depth z; +inf where empty.
      mask: (H, W) bool, whether a triangle covers the pixel.
      overflow: int32 scalar, the number of non-culled triangles whose pixel
        bounding box exceeded the window (their coverage was clipped).
    """

    triangle_id: jax.Array
    barycentrics: jax.Array
    depth: jax.Array
    mask: jax.Array
    overflow: jax.Array


def _edge(ax, ay, bx, by, px, py):
    """Edge function of (a -> b) at p, evaluated with a and b in canonical order."""
    swap = (ax > bx) | ((ax == bx) & (ay > by))
    lx, ly = jnp.where(swap, bx, ax), jnp.where(swap, by, ay)
    hx, hy = jnp.where(swap, ax, bx), jnp.where(swap, ay, by)
    e = (hx - lx) * (py - ly) - (hy - ly) * (px - lx)
    return jnp.where(swap, -e, e)


def _coverage(corners, corner_depth, px, py):
    """Inside test, screen barycentrics and inverse depth of points in triangles.

    Args:
      corners: (..., 3, 2) triangle corners, broadcastable against px.
      corner_depth: (..., 3) corner depths (positive).
      px: (...) point x coordinates.
      py: (...) point y coordinates.

    Returns:
      (inside (...) bool, screen barycentrics (..., 3), inverse depth (...)); the
      barycentrics are finite everywhere, meaningful where inside.
    """
    x0, y0 = corners[..., 0, 0], corners[..., 0, 1]
    x1, y1 = corners[..., 1, 0], corners[..., 1, 1]
    x2, y2 = corners[..., 2, 0], corners[..., 2, 1]
    w0 = _edge(x1, y1, x2, y2, px, py)
    w1 = _edge(x2, y2, x0, y0, px, py)
    w2 = _edge(x0, y0, x1, y1, px, py)
    sign = jnp.sign((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))
    total = w0 + w1 + w2
    inside = (sign * w0 >= 0) & (sign * w1 >= 0) & (sign * w2 >= 0) & (total != 0)
    safe_total = jnp.where(total != 0, total, 1.0)
    screen = jnp.stack([w0, w1, w2], axis=-1) / safe_total[..., None]
    inv_z = 1.0 / corner_depth
    inv_depth = (
        inv_z[..., 0]
        + screen[..., 1] * (inv_z[..., 1] - inv_z[..., 0])
        + screen[..., 2] * (inv_z[..., 2] - inv_z[..., 0])
    )
    return inside, screen, inv_depth


def _pixel_boxes(corners, corner_depth, height, width, near):
    """Per-triangle validity and clipped pixel bounding box.

    Returns:
      (valid (F,) bool, row0 (F,) int32, col0 (F,) int32, rows (F,) int32,
      cols (F,) int32): the box holds pixels row0..row0+rows-1 x col0..col0+cols-1.
    """
    x, y = corners[..., 0], corners[..., 1]
    finite = jnp.all(jnp.isfinite(corners), axis=(1, 2)) & jnp.all(
        jnp.isfinite(corner_depth), axis=1
    )
    area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (x[:, 2] - x[:, 0])

    def span(lo, hi, size):
        first = jnp.clip(jnp.ceil(lo - 0.5), 0, size)
        last = jnp.clip(jnp.floor(hi - 0.5), -1, size - 1)
        return first.astype(jnp.int32), (last - first + 1).astype(jnp.int32)

    row0, rows = span(y.min(1), y.max(1), height)
    col0, cols = span(x.min(1), x.max(1), width)
    valid = finite & (area2 != 0) & jnp.all(corner_depth > near, axis=1) & (rows > 0) & (cols > 0)
    return valid, row0, col0, jnp.where(valid, rows, 0), jnp.where(valid, cols, 0)


def needed_extent(
    corners: jax.Array,
    corner_depth: jax.Array,
    height: int,
    width: int,
    *,
    near: float = DEFAULT_NEAR,
    multiple_of: int = 1,
) -> int:
    """Returns the window side that rasterizes these triangles without overflow.

    Runs on the host: call it eagerly (e.g. once on a representative pose) and
    pass the result, with some margin, as `max_extent` to jitted code.

    Args:
      corners: (F, 3, 2) image coordinates of the triangle corners.
      corner_depth: (F, 3) camera depth of the corners.
      height: image height in pixels.
      width: image width in pixels.
      near: culling depth, as in `rasterize_triangles`.
      multiple_of: round the result up to a multiple of this (fewer distinct
        window sizes mean fewer recompilations).

    Returns:
      The largest clipped pixel-box side over non-culled triangles, at least 1,
      rounded up to `multiple_of`.

    Raises:
      ValueError: if called on traced values (inside jit / vmap).
    """
    if isinstance(corners, jax.core.Tracer) or isinstance(corner_depth, jax.core.Tracer):
        raise ValueError(
            "max_extent=None (or needed_extent) needs concrete triangles to size the "
            "rasterizer window from the data; under jit/vmap pass max_extent= explicitly "
            "(e.g. from needed_extent() on a representative input, with some margin)."
        )
    side = 1
    if np.shape(corners)[0]:
        corners = jnp.asarray(corners, jnp.float32)
        corner_depth = jnp.asarray(corner_depth, jnp.float32)
        side = max(side, int(_max_box_side(corners, corner_depth, int(height), int(width), near)))
    return -(-side // multiple_of) * multiple_of


@functools.partial(jax.jit, static_argnames=("height", "width", "near"))
def _max_box_side(corners, corner_depth, height, width, near):
    _, _, _, rows, cols = _pixel_boxes(corners, corner_depth, height, width, near)
    return jnp.maximum(rows.max(), cols.max())


@functools.partial(
    jax.jit, static_argnames=("height", "width", "max_extent", "near", "chunk_candidates")
)
def _rasterize(corners, corner_depth, height, width, max_extent, near, chunk_candidates):
    num_faces = corners.shape[0]
    num_pixels = height * width
    ext = max_extent
    vis_corners = jax.lax.stop_gradient(corners)
    vis_depth = jax.lax.stop_gradient(corner_depth)
    valid, row0, col0, rows, cols = _pixel_boxes(vis_corners, vis_depth, height, width, near)
    overflow = jnp.sum(valid & ((rows > ext) | (cols > ext)), dtype=jnp.int32)

    chunk = max(1, min(num_faces, chunk_candidates // (ext * ext)))
    num_chunks = -(-num_faces // chunk)
    pad = num_chunks * chunk - num_faces

    def chunked(a, fill):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape((num_chunks, chunk, *a.shape[1:]))

    xs = (
        chunked(vis_corners, 0.0),
        chunked(vis_depth, 1.0),
        chunked(valid, False),
        chunked(row0, 0),
        chunked(col0, 0),
        chunked(rows, 0),
        chunked(cols, 0),
        jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk),
    )
    dy, dx = (a.ravel() for a in jnp.meshgrid(jnp.arange(ext), jnp.arange(ext), indexing="ij"))

    def step(carry, x):
        zbuf, ibuf = carry
        c, d, v, r0, c0, nr, nc, ids = x
        pr = r0[:, None] + dy[None, :]
        pc = c0[:, None] + dx[None, :]
        in_box = v[:, None] & (dy[None, :] < nr[:, None]) & (dx[None, :] < nc[:, None])
        inside, _, inv_depth = _coverage(
            c[:, None], d[:, None], pc.astype(jnp.float32) + 0.5, pr.astype(jnp.float32) + 0.5
        )
        hit = in_box & inside & (inv_depth > 0)
        z = jnp.where(hit, 1.0 / jnp.where(hit, inv_depth, 1.0), jnp.inf).ravel()
        pix = jnp.where(hit, pr * width + pc, num_pixels).ravel()
        chunk_z = jax.ops.segment_min(z, pix, num_segments=num_pixels + 1)
        tie = jnp.where(
            hit.ravel() & (z == chunk_z[pix]),
            jnp.broadcast_to(ids[:, None], hit.shape).ravel(),
            _NO_TRIANGLE,
        )
        chunk_id = jax.ops.segment_min(tie, pix, num_segments=num_pixels + 1)
        take = chunk_z < zbuf
        return (jnp.where(take, chunk_z, zbuf), jnp.where(take, chunk_id, ibuf)), None

    init = (
        jnp.full((num_pixels + 1,), jnp.inf, jnp.float32),
        jnp.full((num_pixels + 1,), -1, jnp.int32),
    )
    (zbuf, ibuf), _ = jax.lax.scan(step, init, xs)
    mask = (zbuf[:num_pixels] < jnp.inf).reshape(height, width)
    triangle_id = jnp.where(mask, ibuf[:num_pixels].reshape(height, width), -1)

    # Empty pixels see a dummy degenerate triangle at depth 1, keeping gradients finite.
    tid = jnp.maximum(triangle_id, 0)
    win_corners = jnp.where(mask[..., None, None], corners[tid], 0.0)
    win_depth = jnp.where(mask[..., None], corner_depth[tid], 1.0)
    px = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
    py = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
    _, screen, inv_depth = _coverage(win_corners, win_depth, px, py)
    inv_depth = jnp.where(mask, inv_depth, 1.0)
    inv_z = 1.0 / win_depth
    bary = jnp.where(mask[..., None], screen * inv_z / inv_depth[..., None], 0.0)
    depth = jnp.where(mask, 1.0 / inv_depth, jnp.inf)
    return Fragments(triangle_id, bary, depth, mask, overflow)


def rasterize_triangles(
    corners: jax.Array,
    corner_depth: jax.Array,
    height: int,
    width: int,
    *,
    max_extent: int | None = None,
    near: float = DEFAULT_NEAR,
    chunk_candidates: int = CANDIDATES_PER_CHUNK,
) -> Fragments:
    """Rasterizes triangles with a z-buffer (see the module docstring).

    Args:
      corners: (F, 3, 2) image coordinates (x = column, y = row) of the corners.
      corner_depth: (F, 3) camera depth z > 0 of the corners (use 1 for flat 2D).
      height: image height H in pixels.
      width: image width W in pixels.
      max_extent: side of each triangle's candidate-pixel window; triangles with a
        larger clipped pixel box are clipped and counted in `overflow`. None sizes
        it from the data (eager calls only).
      near: triangles with any corner depth <= near are culled.
      chunk_candidates: at most this many candidate pixels (triangles x
        max_extent^2) are processed at once; bounds memory (about 30 bytes each).

    Returns:
      The `Fragments` of the image.

    Raises:
      ValueError: if max_extent is None under jit / vmap, or if it is not positive.
    """
    corners = jnp.asarray(corners, jnp.float32)
    corner_depth = jnp.asarray(corner_depth, jnp.float32)
    if corners.ndim != 3 or corners.shape[1:] != (3, 2):
        raise ValueError(
            f"rasterize_triangles: corners has shape {corners.shape}, expected (F, 3, 2)"
        )
    if corner_depth.shape != corners.shape[:2]:
        raise ValueError(
            f"rasterize_triangles: corner_depth has shape {corner_depth.shape}, "
            f"expected {corners.shape[:2]}"
        )
    if max_extent is None:
        max_extent = needed_extent(
            corners, corner_depth, height, width, near=near, multiple_of=EXTENT_QUANTUM
        )
    if max_extent < 1:
        raise ValueError(f"rasterize_triangles: max_extent must be positive, got {max_extent}")
    max_extent = min(int(max_extent), max(int(height), int(width)))
    if corners.shape[0] == 0:
        return Fragments(
            jnp.full((height, width), -1, jnp.int32),
            jnp.zeros((height, width, 3), jnp.float32),
            jnp.full((height, width), jnp.inf, jnp.float32),
            jnp.zeros((height, width), bool),
            jnp.zeros((), jnp.int32),
        )
    return _rasterize(
        corners,
        corner_depth,
        int(height),
        int(width),
        max_extent,
        float(near),
        int(chunk_candidates),
    )


def interpolate(fragments: Fragments, attributes: jax.Array) -> jax.Array:
    """Interpolates per-corner attributes with the perspective-correct barycentrics.

    Args:
      fragments: the rasterizer output for an (H, W) image.
      attributes: (F, 3, C) attribute of each triangle corner.

    Returns:
      (H, W, C) interpolated attributes, 0 where no triangle covers the pixel.
    """
    tid = jnp.maximum(fragments.triangle_id, 0)
    values = jnp.einsum("hwk,hwkc->hwc", fragments.barycentrics, attributes[tid])
    return jnp.where(fragments.mask[..., None], values, 0.0)
