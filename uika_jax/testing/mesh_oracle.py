"""A plain numpy z-buffer triangle rasterizer: the oracle of the mesh rasterizer's parity tests.

Test and benchmark use only (numpy, float64). It follows the conventions of
`uika_jax.render.mesh_raster` (pixel (i, j) has its centre at (j + 0.5, i + 0.5);
a centre on an edge counts as inside, either winding; triangles with zero
area, a non-finite value or a corner depth <= near are culled; the nearest
triangle wins, exact depth ties go to the smallest id) but computes them its
own way, the way a numpy user would:

- each triangle's pixel bounding box is padded to a window whose sides are
  powers of two, and triangles with the same window are evaluated together as
  dense (triangles, rows, columns) arrays (every edge function evaluated with
  its endpoints in lexicographic order, so that neighbours agree on shared
  edges);
- the covered (pixel, depth, triangle) candidates are resolved by one
  `np.lexsort`, keeping the first per pixel.

Depth is total / sum_k (w_k / z_k) and the perspective-correct barycentrics
(w_k / z_k) / sum_m (w_m / z_m), with w_k the edge function opposite corner k
and total = w_0 + w_1 + w_2.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class OracleFragments(NamedTuple):
    """Per-pixel result (H, W = image height and width), as `mesh_raster.Fragments`.

    Attributes:
      triangle_id: (H, W) int64, the visible triangle, -1 where empty.
      barycentrics: (H, W, 3) float64, perspective-correct; 0 where empty.
      depth: (H, W) float64 camera depth; +inf where empty.
      mask: (H, W) bool, whether a triangle covers the pixel.
    """

    triangle_id: np.ndarray
    barycentrics: np.ndarray
    depth: np.ndarray
    mask: np.ndarray


def _edge(a: np.ndarray, b: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Edge function of (a -> b) at p; a, b (n, 1, 1, 2); evaluated in lexicographic order."""
    swap = (a[..., 0] > b[..., 0]) | ((a[..., 0] == b[..., 0]) & (a[..., 1] > b[..., 1]))
    low = np.where(swap[..., None], b, a)
    high = np.where(swap[..., None], a, b)
    value = (high[..., 0] - low[..., 0]) * (py - low[..., 1]) - (high[..., 1] - low[..., 1]) * (
        px - low[..., 0]
    )
    return np.where(swap, -value, value)


def _window_side(span: np.ndarray) -> np.ndarray:
    """The smallest power of two >= span (span >= 1)."""
    return 1 << np.ceil(np.log2(span)).astype(np.int64)


def rasterize(
    corners: np.ndarray,
    corner_depth: np.ndarray,
    height: int,
    width: int,
    *,
    near: float = 1e-4,
) -> OracleFragments:
    """Rasterizes triangles with a z-buffer (see the module docstring).

    Args:
      corners: (F, 3, 2) image coordinates (x = column, y = row) of the corners.
      corner_depth: (F, 3) camera depth of the corners.
      height: image height H.
      width: image width W.
      near: triangles with a corner depth <= near are culled.

    Returns:
      The `OracleFragments`.
    """
    corners = np.asarray(corners, np.float64)
    corner_depth = np.asarray(corner_depth, np.float64)
    x, y = corners[..., 0], corners[..., 1]
    with np.errstate(invalid="ignore"):
        area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (y[:, 1] - y[:, 0]) * (
            x[:, 2] - x[:, 0]
        )
        kept = (
            np.isfinite(corners).all(axis=(1, 2))
            & np.isfinite(corner_depth).all(axis=1)
            & (area2 != 0)
            & (corner_depth > near).all(axis=1)
        )
    ids = np.flatnonzero(kept)
    row0 = np.clip(np.ceil(y[ids].min(1) - 0.5), 0, height).astype(np.int64)
    row1 = np.clip(np.floor(y[ids].max(1) - 0.5), -1, height - 1).astype(np.int64)
    col0 = np.clip(np.ceil(x[ids].min(1) - 0.5), 0, width).astype(np.int64)
    col1 = np.clip(np.floor(x[ids].max(1) - 0.5), -1, width - 1).astype(np.int64)
    boxed = (row1 >= row0) & (col1 >= col0)
    ids, row0, row1, col0, col1 = (a[boxed] for a in (ids, row0, row1, col0, col1))
    win_rows = _window_side(row1 - row0 + 1)
    win_cols = _window_side(col1 - col0 + 1)

    candidates = []
    for rows, cols in sorted(set(zip(win_rows.tolist(), win_cols.tolist(), strict=True))):
        group = (win_rows == rows) & (win_cols == cols)
        candidates.append(
            _window_candidates(
                corners[ids[group]],
                corner_depth[ids[group]],
                ids[group],
                row0[group],
                col0[group],
                row1[group],
                col1[group],
                rows,
                cols,
                width,
            )
        )
    return _resolve(candidates, height, width)


def _window_candidates(tri, tri_depth, tri_id, row0, col0, row1, col1, rows, cols, width):
    """Covered (pixel, depth, triangle, barycentrics) of triangles sharing one window size."""
    py = (row0[:, None, None] + np.arange(rows)[None, :, None]) + 0.5
    px = (col0[:, None, None] + np.arange(cols)[None, None, :]) + 0.5
    in_box = (py < row1[:, None, None] + 1) & (px < col1[:, None, None] + 1)
    a, b, c = (tri[:, None, None, k] for k in range(3))
    weights = np.stack([_edge(b, c, px, py), _edge(c, a, px, py), _edge(a, b, px, py)], -1)
    total = weights.sum(-1)
    inside = ((weights >= 0).all(-1) | (weights <= 0).all(-1)) & (total != 0)
    terms = weights / tri_depth[:, None, None, :]
    denominator = terms.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = total / denominator
    keep = in_box & inside & (depth > 0) & np.isfinite(depth)
    n, r, q = np.nonzero(keep)
    pixel = (py[n, r, 0].astype(np.int64)) * width + px[n, 0, q].astype(np.int64)
    bary = terms[n, r, q] / denominator[n, r, q][:, None]
    return pixel, depth[n, r, q], tri_id[n], bary


def _resolve(candidates, height, width) -> OracleFragments:
    """Keeps the nearest candidate per pixel (smallest triangle id on exact ties)."""
    triangle_id = np.full(height * width, -1, np.int64)
    depth = np.full(height * width, np.inf)
    bary = np.zeros((height * width, 3))
    if candidates:
        pixel, cand_depth, cand_id, cand_bary = (
            np.concatenate(a) for a in zip(*candidates, strict=True)
        )
        order = np.lexsort((cand_id, cand_depth, pixel))
        first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]] if order.size else order
        triangle_id[pixel[first]] = cand_id[first]
        depth[pixel[first]] = cand_depth[first]
        bary[pixel[first]] = cand_bary[first]
    return OracleFragments(
        triangle_id.reshape(height, width),
        bary.reshape(height, width, 3),
        depth.reshape(height, width),
        (triangle_id >= 0).reshape(height, width),
    )
