"""The ``pallas`` compositing backends of `uika_jax.render.rasterization`, with custom VJPs.

`BACKENDS` maps each name to its function; `uika_jax.render` registers them on
first use (select with ``RasterConfig(backend=...)``; ``"auto"`` picks one per
platform). This module imports nothing from `uika_jax`.

- ``"pallas"``: the kernel for the platform the computation is lowered for
  (`jax.lax.platform_dependent`): Pallas Triton on CUDA/ROCm GPUs, Pallas
  Mosaic on TPU; on any other platform (CPU) the Triton kernel in interpret mode.
- ``"pallas_triton"`` / ``"pallas_mosaic"``: one kernel, compiled (needs that hardware).
- ``"pallas_triton_interpret"`` / ``"pallas_mosaic_interpret"``: one kernel in
  Pallas interpret mode on any platform (CI, tests; slow).

Each has the signature and outputs of the reference `uika_jax.render.composite.composite`:
(colour sum, T_final, truncated), with the same numerics. Kernels compute in
float32 (Mosaic TPU has no 64-bit types; kernel literals are typed, so they
lower with ``jax_enable_x64`` on too); inputs of other float dtypes are cast
and the outputs cast back. Tiles: ``tile_size`` a power of two (Triton), and
``tile_size**2`` a multiple of 128 on Mosaic (16, the default, fits both).

Per-Gaussian attributes are gathered into per-slot tables outside the
kernels (slot-indexed for Triton, chunk-aligned per tile for Mosaic). The
backward kernels write one gradient row per slot, reduced to Gaussians here by
a sort and `segment_sum_sorted` (fixed summation order, no float atomics:
bitwise reproducible). Residuals are the inputs plus, per pixel, T_final and
the stop index (the slot tables are gathered again in the backward pass).
Under `rasterization()`'s batch vmap, the pallas_calls gain a batch grid axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from uika_kernels import raster_common as rc
from uika_kernels import raster_mosaic, raster_triton
from uika_kernels.tiles import segment_sum_sorted, tiles_to_image


def _per_gaussian(means2d, conics, opacities):
    """Geometry columns (C * N, GEO_WIDTH) of every (camera, Gaussian)."""
    return jnp.concatenate(
        [means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1, 1)], -1
    )


class _Triton:
    """Slot tables (S, 8) / (S, Dp) indexed by global slot; gradient rows per slot."""

    @staticmethod
    def tables(means2d, conics, opacities, colors, flat_ids, tile_start, limit, static):
        del static
        d = colors.shape[-1]
        dp = raster_triton.pad_pow2(d)
        geo = _per_gaussian(means2d, conics, opacities)
        geo = jnp.pad(geo, ((0, 0), (0, raster_triton.GEO_COLS - rc.GEO_WIDTH)))[flat_ids]
        col = jnp.pad(colors.reshape(-1, d), ((0, 0), (0, dp - d)))[flat_ids]
        return geo, col, tile_start, limit, flat_ids

    @staticmethod
    def forward(tables, static):
        geo, col, tile_start, limit, _ = tables
        return raster_triton.forward(geo, col, tile_start, limit, static)

    @staticmethod
    def backward(tables, t_final, last, v_acc, v_t, static):
        geo, col, tile_start, limit, flat_ids = tables
        ggeo, gcol = raster_triton.backward(
            geo, col, tile_start, limit, t_final, last, v_acc, v_t, static
        )
        return jnp.concatenate([ggeo[:, : rc.GEO_WIDTH], gcol], -1), flat_ids


class _Mosaic:
    """Chunk-aligned per-tile tables; gradient rows per table entry."""

    @staticmethod
    def tables(means2d, conics, opacities, colors, flat_ids, tile_start, limit, static):
        geo = _per_gaussian(means2d, conics, opacities)
        table, ids, bounds = raster_mosaic.chunk_tables(
            geo, colors.reshape(geo.shape[0], -1), flat_ids, tile_start, limit, static.chunk
        )
        return table, ids, bounds, limit

    @staticmethod
    def forward(tables, static):
        table, _, bounds, limit = tables
        n_col = table.shape[1] // static.chunk - rc.GEO_WIDTH
        return raster_mosaic.forward(table, bounds, limit, n_col, static)

    @staticmethod
    def backward(tables, t_final, last, v_acc, v_t, static):
        table, ids, bounds, limit = tables
        grads = raster_mosaic.backward(table, bounds, limit, t_final, last, v_acc, v_t, static)
        n_chunks = grads.shape[0]
        rows = jnp.swapaxes(grads.reshape(n_chunks, -1, static.chunk), 1, 2)
        return rows.reshape(n_chunks * static.chunk, -1), ids


_IMPLS = {"triton": _Triton, "mosaic": _Mosaic}
KERNELS = tuple(_IMPLS)


def _reduce(rows, ids, shape):
    """Per-slot rows (M, 6 + D) with Gaussian ids (M,) to per-Gaussian cotangents."""
    n = 1
    for s in shape:
        n *= s
    order = jnp.argsort(ids, stable=True)
    g = segment_sum_sorted(rows[order], ids[order], n)
    return (
        g[:, 0:2].reshape((*shape, 2)),
        g[:, 2:5].reshape((*shape, 3)),
        g[:, 5].reshape(shape),
        g[:, 6:].reshape((*shape, rows.shape[1] - 6)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _composite_tiles(means2d, conics, opacities, colors, flat_ids, tile_start, limit, kernel,
                     static):  # fmt: skip
    out, _ = _composite_fwd(
        means2d, conics, opacities, colors, flat_ids, tile_start, limit, kernel, static
    )
    return out


def _composite_fwd(means2d, conics, opacities, colors, flat_ids, tile_start, limit, kernel,
                   static):  # fmt: skip
    impl = _IMPLS[kernel]
    tables = impl.tables(means2d, conics, opacities, colors, flat_ids, tile_start, limit, static)
    acc, tr, last, done = impl.forward(tables, static)
    d = colors.shape[-1]
    # Residuals: the inputs (the slot tables are gathered again), T_final and `last`.
    res = (means2d, conics, opacities, colors, flat_ids, tile_start, limit, tr, last)
    return (acc[:, :d], tr, done), res


def _composite_bwd(kernel, static, res, cts):
    means2d, conics, opacities, colors, flat_ids, tile_start, limit, t_final, last = res
    impl = _IMPLS[kernel]
    tables = impl.tables(means2d, conics, opacities, colors, flat_ids, tile_start, limit, static)
    v_acc, v_t = cts[0], cts[1]
    d = colors.shape[-1]
    if kernel == "triton":  # colour rows padded to a power of two
        v_acc = jnp.pad(v_acc, ((0, 0), (0, raster_triton.pad_pow2(d) - d), (0, 0)))
    rows, ids = impl.backward(tables, t_final, last, v_acc, v_t, static)
    grads = _reduce(rows[:, : rc.GEO_WIDTH + d], ids, opacities.shape)
    return (*grads, None, None, None)


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
    kernel: str = "triton",
    interpret: bool = False,
    chunk: int = 128,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Composites binned Gaussians with a Pallas kernel; arguments as `composite.composite`.

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
      tile_size: tile side in pixels: a power of two (Triton), with tile_size**2 a multiple
        of 128 (Mosaic: 16, 32, ...).
      tile_cap: if given, at most this many slots per tile are composited.
      kernel: one of `KERNELS`.
      interpret: run in Pallas interpret mode (any platform).
      chunk: Mosaic only: slots per DMA chunk (a power of two).

    Returns:
      (colour (C, H, W, D), T_final (C, H, W), truncated (C, H, W) bool), as the reference.
    """
    if kernel not in _IMPLS:
        raise ValueError(f"kernel must be one of {sorted(_IMPLS)}, got {kernel!r}")
    _check_tile_size(kernel, tile_size)
    n_cams, dtype = means2d.shape[0], colors.dtype
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    static = rc.KernelStatic(
        n_cams, int(width), int(height), int(tile_size), bool(interpret), int(chunk)
    )
    limit = tile_count if tile_cap is None else jnp.minimum(tile_count, tile_cap)
    f32 = [x.astype(jnp.float32) for x in (means2d, conics, opacities, colors)]
    ids = flat_ids.astype(jnp.int32)
    acc, tr, done = _composite_tiles(
        *f32, ids, tile_start.astype(jnp.int32), limit.astype(jnp.int32), kernel, static
    )
    truncated = (done == 0) & (tile_count > limit)[:, None]
    to_image = functools.partial(
        tiles_to_image, n_cams=n_cams, width=width, height=height, tile_size=tile_size
    )
    return (
        to_image(jnp.moveaxis(acc, 1, 2)).astype(dtype),
        to_image(tr).astype(dtype),
        to_image(truncated),
    )


def _check_tile_size(kernel: str, tile_size: int) -> None:
    p = tile_size * tile_size
    if tile_size < 1 or tile_size & (tile_size - 1):
        raise ValueError(f"the pallas kernels need a power-of-two tile_size, got {tile_size}")
    if kernel == "mosaic" and p % 128:
        raise ValueError(f"the Mosaic TPU kernel needs tile_size**2 % 128 == 0, got {tile_size}")


def _auto(means2d, conics, opacities, colors, flat_ids, tile_start, tile_count, width, height,
          **kwargs):  # fmt: skip
    """The kernel of the platform lowered for; Triton interpret mode elsewhere (CPU)."""
    kwargs.update(width=width, height=height)
    triton = functools.partial(composite, kernel="triton", **kwargs)
    mosaic = functools.partial(composite, kernel="mosaic", **kwargs)
    return jax.lax.platform_dependent(
        means2d,
        conics,
        opacities,
        colors,
        flat_ids,
        tile_start,
        tile_count,
        cuda=triton,
        rocm=triton,
        tpu=mosaic,
        default=functools.partial(triton, interpret=True),
    )


BACKENDS = {
    "pallas": _auto,
    "pallas_triton": functools.partial(composite, kernel="triton"),
    "pallas_mosaic": functools.partial(composite, kernel="mosaic"),
    "pallas_triton_interpret": functools.partial(composite, kernel="triton", interpret=True),
    "pallas_mosaic_interpret": functools.partial(composite, kernel="mosaic", interpret=True),
}
