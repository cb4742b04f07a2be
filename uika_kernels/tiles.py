"""What every compositing backend shares: the compositing constants, the tile grid and layout.

Leaf code in plain `jax.numpy` (no Pallas): the reference compositor
(`uika_jax.render.composite`), the projection's opacity radius rule, the
binning and the Pallas kernels all import these one definitions.

- ``alpha = min(MAX_ALPHA, o exp(-sigma))``; a Gaussian is skipped at a pixel
  where ``alpha < ALPHA_THRESHOLD`` (1/255) and the pixel stops, that Gaussian
  excluded, where ``T (1 - alpha) <= T_THRESHOLD`` (gsplat 1.5.3's values).
- Tiles are ``tile_size x tile_size`` pixels, row-major over the image;
  per-tile pixel arrays are (C * n_tiles, tile_size**2, ...), tiles of camera
  c first, the last tile column and row padded past the image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
T_THRESHOLD = 1e-4


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """Returns (tiles across, tiles down) covering a width x height image."""
    return -(-width // tile_size), -(-height // tile_size)


def tiles_to_image(x: jax.Array, n_cams: int, width: int, height: int, tile_size: int):
    """(C * n_tiles, P, ...) per-tile pixels to (C, H, W, ...) images."""
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    rest = x.shape[2:]
    x = x.reshape((n_cams, tiles_y, tiles_x, tile_size, tile_size, *rest))
    x = jnp.moveaxis(x, 3, 2).reshape((n_cams, tiles_y * tile_size, tiles_x * tile_size, *rest))
    return x[:, :height, :width]


def segment_sum_sorted(values: jax.Array, ids: jax.Array, num_segments: int) -> jax.Array:
    """Deterministic segment sum of rows (M, K) whose ids (M,) are sorted.

    A segmented associative scan (a fixed summation tree on every backend, no
    float atomics) followed by a scatter of each segment's last row (unique
    indices), so gradients are bitwise reproducible.
    """

    def combine(a, b):
        (va, ia), (vb, ib) = a, b
        return jnp.where((ia == ib)[..., None], va + vb, vb), ib

    sums, _ = jax.lax.associative_scan(combine, (values, ids))
    is_end = jnp.append(ids[1:] != ids[:-1], True)
    index = jnp.where(is_end, ids, num_segments)
    out = jnp.zeros((num_segments, values.shape[-1]), values.dtype)
    return out.at[index].set(sums, mode="drop")
