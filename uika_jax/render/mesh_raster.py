"""A z-buffer triangle rasterizer in JAX with perspective-correct barycentrics.

`rasterize_triangles` takes triangles already projected to image coordinates
(x = column, y = row; pixel (i, j) has its centre at (j + 0.5, i + 0.5), as in
`uika_jax.render.camera`) plus the camera depth of each corner, and returns per
pixel the nearest triangle, its perspective-correct barycentrics and the depth.

Algorithm (static shapes, jittable, vmappable; the work scales with the pixels
the triangles' bounding boxes cover, not with triangles x image):

* Each triangle's candidate pixels are those of its pixel bounding box (the
  pixels whose centres lie in the triangle's bounding box, clipped to the
  image). The boxes are laid out one after another, in triangle order, in a
  static array of `capacity` slots: a saturating running sum of the box sizes
  gives each triangle its first slot, and each slot finds its triangle by a
  running maximum over the marked first slots, then its pixel from its offset
  in the box (row-major). Pixels past `capacity` are not drawn: the triangles
  that lose some are counted in `Fragments.overflow`, never dropped silently.
  With `capacity=None` in an eager call the capacity is sized from the data
  (`needed_capacity`, rounded up to a few sizes an octave) so that nothing
  overflows.
* A batch (corners with a leading axis of B frames) is rasterized in one call,
  each frame with its own `capacity` slots and overflow count; its gathers and
  scatters index flattened arrays, which XLA runs faster on CPU than the
  batched ones `jax.vmap` makes (`jax.vmap` works too).
* Inside test with edge functions at the pixel centre, both windings accepted.
  A pixel centre exactly on an edge counts as inside, so both triangles sharing
  that edge claim it and the z-buffer picks one. Each edge function is evaluated
  with its two endpoints in a canonical (lexicographic) order, so the two
  triangles sharing an edge compute bitwise-opposite values there: a mesh
  without gaps rasterizes without cracks.
* Culled (never drawn, no slots, not counted as overflow): triangles with zero
  area, with a non-finite coordinate, with any corner depth <= `near` (there is
  no near plane clipping: a triangle crossing it disappears whole), or whose box
  holds no pixel centre of the image.
* Z-buffer: a scatter-min of the slots' interpolated depths per pixel, then a
  deterministic tie-break, a scatter-min of the triangle ids among the slots at
  the pixel's minimal depth (the smallest id wins exact ties).
* Barycentrics, depth and attributes are recomputed from the winning triangle's
  corners, so they are differentiable with respect to the corners and corner
  depths (visibility itself is piecewise constant and has no gradient).

Memory: about `SLOT_BYTES` bytes of temporaries per slot, plus a few arrays
per pixel.

Perspective-correct barycentrics: with w_k the edge function opposite corner k
at the pixel centre (w_k / sum_m w_m are its screen-space barycentrics) and z_k
the corner depths, b_k = (w_k / z_k) / sum_m (w_m / z_m) and the depth is
(sum_m w_m) / sum_m (w_m / z_m); b interpolates any attribute that is linear on
the 3D triangle.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from uika_jax.render.binning import saturating_cumsum
from uika_jax.render.capacity import round_capacity
from uika_jax.render.config import MAX_CAPACITY

DEFAULT_NEAR = 1e-4
"""Triangles with a corner depth at or below this are culled."""

SLOT_BYTES = 40
"""Temporary memory per capacity slot (bytes; XLA's memory analysis on CPU)."""

_NO_TRIANGLE = np.iinfo(np.int32).max
_EXACT_FLOAT_DIVISION = 1 << 22
"""Box offsets below this are split into (row, col) by a float32 division (faster, exact)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fragments:
    """The rasterizer's per-pixel output (H, W = image height and width).

    A batch of B frames puts a leading B axis on every field (overflow (B,)).

    Attributes:
      triangle_id: (H, W) int32, the visible triangle, -1 where empty.
      barycentrics: (H, W, 3) float32, perspective-correct barycentrics of the
        pixel centre w.r.t. the visible triangle's three corners; 0 where empty.
      depth: (H, W) float32, interpolated camera depth z; +inf where empty.
      mask: (H, W) bool, whether a triangle covers the pixel.
      overflow: int32 scalar, the number of non-culled triangles whose pixel
        bounding box did not fit in the capacity (their coverage was clipped).
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


def _edge_weights(x0, y0, x1, y1, x2, y2, px, py):
    """Inside test and edge functions of points in triangles (both windings accepted).

    Args:
      x0: (...) first corner's x, broadcastable against px (likewise below).
      y0: (...) first corner's y.
      x1: (...) second corner's x.
      y1: (...) second corner's y.
      x2: (...) third corner's x.
      y2: (...) third corner's y.
      px: (...) point x coordinates.
      py: (...) point y coordinates.

    Returns:
      (inside (...) bool, (w0, w1, w2) edge functions opposite each corner, their
      sum): w_k / sum are the point's screen barycentrics where the sum is not 0.
    """
    w0 = _edge(x1, y1, x2, y2, px, py)
    w1 = _edge(x2, y2, x0, y0, px, py)
    w2 = _edge(x0, y0, x1, y1, px, py)
    sign = jnp.sign((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))
    total = w0 + w1 + w2
    inside = (sign * w0 >= 0) & (sign * w1 >= 0) & (sign * w2 >= 0) & (total != 0)
    return inside, (w0, w1, w2), total


def _depth_terms(weights, inv_corner_depth):
    """Perspective terms w_k / z_k (3 arrays) and their sum, the depth's denominator.

    The pixel's depth is total / sum and its perspective-correct barycentrics are
    term_k / sum (the screen-space normalisation by `total` cancels).
    """
    terms = tuple(w * iz for w, iz in zip(weights, inv_corner_depth, strict=True))
    return terms, terms[0] + terms[1] + terms[2]


def _corner_arrays(corners):
    """(..., 3, 2) corners as the six arrays x0, y0, x1, y1, x2, y2."""
    return tuple(corners[..., k, axis] for k in range(3) for axis in range(2))


def _min3(a, b, c):
    return jnp.minimum(jnp.minimum(a, b), c)


def _max3(a, b, c):
    return jnp.maximum(jnp.maximum(a, b), c)


def _pixel_boxes(corners, corner_depth, height, width, near):
    """Per-triangle validity and clipped pixel bounding box (any leading batch axes).

    Returns:
      (valid (..., F) bool, row0, col0, rows, cols (..., F) int32): the box holds
      pixels row0..row0+rows-1 x col0..col0+cols-1; rows = cols = 0 where culled.
    """
    # Explicit elementwise ops over the 3 corners: XLA reduces tiny axes slowly on CPU.
    x0, y0, x1, y1, x2, y2 = _corner_arrays(corners)
    finite = functools.reduce(
        jnp.logical_and, [jnp.isfinite(a) for a in (x0, y0, x1, y1, x2, y2)]
    ) & functools.reduce(jnp.logical_and, [jnp.isfinite(corner_depth[..., k]) for k in range(3)])
    in_front = functools.reduce(jnp.logical_and, [corner_depth[..., k] > near for k in range(3)])
    area2 = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)

    def span(lo, hi, size):
        first = jnp.clip(jnp.ceil(lo - 0.5), 0, size)
        last = jnp.clip(jnp.floor(hi - 0.5), -1, size - 1)
        return first.astype(jnp.int32), (last - first + 1).astype(jnp.int32)

    row0, rows = span(_min3(y0, y1, y2), _max3(y0, y1, y2), height)
    col0, cols = span(_min3(x0, x1, x2), _max3(x0, x1, x2), width)
    valid = finite & (area2 != 0) & in_front & (rows > 0) & (cols > 0)
    return valid, row0, col0, jnp.where(valid, rows, 0), jnp.where(valid, cols, 0)


def _slot_layout(corners, corner_depth, height, width, near):
    """Per-triangle boxes and their slot ranges, per frame (B, F) arrays.

    Returns:
      (row0, col0, cols, counts, ends): the box of triangle f holds pixels
      row0..row0+rows-1 x col0..col0+cols-1 (counts = rows * cols, 0 where
      culled) and takes the frame's slots ends - counts .. ends - 1; `ends` is
      the saturating running total (int32, at most 2^31 - 1).
    """
    _, row0, col0, rows, cols = _pixel_boxes(corners, corner_depth, height, width, near)
    counts = rows * cols
    return row0, col0, cols, counts, jax.vmap(saturating_cumsum)(counts)


def needed_capacity(
    corners: jax.Array,
    corner_depth: jax.Array,
    height: int,
    width: int,
    *,
    near: float = DEFAULT_NEAR,
) -> int:
    """Returns the number of slots that rasterizes these triangles without overflow.

    The exact count: the pixels of the non-culled triangles' clipped bounding
    boxes, summed (for a batch, the largest frame's). Runs on the host: call it
    eagerly (e.g. on a few representative poses and cameras;
    `uika_jax.render.capacity.round_capacity` rounds a count up) and pass the
    result, with some margin, as `capacity` to jitted code.

    Args:
      corners: (F, 3, 2) or (B, F, 3, 2) image coordinates of the triangle corners.
      corner_depth: (F, 3) or (B, F, 3) camera depth of the corners.
      height: image height in pixels.
      width: image width in pixels.
      near: culling depth, as in `rasterize_triangles`.

    Returns:
      The slot count (saturating at 2^31 - 1).

    Raises:
      ValueError: if called on traced values (inside jit / vmap) or on arrays of
        the wrong shapes.
    """
    if isinstance(corners, jax.core.Tracer) or isinstance(corner_depth, jax.core.Tracer):
        raise ValueError(
            "capacity=None (or needed_capacity) needs concrete triangles to size the "
            "rasterizer from the data; under jit/vmap pass capacity= explicitly "
            "(e.g. from needed_capacity() on representative inputs, with some margin)."
        )
    corners, corner_depth = _as_batch(corners, corner_depth, "needed_capacity")
    if not corners.shape[1]:
        return 0
    return int(_most_slots(corners, corner_depth, int(height), int(width), float(near)))


@functools.partial(jax.jit, static_argnames=("height", "width", "near"))
def _most_slots(corners, corner_depth, height, width, near):
    return jnp.max(_slot_layout(corners, corner_depth, height, width, near)[-1][:, -1])


def _as_batch(corners, corner_depth, caller):
    """Checks the shapes; returns float32 (B, F, 3, 2) corners and (B, F, 3) depths."""
    corners = jnp.asarray(corners, jnp.float32)
    corner_depth = jnp.asarray(corner_depth, jnp.float32)
    if corners.ndim not in (3, 4) or corners.shape[-2:] != (3, 2):
        raise ValueError(
            f"{caller}: corners has shape {corners.shape}, expected (F, 3, 2) or (B, F, 3, 2)"
        )
    if corner_depth.shape != corners.shape[:-1]:
        raise ValueError(
            f"{caller}: corner_depth has shape {corner_depth.shape}, expected {corners.shape[:-1]}"
        )
    if corners.ndim == 3:
        return corners[None], corner_depth[None]
    return corners, corner_depth


def _compact(counts, *per_triangle):
    """Packs each frame's triangles that have slots to the front of its part of flat arrays.

    Args:
      counts: (B, F) slots per triangle.
      *per_triangle: (B, F) arrays.

    Returns:
      (rank (B, F): a triangle's row within its frame's part, the arrays as
      (B * F,) with frame b's part at b * F). The scatter also keeps XLA from
      recomputing per-triangle values for every slot that reads them.
    """
    batch, num_faces = counts.shape
    drawn = counts > 0
    rank = jnp.cumsum(drawn, axis=1, dtype=jnp.int32) - 1
    frame_row0 = num_faces * jnp.arange(batch, dtype=jnp.int32)[:, None]
    dest = jnp.where(drawn, frame_row0 + rank, batch * num_faces).ravel()
    return rank, [
        jnp.zeros((batch * num_faces,), a.dtype).at[dest].set(a.ravel(), mode="drop")
        for a in per_triangle
    ]


def _slot_owners(counts, ends, rank, capacity):
    """Each slot's owner (B, capacity), as a row of `_compact`'s frame part, and whether used."""
    batch = counts.shape[0]
    starts = ends - counts
    frame_slot0 = capacity * jnp.arange(batch, dtype=jnp.int32)[:, None]
    # Triangles with slots start at distinct slots, in rank order: a slot's owner is the
    # number of starts at or before it, minus one.
    marks = jnp.where((counts > 0) & (starts < capacity), frame_slot0 + starts, batch * capacity)
    firsts = jnp.zeros((batch * capacity,), jnp.int32).at[marks.ravel()].set(1, mode="drop")
    owner = jnp.cumsum(firsts.reshape(batch, capacity), axis=1, dtype=jnp.int32) - 1
    used = jnp.arange(capacity, dtype=jnp.int32) < ends[:, -1:]
    return owner, used


def _materialized(array, always):
    """The array, computed once before its consumers run.

    XLA on CPU fuses cheap producers into every consumer, recomputing them per
    consumer element (for a gather index: per gathered element); an identity
    behind a conditional cannot be fused. `always` is a traced predicate that
    is true (the other branch is never taken), so XLA cannot drop the conditional.
    """
    return jax.lax.cond(always, lambda a: a, jnp.zeros_like, array)


def _slot_pixels(local, row0, col0, cols, num_pixels):
    """The (row, col) of a slot from its offset `local` in its owner's box (row-major)."""
    cols = jnp.maximum(cols, 1)
    if num_pixels <= _EXACT_FLOAT_DIVISION:
        # Exact: the quotient's fractional part is at least 0.5 / cols from an
        # integer and the float32 error below 0.25 / cols (local < 2^22).
        box_row = jnp.floor((local.astype(jnp.float32) + 0.5) / cols.astype(jnp.float32)).astype(
            jnp.int32
        )
    else:
        box_row = local // cols
    return row0 + box_row, col0 + local - box_row * cols


@functools.partial(jax.jit, static_argnames=("height", "width", "capacity", "near"))
def _rasterize(corners, corner_depth, height, width, capacity, near):
    """Rasterizes a batch: corners (B, F, 3, 2), corner_depth (B, F, 3).

    Gathers and scatters index flattened arrays (frame b's triangles from b * F,
    its slots from b * capacity, its pixels from b * H * W), which XLA runs
    faster than batched ones.
    """
    batch, num_faces = corners.shape[:2]
    num_pixels = height * width
    vis_corners = jax.lax.stop_gradient(corners)
    vis_depth = jax.lax.stop_gradient(corner_depth)
    row0, col0, cols, counts, ends = _slot_layout(vis_corners, vis_depth, height, width, near)
    overflow = jnp.sum((counts > 0) & (ends > capacity), axis=1, dtype=jnp.int32)

    face = jnp.broadcast_to(jnp.arange(num_faces, dtype=jnp.int32), counts.shape)
    rank, packed = _compact(
        counts,
        ends - counts,
        row0,
        col0,
        cols,
        face,
        *_corner_arrays(vis_corners),
        *(1.0 / vis_depth[..., k] for k in range(3)),
    )
    owner, used = _slot_owners(counts, ends, rank, capacity)
    frame = jnp.arange(batch, dtype=jnp.int32)[:, None]
    flat_owner = _materialized(owner + num_faces * frame, jnp.all(ends >= 0))
    slot_start, slot_row0, slot_col0, slot_cols, slot_face, *slot_tri = (
        a[flat_owner] for a in packed
    )
    local = jnp.arange(capacity, dtype=jnp.int32) - slot_start
    row, col = _slot_pixels(local, slot_row0, slot_col0, slot_cols, num_pixels)
    inside, weights, total = _edge_weights(
        *slot_tri[:6], col.astype(jnp.float32) + 0.5, row.astype(jnp.float32) + 0.5
    )
    _, denominator = _depth_terms(weights, slot_tri[6:])
    # In front of the camera: the inverse depth, denominator / total, is positive. The
    # division comes last, so that XLA computes z once rather than in every consumer.
    hit = used & inside & (denominator * jnp.sign(total) > 0)
    z = (jnp.where(hit, jnp.abs(total), 1.0) / jnp.where(hit, jnp.abs(denominator), 0.0)).ravel()
    # Non-hits read +inf, as do hits whose depth overflows (not drawn, as if empty).
    dump = batch * num_pixels
    pix = jnp.where(z < jnp.inf, (num_pixels * frame + row * width + col).ravel(), dump)
    zbuf = jnp.full((dump + 1,), jnp.inf, jnp.float32).at[pix].min(z)
    tie = jnp.where((z < jnp.inf) & (z == zbuf[pix]), slot_face.ravel(), _NO_TRIANGLE)
    ibuf = jnp.full((dump + 1,), _NO_TRIANGLE, jnp.int32).at[pix].min(tie)

    mask = (zbuf[:dump] < jnp.inf).reshape(batch, height, width)
    triangle_id = jnp.where(mask, ibuf[:dump].reshape(batch, height, width), -1)

    # Empty pixels see a dummy degenerate triangle at depth 1, keeping gradients finite.
    flat_tid = jnp.maximum(triangle_id, 0) + num_faces * frame[:, :, None]
    win_corners = corners.reshape(batch * num_faces, 3, 2)[flat_tid]
    win_depth = corner_depth.reshape(batch * num_faces, 3)[flat_tid]
    win_corners = jnp.where(mask[..., None, None], win_corners, 0.0)
    win_depth = jnp.where(mask[..., None], win_depth, 1.0)
    px = jnp.arange(width, dtype=jnp.float32)[None, :] + 0.5
    py = jnp.arange(height, dtype=jnp.float32)[:, None] + 0.5
    _, weights, total = _edge_weights(*_corner_arrays(win_corners), px, py)
    terms, denominator = _depth_terms(weights, tuple(1.0 / win_depth[..., k] for k in range(3)))
    denominator = jnp.where(mask, denominator, 1.0)
    bary = jnp.where(mask[..., None], jnp.stack(terms, axis=-1) / denominator[..., None], 0.0)
    depth = jnp.where(mask, total / denominator, jnp.inf)
    return Fragments(triangle_id, bary, depth, mask, overflow)


def rasterize_triangles(
    corners: jax.Array,
    corner_depth: jax.Array,
    height: int,
    width: int,
    *,
    capacity: int | None = None,
    near: float = DEFAULT_NEAR,
) -> Fragments:
    """Rasterizes triangles with a z-buffer (see the module docstring).

    Args:
      corners: (F, 3, 2) image coordinates (x = column, y = row) of the corners,
        or (B, F, 3, 2) for a batch of B frames.
      corner_depth: (F, 3) or (B, F, 3) camera depth z > 0 of the corners (use 1
        for flat 2D).
      height: image height H in pixels.
      width: image width W in pixels.
      capacity: candidate (triangle, pixel) slots per frame: the pixels of the
        triangles' bounding boxes, in triangle order; triangles past it are
        clipped and counted in `overflow`. None sizes it from the data (eager
        calls only; `needed_capacity` rounded up by `round_capacity`). Memory:
        about `SLOT_BYTES` bytes a slot.
      near: triangles with any corner depth <= near are culled.

    Returns:
      The `Fragments` of the image (with a leading B axis for a batch).

    Raises:
      ValueError: if capacity is None under jit / vmap, if it is not in
        [1, 2^31 - 2], if the batch's slots, pixels or faces exceed int32
        indices, or if the corner arrays have the wrong shapes.
    """
    single = jnp.ndim(corners) == 3
    corners, corner_depth = _as_batch(corners, corner_depth, "rasterize_triangles")
    if capacity is None:
        capacity = round_capacity(needed_capacity(corners, corner_depth, height, width, near=near))
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(
            f"rasterize_triangles: capacity must be in [1, {MAX_CAPACITY}], got {capacity}"
        )
    batch, num_faces = corners.shape[:2]
    if batch * max(capacity, height * width + 1, num_faces) > MAX_CAPACITY:
        raise ValueError(
            f"rasterize_triangles: {batch} frames x {capacity} slots (or x {height} x {width} "
            f"pixels, or x {num_faces} faces) exceed the {MAX_CAPACITY} that int32 indices "
            "address: rasterize fewer frames per call"
        )
    if num_faces == 0:
        fragments = Fragments(
            jnp.full((batch, height, width), -1, jnp.int32),
            jnp.zeros((batch, height, width, 3), jnp.float32),
            jnp.full((batch, height, width), jnp.inf, jnp.float32),
            jnp.zeros((batch, height, width), bool),
            jnp.zeros((batch,), jnp.int32),
        )
    else:
        fragments = _rasterize(
            corners, corner_depth, int(height), int(width), int(capacity), float(near)
        )
    return jax.tree.map(lambda a: a[0], fragments) if single else fragments


def interpolate(fragments: Fragments, attributes: jax.Array) -> jax.Array:
    """Interpolates per-corner attributes with the perspective-correct barycentrics.

    Args:
      fragments: the rasterizer output for an (H, W) image.
      attributes: (F, 3, C) attribute of each triangle corner.

    Returns:
      (H, W, C) interpolated attributes, 0 where no triangle covers the pixel.
    """
    tid = jnp.maximum(fragments.triangle_id, 0)
    corner_values = attributes[tid]
    values = sum(fragments.barycentrics[..., k, None] * corner_values[..., k, :] for k in range(3))
    return jnp.where(fragments.mask[..., None], values, 0.0)
