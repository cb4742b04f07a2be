"""Stage 3-4 of the reference rasterizer: tile compositing and its custom VJP.

Forward (gsplat's CUDA forward, vectorised over every tile of every camera):
each tile walks its sorted intersections front to back, one slot per step, for
all of its tile_size x tile_size pixels at once. Per pixel:
``alpha = min(0.999, o exp(-sigma))``, skipped when ``alpha < 1/255`` or
``sigma < 0``; the pixel stops (that Gaussian excluded) when
``T (1 - alpha) <= 1e-4``. The loop ends when every pixel is done or every
tile is exhausted (early termination), or at the per-tile cap.

Residuals are O(pixels): the final transmittance and, per pixel, the number of
slots it consumed (`last`). The backward pass re-traverses each tile back to
front from there, recovering T by division exactly as gsplat's backward does,
writes one gradient row per intersection slot, and reduces the rows to
Gaussians with a sort by Gaussian and a segmented scan (`segment_sum_sorted`:
a fixed summation order on every backend, no float atomics). Nothing of size
[tiles, pixels, K] is ever materialised.

`composite()` returns (accumulated colour, T_final, truncated pixels); the
background term ``T_final * bg`` and ``alpha = 1 - T_final`` are added by the
caller in plain jnp. Other backends (Pallas kernels) implement the same
signature and outputs and register with `rasterization.register_backend`.
"""

from __future__ import annotations

import functools

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


def _pixel_centres(n_cams: int, width: int, height: int, tile_size: int, dtype):
    """Pixel centres (T, P) of every tile of every camera, and which lie inside the image."""
    tiles_x, tiles_y = tile_grid(width, height, tile_size)
    p = jnp.arange(tile_size * tile_size)
    t = jnp.arange(n_cams * tiles_x * tiles_y) % (tiles_x * tiles_y)
    col = (t % tiles_x)[:, None] * tile_size + (p % tile_size)[None, :]
    row = (t // tiles_x)[:, None] * tile_size + (p // tile_size)[None, :]
    inside = (col < width) & (row < height)
    return col.astype(dtype) + 0.5, row.astype(dtype) + 0.5, inside


def _flatten_gaussians(means2d, conics, opacities, colors):
    """Per-Gaussian attributes with the camera axis folded in, as `_gather` indexes them."""
    return (
        means2d.reshape(-1, 2),
        conics.reshape(-1, 3),
        opacities.reshape(-1),
        colors.reshape(-1, colors.shape[-1]),
    )


def _gather(flat, flat_ids, slot):
    """Per-tile Gaussian attributes of the given slots (clamped into range)."""
    g = flat_ids[jnp.clip(slot, 0, flat_ids.shape[0] - 1)]
    return tuple(a[g] for a in flat)


def _alpha(mean, conic, opac, px, py):
    """sigma, exp(-sigma), alpha (T, P) for one Gaussian per tile."""
    dx = mean[:, 0:1] - px
    dy = mean[:, 1:2] - py
    sigma = 0.5 * (conic[:, 0:1] * dx * dx + conic[:, 2:3] * dy * dy) + conic[:, 1:2] * dx * dy
    vis = jnp.exp(-sigma)
    return dx, dy, sigma, vis, jnp.minimum(MAX_ALPHA, opac[:, None] * vis)


def _forward(means2d, conics, opacities, colors, flat_ids, tile_start, limit, dims):
    n_cams, width, height, tile_size = dims
    dtype = colors.dtype
    d = colors.shape[-1]
    flat = _flatten_gaussians(means2d, conics, opacities, colors)
    px, py, inside = _pixel_centres(n_cams, width, height, tile_size, dtype)
    n_t, n_p = px.shape
    kmax = jnp.max(limit, initial=0)

    def cond(s):
        k, _, _, _, done = s
        return (k < kmax) & jnp.any(~done & (k < limit)[:, None])

    def body(s):
        k, tr, acc, last, done = s
        active = (k < limit)[:, None] & ~done
        mean, conic, opac, col = _gather(flat, flat_ids, tile_start + k)
        _, _, sigma, _, alpha = _alpha(mean, conic, opac, px, py)
        use = active & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        next_t = tr * (1.0 - alpha)
        stop = use & (next_t <= T_THRESHOLD)
        use &= ~stop
        acc = acc + jnp.where(use[..., None], col[:, None, :] * (alpha * tr)[..., None], 0.0)
        tr = jnp.where(use, next_t, tr)
        done = done | stop
        last = jnp.where(active & ~stop, k + 1, last)
        return k + 1, tr, acc, last, done

    init = (
        jnp.int32(0),
        jnp.ones((n_t, n_p), dtype),
        jnp.zeros((n_t, n_p, d), dtype),
        jnp.zeros((n_t, n_p), jnp.int32),
        ~inside,
    )
    _, tr, acc, last, done = jax.lax.while_loop(cond, body, init)
    return tr, acc, last, done


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _composite_tiles(means2d, conics, opacities, colors, flat_ids, tile_start, limit, dims):
    tr, acc, last, done = _forward(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit, dims
    )
    return acc, tr, last, done


def _composite_fwd(means2d, conics, opacities, colors, flat_ids, tile_start, limit, dims):
    tr, acc, last, done = _forward(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit, dims
    )
    res = (means2d, conics, opacities, colors, flat_ids, tile_start, limit, tr, last)
    return (acc, tr, last, done), res


def _composite_bwd(dims, res, cts):
    n_cams, width, height, tile_size = dims
    means2d, conics, opacities, colors, flat_ids, tile_start, limit, t_final, last = res
    v_acc, v_t = cts[0], cts[1]
    dtype = colors.dtype
    d = colors.shape[-1]
    flat = _flatten_gaussians(means2d, conics, opacities, colors)
    px, py, _ = _pixel_centres(n_cams, width, height, tile_size, dtype)
    n_slots = flat_ids.shape[0]
    width_g = 6 + d

    def body(s):
        k, tr, buf, grads = s
        mean, conic, opac, col = _gather(flat, flat_ids, tile_start + k)
        dx, dy, sigma, vis, alpha = _alpha(mean, conic, opac, px, py)
        valid = (k < last) & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        ra = 1.0 / (1.0 - jnp.where(valid, alpha, 0.0))
        tr = jnp.where(valid, tr * ra, tr)
        fac = jnp.where(valid, alpha * tr, 0.0)
        v_col = jnp.sum(fac[..., None] * v_acc, axis=1)
        v_alpha = jnp.sum((col[:, None, :] * tr[..., None] - buf * ra[..., None]) * v_acc, -1)
        v_alpha = v_alpha - t_final * ra * v_t
        unclamped = valid & (opac[:, None] * vis <= MAX_ALPHA)
        v_sigma = jnp.where(unclamped, -opac[:, None] * vis * v_alpha, 0.0)
        v_conic = jnp.stack(
            [
                jnp.sum(0.5 * v_sigma * dx * dx, 1),
                jnp.sum(v_sigma * dx * dy, 1),
                jnp.sum(0.5 * v_sigma * dy * dy, 1),
            ],
            -1,
        )
        v_mean = jnp.stack(
            [
                jnp.sum(v_sigma * (conic[:, 0:1] * dx + conic[:, 1:2] * dy), 1),
                jnp.sum(v_sigma * (conic[:, 1:2] * dx + conic[:, 2:3] * dy), 1),
            ],
            -1,
        )
        v_opac = jnp.sum(jnp.where(unclamped, vis * v_alpha, 0.0), 1)
        buf = buf + col[:, None, :] * fac[..., None]
        row = jnp.concatenate([v_mean, v_conic, v_opac[:, None], v_col], -1)
        slot = jnp.where(k < limit, tile_start + k, n_slots)
        grads = grads.at[slot].set(row, mode="drop")
        return k - 1, tr, buf, grads

    n_t, n_p = px.shape
    init = (
        jnp.max(last, initial=0) - 1,
        t_final,
        jnp.zeros((n_t, n_p, d), dtype),
        jnp.zeros((n_slots, width_g), dtype),
    )
    _, _, _, grads = jax.lax.while_loop(lambda s: s[0] >= 0, body, init)
    order = jnp.argsort(flat_ids, stable=True)
    per_gauss = segment_sum_sorted(grads[order], flat_ids[order], opacities.size)
    shape = opacities.shape
    v_means2d = per_gauss[:, 0:2].reshape((*shape, 2))
    v_conics = per_gauss[:, 2:5].reshape((*shape, 3))
    v_opac = per_gauss[:, 5].reshape(shape)
    v_colors = per_gauss[:, 6:].reshape((*shape, d))
    return v_means2d, v_conics, v_opac, v_colors, None, None, None


_composite_tiles.defvjp(_composite_fwd, _composite_bwd)


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

    Returns:
      (colour sum_k c_k alpha_k T_k (C, H, W, D), T_final (C, H, W), truncated (C, H, W)
      bool: pixels still open when their tile's cap cut the list short).
    """
    limit = tile_count if tile_cap is None else jnp.minimum(tile_count, tile_cap)
    dims = (means2d.shape[0], width, height, tile_size)
    acc, tr, _, done = _composite_tiles(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit, dims
    )
    truncated = ~done & (tile_count > limit)[:, None]
    n_cams = means2d.shape[0]
    return (
        tiles_to_image(acc, n_cams, width, height, tile_size),
        tiles_to_image(tr, n_cams, width, height, tile_size),
        tiles_to_image(truncated, n_cams, width, height, tile_size),
    )
