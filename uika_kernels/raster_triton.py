"""GPU compositing kernels (Pallas Triton): forward front to back, backward back to front.

One program per tile (grid: tiles down, tiles across, cameras); the tile's
``tile_size**2`` pixels are one vector, colours a (Dp, pixels) block with Dp a power of two (Triton
needs power-of-two array sizes; colours are zero padded). Slot attributes are
read as scalars from the slot table (S, 8) / (S, Dp) at ``tile_start + k``.

Forward: a while loop over the tile's slots that ends when every pixel has
stopped (early termination) or the tile's (capped) slot count is reached.
Outputs per tile: colour sum, T_final, the number of slots each pixel consumed
(`last`) and whether it stopped (`done`).

Backward: from (T_final, last) the tile is walked back to front, recovering T
by division as the reference does, and each slot's gradient row (summed over
the tile's pixels) is stored at its own slot index. Every slot belongs to one
tile, so no atomics are needed; the rows are reduced to Gaussians outside the
kernel by a deterministic segmented sum. Slots never visited keep the zeros of
the aliased input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from uika_kernels import raster_common as rc

GEO_COLS = 8  # rc.GEO_WIDTH padded to a power of two
NUM_WARPS = 4


def pad_pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(n - 1, 0).bit_length()


def _compiler_params():
    return pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1)


def _load_geo(geo_ref, slot):
    return tuple(geo_ref[slot, i] for i in range(rc.GEO_WIDTH))


def _forward_kernel(start_ref, limit_ref, geo_ref, col_ref,
                    acc_ref, tr_ref, last_ref, done_ref, *, static):  # fmt: skip
    t, tx, ty = rc.grid_tile(static)
    start, limit = start_ref[t], limit_ref[t]
    p = jnp.arange(static.n_pixels, dtype=jnp.int32)
    px, py, inside = rc.pixel_coords(tx, ty, p, static)

    def cond(s):
        k, _, _, _, done = s
        return (k < limit) & rc.any_true(jnp.logical_not(done))

    def body(s):
        k, tr, acc, last, done = s
        slot = start + k
        mx, my, ca, cb, cc, op = _load_geo(geo_ref, slot)
        _, _, sigma, _, alpha = rc.gaussian_alpha(mx, my, ca, cb, cc, op, px, py)
        weight, tr, last, done = rc.forward_step(k, tr, last, done, alpha, sigma)
        col = col_ref[slot, :]
        acc = acc + col[:, None] * weight[None, :]
        return k + 1, tr, acc, last, done

    n_p, d = static.n_pixels, acc_ref.shape[0]
    init = (
        jnp.int32(0),
        jnp.ones((n_p,), jnp.float32),
        jnp.zeros((d, n_p), jnp.float32),
        jnp.zeros((n_p,), jnp.int32),
        jnp.logical_not(inside),
    )
    _, tr, acc, last, done = jax.lax.while_loop(cond, body, init)
    acc_ref[...] = acc
    tr_ref[...] = tr
    last_ref[...] = last
    done_ref[...] = rc.as_int(done)


def forward(geo, col, tile_start, limit, static: rc.KernelStatic):
    """Forward kernel.

    Args:
      geo: slot table (S, 8) float32 (mean x, y, conic a, b, c, opacity, 0, 0).
      col: slot colours (S, Dp) float32, Dp a power of two.
      tile_start: first slot per tile (T,) int32.
      limit: slots to composite per tile (T,) int32.
      static: `KernelStatic`.

    Returns:
      (colour (T, Dp, P), T_final (T, P), last (T, P) int32, done (T, P) int32).
    """
    n_t, d, n_p = tile_start.shape[0], col.shape[1], static.n_pixels
    whole = pl.no_block_spec
    pix = pl.BlockSpec((None, n_p), static.block_index(0))
    f32, i32 = jnp.float32, jnp.int32
    return pl.pallas_call(
        lambda *refs: _forward_kernel(*refs, static=static),
        out_shape=(
            jax.ShapeDtypeStruct((n_t, d, n_p), f32),
            jax.ShapeDtypeStruct((n_t, n_p), f32),
            jax.ShapeDtypeStruct((n_t, n_p), i32),
            jax.ShapeDtypeStruct((n_t, n_p), i32),
        ),
        grid=static.grid,
        in_specs=[whole] * 4,
        out_specs=(pl.BlockSpec((None, d, n_p), static.block_index(0, 0)), pix, pix, pix),
        interpret=static.interpret,
        compiler_params=_compiler_params(),
        name="uika_composite_fwd_triton",
    )(tile_start, limit, geo, col)


def _backward_kernel(start_ref, limit_ref, geo_ref, col_ref, tr_ref, last_ref,
                     v_acc_ref, v_t_ref, _g0, _g1, ggeo_ref, gcol_ref, *, static):  # fmt: skip
    t, tx, ty = rc.grid_tile(static)
    start, limit = start_ref[t], limit_ref[t]
    p = jnp.arange(static.n_pixels, dtype=jnp.int32)
    px, py, _ = rc.pixel_coords(tx, ty, p, static)
    t_final = tr_ref[...]
    last = last_ref[...]
    v_acc = v_acc_ref[...]
    v_t = v_t_ref[...]

    def body(s):
        k, tr, buf = s
        slot = start + k
        mx, my, ca, cb, cc, op = _load_geo(geo_ref, slot)
        dx, dy, sigma, vis, alpha = rc.gaussian_alpha(mx, my, ca, cb, cc, op, px, py)
        tr, ra, fac, unclamped = rc.backward_step(k, last, tr, alpha, sigma, vis, op)
        col = col_ref[slot, :]
        v_col = jnp.sum(fac[None, :] * v_acc, axis=1)
        v_alpha = jnp.sum((col[:, None] * tr[None, :] - buf * ra[None, :]) * v_acc, axis=0)
        v_alpha = v_alpha - t_final * ra * v_t
        grads = rc.geometry_grads(v_alpha, unclamped, vis, dx, dy, op, ca, cb, cc)
        for i, g in enumerate(grads):
            ggeo_ref[slot, i] = g
        gcol_ref[slot, :] = v_col
        buf = buf + col[:, None] * fac[None, :]
        return k - 1, tr, buf

    k0 = jnp.minimum(jnp.max(last), limit) - 1
    init = (k0, t_final, jnp.zeros(v_acc.shape, jnp.float32))
    jax.lax.while_loop(lambda s: s[0] >= 0, body, init)


def backward(geo, col, tile_start, limit, t_final, last, v_acc, v_t, static):
    """Backward kernel: per-slot gradient rows.

    Args:
      geo: slot table (S, 8), as for `forward`.
      col: slot colours (S, Dp).
      tile_start: first slot per tile (T,).
      limit: slots composited per tile (T,).
      t_final: forward T_final (T, P).
      last: forward slots consumed per pixel (T, P) int32.
      v_acc: colour cotangent (T, Dp, P).
      v_t: T_final cotangent (T, P).
      static: `KernelStatic`.

    Returns:
      (geometry gradients (S, 8), colour gradients (S, Dp)); zero for unvisited slots.
    """
    d, n_p = col.shape[1], static.n_pixels
    whole = pl.no_block_spec
    pix = pl.BlockSpec((None, n_p), static.block_index(0))
    cpix = pl.BlockSpec((None, d, n_p), static.block_index(0, 0))
    zeros = (jnp.zeros(geo.shape, jnp.float32), jnp.zeros(col.shape, jnp.float32))
    return pl.pallas_call(
        lambda *refs: _backward_kernel(*refs, static=static),
        out_shape=(
            jax.ShapeDtypeStruct(geo.shape, jnp.float32),
            jax.ShapeDtypeStruct(col.shape, jnp.float32),
        ),
        grid=static.grid,
        in_specs=[whole] * 4 + [pix, pix, cpix, pix, whole, whole],
        out_specs=(whole, whole),
        input_output_aliases={8: 0, 9: 1},
        interpret=static.interpret,
        compiler_params=_compiler_params(),
        name="uika_composite_bwd_triton",
    )(tile_start, limit, geo, col, t_final, last, v_acc, v_t, *zeros)
