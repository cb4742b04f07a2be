"""TPU compositing kernels (Pallas Mosaic): scalar-prefetched per-tile chunk tables.

Outside the kernel each tile's (capped) slot list is cut into chunks of
``chunk`` slots (`KernelStatic.chunk`, default 128), padded, and laid out
chunk-aligned in a table in HBM (one row of ``(6 + D) * chunk`` float32
scalars per chunk: geometry then colour columns, each ``chunk`` wide). Each
tile's chunk range and slot limit are scalar-prefetched into SMEM (8 bytes a
tile). Grid: (tiles down, tiles across, cameras), one tile per step; its
``tile_size**2`` pixels are a (rows, 128) vector block (every block's last two
dims equal the array's, as Mosaic requires).

Forward: chunk by chunk, each chunk is copied by DMA from HBM into SMEM
(double-buffered: the next chunk is fetched while this one is composited) and
its slots composited one by one (scalar reads broadcast against the pixel
vectors); the walk ends when every pixel has stopped or the tile's slots are
used up. Backward: chunks back to front from the last slot any pixel used;
per slot a gradient row summed over the tile's pixels is written to an SMEM
chunk, which is then copied by DMA to the aliased, zero-initialised output
table (each tile owns its chunks: no atomics). Unvisited slots keep zeros.
The rows are reduced to Gaussians outside the kernel (sort + segmented sum).
Only 32-bit types (typed literals keep it so under ``jax_enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from uika_kernels import raster_common as rc

LANES = 128
# int32 literals for kernel arithmetic (python ints lower to i64 under jax_enable_x64).
_ONE, _ZERO = np.int32(1), np.int32(0)


def chunk_tables(geo, colors, flat_ids, tile_start, limit, chunk: int):
    """Chunk-aligned per-tile slot tables.

    Args:
      geo: per (camera, Gaussian) geometry (G, 6).
      colors: per (camera, Gaussian) colours (G, D).
      flat_ids: sorted slots' (camera, Gaussian) ids (S,).
      tile_start: first slot per tile (T,).
      limit: slots to composite per tile (T,).
      chunk: slots per chunk.

    Returns:
      (table (n_chunks, (6 + D) * chunk) float32, ids (n_chunks * chunk,) the Gaussian of
      each entry or G where empty, bounds (T + 1,): tile t owns chunks [bounds[t], bounds[t+1]).
    """
    n_g, n_s, n_t = geo.shape[0], flat_ids.shape[0], tile_start.shape[0]
    n_chunks = -(-n_s // chunk) + n_t  # sum_t ceil(limit_t / chunk) <= S / chunk + T
    count = (limit + chunk - 1) // chunk
    end = jnp.cumsum(count)
    offset = end - count
    j = jnp.arange(n_chunks, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(end, j, side="right"), n_t - 1).astype(jnp.int32)
    k = (j - offset[tile])[:, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
    valid = (j < end[-1])[:, None] & (k < limit[tile][:, None])
    slot = jnp.clip(tile_start[tile][:, None] + k, 0, n_s - 1)
    gid = jnp.where(valid, flat_ids[slot], n_g)
    values = jnp.concatenate([geo, colors], -1)
    values = jnp.concatenate([values, jnp.zeros((1, values.shape[1]), values.dtype)])[gid]
    table = jnp.swapaxes(values, 1, 2).reshape(n_chunks, -1)
    bounds = jnp.concatenate([jnp.zeros((1,), end.dtype), end]).astype(jnp.int32)
    return table, gid.reshape(-1), bounds


def _pixels(tx, ty, static):
    rows = static.n_pixels // LANES
    p = jax.lax.broadcasted_iota(jnp.int32, (rows, LANES), 0) * np.int32(LANES)
    p = p + jax.lax.broadcasted_iota(jnp.int32, (rows, LANES), 1)
    return rc.pixel_coords(tx, ty, p, static)


def _slot(buf, b, i, n_col, chunk):
    """Scalars (geometry, colour) of entry i of the chunk in buffer b."""
    geo = tuple(buf[b, _ZERO, np.int32(f * chunk) + i] for f in range(rc.GEO_WIDTH))
    col = tuple(buf[b, _ZERO, np.int32((rc.GEO_WIDTH + c) * chunk) + i] for c in range(n_col))
    return geo, col


def _forward_kernel(bounds_ref, lim_ref, table_hbm,
                    acc_ref, tr_ref, last_ref, done_ref, buf, sems, *, static):  # fmt: skip
    t, tx, ty = rc.grid_tile(static)
    offset, limit = bounds_ref[t], lim_ref[t]
    count = bounds_ref[t + _ONE] - offset
    px, py, inside = _pixels(tx, ty, static)
    n_col = acc_ref.shape[0]
    _C = np.int32(static.chunk)

    def fetch(c, b):  # chunk c of this tile into SMEM buffer b (double buffering)
        return pltpu.make_async_copy(table_hbm.at[offset + c], buf.at[b], sems.at[b])

    # `done` is carried as int32 (0/1): no boolean vectors in loop carries.
    def slot_step(b, i, s):
        c, tr, acc, last, done = s
        (mx, my, ca, cb, cc, op), col = _slot(buf, b, i, n_col, static.chunk)
        _, _, sigma, _, alpha = rc.gaussian_alpha(mx, my, ca, cb, cc, op, px, py)
        weight, tr, last, done_b = rc.forward_step(c * _C + i, tr, last, done > 0, alpha, sigma)
        acc = tuple(a + cv * weight for a, cv in zip(acc, col, strict=True))
        return c, tr, acc, last, rc.as_int(done_b)

    def cond(s):
        c, _, _, _, done = s
        return (c < count) & rc.any_true(done == 0)

    def chunk_step(s):
        c = s[0]
        b = jnp.bitwise_and(c, _ONE)
        fetch(c, b).wait()

        @pl.when(c + _ONE < count)
        def _():
            fetch(c + _ONE, _ONE - b).start()

        n = jnp.minimum(_C, limit - c * _C)
        s = jax.lax.fori_loop(_ZERO, n, lambda i, s: slot_step(b, i, s), s)
        return (c + _ONE, *s[1:])

    @pl.when(count > _ZERO)
    def _():
        fetch(_ZERO, _ZERO).start()

    shape = px.shape
    init = (
        _ZERO,
        jnp.ones(shape, jnp.float32),
        tuple(jnp.zeros(shape, jnp.float32) for _ in range(n_col)),
        jnp.zeros(shape, jnp.int32),
        rc.as_int(jnp.logical_not(inside)),
    )
    c_end, tr, acc, last, done = jax.lax.while_loop(cond, chunk_step, init)

    @pl.when(c_end < count)  # stopped early: drain the prefetch in flight
    def _():
        fetch(c_end, jnp.bitwise_and(c_end, _ONE)).wait()

    for ch, a in enumerate(acc):
        acc_ref[ch] = a
    tr_ref[...] = tr
    last_ref[...] = last
    done_ref[...] = done


def _interpret(static):
    return pltpu.InterpretParams() if static.interpret else False


def forward(table, bounds, limit, n_col, static: rc.KernelStatic):
    """Forward kernel.

    Args:
      table: chunk table from `chunk_tables` (n_chunks, (6 + D) * chunk).
      bounds: chunk range per tile (T + 1,), from `chunk_tables`.
      limit: slots to composite per tile (T,).
      n_col: colour channels D.
      static: `KernelStatic`.

    Returns:
      (colour (T, D, P), T_final (T, P), last (T, P) int32, done (T, P) int32).
    """
    n_t, rows = limit.shape[0], static.n_pixels // LANES
    pix = pl.BlockSpec((None, rows, LANES), static.block_index(0, 0))
    cpix = pl.BlockSpec((None, n_col, rows, LANES), static.block_index(0, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=static.grid,
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=(cpix, pix, pix, pix),
        scratch_shapes=[
            pltpu.SMEM((2, 1, table.shape[1]), jnp.float32),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    f32, i32 = jnp.float32, jnp.int32
    acc, tr, last, done = pl.pallas_call(
        lambda *refs: _forward_kernel(*refs, static=static),
        out_shape=(
            jax.ShapeDtypeStruct((n_t, n_col, rows, LANES), f32),
            jax.ShapeDtypeStruct((n_t, rows, LANES), f32),
            jax.ShapeDtypeStruct((n_t, rows, LANES), i32),
            jax.ShapeDtypeStruct((n_t, rows, LANES), i32),
        ),
        grid_spec=grid_spec,
        interpret=_interpret(static),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        name="uika_composite_fwd_mosaic",
    )(bounds, limit, table[:, None, :])
    flat = lambda x: x.reshape((*x.shape[:-2], -1))  # noqa: E731
    return flat(acc), flat(tr), flat(last), flat(done)


def _backward_kernel(bounds_ref, lim_ref, table_hbm, tr_ref, last_ref, v_acc_ref, v_t_ref,
                     _zeros, grad_hbm, buf, gbuf, sem_in, sem_zero, sem_out, *,
                     static):  # fmt: skip
    del lim_ref
    t, tx, ty = rc.grid_tile(static)
    offset = bounds_ref[t]
    px, py, _ = _pixels(tx, ty, static)
    t_final, last, v_t = tr_ref[...], last_ref[...], v_t_ref[...]
    n_col = v_acc_ref.shape[0]
    v_acc = tuple(v_acc_ref[ch] for ch in range(n_col))
    _C = np.int32(static.chunk)

    # Double-buffered DMAs, chunk c in buffer b: its slot table in, its (zero) gradient
    # rows in (slots past max(last) are never visited and must stay zero), the rows out.
    def fetch(c, b):
        return pltpu.make_async_copy(table_hbm.at[offset + c], buf.at[b], sem_in.at[b])

    def zeros(c, b):
        return pltpu.make_async_copy(grad_hbm.at[offset + c], gbuf.at[b], sem_zero.at[b])

    def store(c, b):
        return pltpu.make_async_copy(gbuf.at[b], grad_hbm.at[offset + c], sem_out.at[b])

    def slot_step(b, i, s):
        c, tr, bufc = s
        (mx, my, ca, cb, cc, op), col = _slot(buf, b, i, n_col, static.chunk)
        dx, dy, sigma, vis, alpha = rc.gaussian_alpha(mx, my, ca, cb, cc, op, px, py)
        tr, ra, fac, unclamped = rc.backward_step(c * _C + i, last, tr, alpha, sigma, vis, op)
        v_alpha = (col[0] * tr - bufc[0] * ra) * v_acc[0]
        for ch in range(1, n_col):
            v_alpha = v_alpha + (col[ch] * tr - bufc[ch] * ra) * v_acc[ch]
        v_alpha = v_alpha - t_final * ra * v_t
        grads = rc.geometry_grads(v_alpha, unclamped, vis, dx, dy, op, ca, cb, cc)
        grads = grads + tuple(jnp.sum(fac * v) for v in v_acc)
        for f, g in enumerate(grads):
            gbuf[b, _ZERO, np.int32(f * static.chunk) + i] = g
        bufc = tuple(bv + cv * fac for bv, cv in zip(bufc, col, strict=True))
        return c, tr, bufc

    k_max = jnp.max(last.astype(jnp.float32)).astype(jnp.int32)  # float max: exact < 2**24
    shift = np.int32(static.chunk.bit_length() - 1)
    top = jnp.right_shift(k_max + _C - _ONE, shift) - _ONE

    def chunk_step(s):
        c = s[0]
        b = jnp.bitwise_and(top - c, _ONE)
        fetch(c, b).wait()
        zeros(c, b).wait()

        @pl.when(c < top)  # buffer 1 - b held chunk c + 1's rows: wait until they are out
        def _():
            store(c + _ONE, _ONE - b).wait()

        @pl.when(c > _ZERO)
        def _():
            fetch(c - _ONE, _ONE - b).start()
            zeros(c - _ONE, _ONE - b).start()

        n = jnp.minimum(_C, k_max - c * _C)
        s = jax.lax.fori_loop(_ZERO, n, lambda j, s: slot_step(b, n - _ONE - j, s), s)
        store(c, b).start()
        return (c - _ONE, *s[1:])

    @pl.when(top >= _ZERO)
    def _():
        fetch(top, _ZERO).start()
        zeros(top, _ZERO).start()

    init = (top, t_final, tuple(jnp.zeros(t_final.shape, jnp.float32) for _ in range(n_col)))
    jax.lax.while_loop(lambda s: s[0] >= _ZERO, chunk_step, init)

    @pl.when(top >= _ZERO)
    def _():
        store(_ZERO, jnp.bitwise_and(top, _ONE)).wait()


def backward(table, bounds, limit, t_final, last, v_acc, v_t, static):
    """Backward kernel: per-entry gradient rows in chunk-table layout.

    Args:
      table: chunk table (n_chunks, (6 + D) * chunk).
      bounds: chunk range per tile (T + 1,).
      limit: slots composited per tile (T,).
      t_final: forward T_final (T, P).
      last: forward slots consumed per pixel (T, P) int32.
      v_acc: colour cotangent (T, D, P).
      v_t: T_final cotangent (T, P).
      static: `KernelStatic`.

    Returns:
      Gradients (n_chunks, (6 + D) * chunk) in the table's layout; zero where unvisited.
    """
    n_col, rows = v_acc.shape[1], static.n_pixels // LANES
    pix = pl.BlockSpec((None, rows, LANES), static.block_index(0, 0))
    cpix = pl.BlockSpec((None, n_col, rows, LANES), static.block_index(0, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=static.grid,
        in_specs=[hbm, pix, pix, cpix, pix, hbm],
        out_specs=hbm,
        scratch_shapes=[
            pltpu.SMEM((2, 1, table.shape[1]), jnp.float32),
            pltpu.SMEM((2, 1, table.shape[1]), jnp.float32),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    as_blocks = lambda x: x.reshape((*x.shape[:-1], rows, LANES))  # noqa: E731
    # HBM tables are (n_chunks, 1, L) so that one chunk, (1, L), matches an SMEM (1, L) buffer.
    table3 = table[:, None, :]
    grads = pl.pallas_call(
        lambda *refs: _backward_kernel(*refs, static=static),
        out_shape=jax.ShapeDtypeStruct(table3.shape, jnp.float32),
        grid_spec=grid_spec,
        input_output_aliases={7: 0},
        interpret=_interpret(static),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        name="uika_composite_bwd_mosaic",
    )(
        bounds,
        limit,
        table3,
        as_blocks(t_final),
        as_blocks(last),
        as_blocks(v_acc),
        as_blocks(v_t),
        jnp.zeros(table3.shape, jnp.float32),
    )
    return grads[:, 0, :]
