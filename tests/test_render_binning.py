"""Tile binning parity with gsplat 1.5.3's `_isect_tiles` / `_isect_offset_encode`, and
overflow: true counts kept, the farthest intersections dropped, no counter wrapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from raster_cases import TALL, WIDE, bin_capacity, bin_gaussians
from render_oracle import gsplat_project, random_scene

from uika_jax.render import binning
from uika_kernels.tiles import tile_grid


@pytest.mark.oracle
@pytest.mark.parametrize("seed,n,w,h,c", [WIDE, TALL])
def test_binning_matches_gsplat(seed, n, w, h, c):
    torch = require_oracle("torch")
    ti = require_oracle("gsplat.cuda._torch_impl")
    radii, means2d, depths, _ = gsplat_project(torch, ti, random_scene(seed, n, w, h, c))
    tw, th = tile_grid(w, h, 16)
    tpg, isect_ids, flat = ti._isect_tiles(means2d, radii, depths, 16, tw, th)
    offsets = ti._isect_offset_encode(isect_ids, c, tw, th).numpy().reshape(-1)
    total = int(tpg.sum())
    capacity = bin_capacity(c, n, w, h)
    bins = bin_gaussians(
        *(jnp.asarray(x.numpy()) for x in (means2d, radii, depths)), w, h, capacity=capacity
    )
    assert int(bins.n_isects) == total > 0 and capacity > total
    np.testing.assert_array_equal(np.asarray(bins.tiles_per_gauss), tpg.numpy())
    np.testing.assert_array_equal(np.asarray(bins.flat_ids)[:total], flat.numpy())
    np.testing.assert_array_equal(np.asarray(bins.tile_start), offsets)
    counts = np.diff(np.append(offsets, total))
    np.testing.assert_array_equal(np.asarray(bins.tile_count), counts)
    np.testing.assert_array_equal(np.asarray(bins.true_tile_count), counts)


def test_overflow_keeps_true_counts_and_drops_the_farthest():
    """A third of the slots: each tile keeps the nearest prefix of its list, true counts stay."""
    _, n, w, h, c = WIDE
    rng = np.random.default_rng(4)
    means2d = jnp.asarray(rng.uniform(0, (w, h), (c, n, 2)), jnp.float32)
    radii = jnp.asarray(rng.integers(1, 24, (c, n, 2)), jnp.int32)
    depths = jnp.asarray(rng.uniform(0.5, 3.0, (c, n)), jnp.float32)
    full = bin_gaussians(means2d, radii, depths, w, h, capacity=bin_capacity(c, n, w, h))
    total = int(full.n_isects)
    part = bin_gaussians(means2d, radii, depths, w, h, capacity=total // 3)
    full, part = jax.device_get(full), jax.device_get(part)
    assert int(part.n_isects) == total
    np.testing.assert_array_equal(part.true_tile_count, full.tile_count)
    assert part.tile_count.sum() == total // 3 and (part.tile_count <= full.tile_count).all()
    d = np.asarray(depths).reshape(-1)
    dropped = np.setdiff1d(full.flat_ids[:total], part.flat_ids)
    assert len(dropped) > 0 and d[part.flat_ids].max() <= d[dropped].min()
    for t in range(len(full.tile_start)):
        s_full, s_part, k = full.tile_start[t], part.tile_start[t], part.tile_count[t]
        np.testing.assert_array_equal(
            part.flat_ids[s_part : s_part + k], full.flat_ids[s_full : s_full + k]
        )


def test_depth_key_is_monotone():
    x = jnp.array([-3.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 2.0, 1e10], jnp.float32)
    k = np.asarray(binning.depth_key(x)).astype(np.int64)
    assert (np.diff(k) >= 0).all() and k[0] < k[-1]


def test_huge_coordinates_do_not_wrap():
    means2d = jnp.array([[[1e12, 5.0], [-1e12, 5.0], [20.0, 20.0]]], jnp.float32)
    radii = jnp.array([[[2**30, 3], [3, 3], [2**30, 2**30]]], jnp.int32)
    depths = jnp.ones((1, 3), jnp.float32)
    bins = bin_gaussians(means2d, radii, depths, 64, 48, capacity=64)
    # The first two miss the image (the box would be clipped away); the third covers all 12.
    np.testing.assert_array_equal(np.asarray(bins.tiles_per_gauss), [[0, 0, 12]])
    assert int(bins.n_isects) == 12


def test_saturating_cumsum_does_not_wrap():
    # Per-Gaussian tile counts near 2^31: an int32 cumsum wraps negative here, and a
    # uint32 one wraps past 2^32 back to small numbers.
    counts = np.array([2**30, 2**30 - 1, 1, 5, 2**31 - 1, 2**31 - 1, 7, 0], np.int32)
    sums = np.asarray(jax.jit(binning.saturating_cumsum)(jnp.asarray(counts)))
    exact = np.cumsum(counts.astype(np.int64))
    np.testing.assert_array_equal(sums, np.minimum(exact, binning.INT32_MAX))
    assert sums[1] == 2**31 - 1 and (sums[2:] == 2**31 - 1).all()


def test_huge_totals_saturate_and_count_every_overflow():
    # 1100 Gaussians each covering all 2048 x 2048 tiles: 4.6e9 intersections, more
    # than 2^32 (uint32 counting would wrap twice) on a 32768 x 32768 image.
    size, n, capacity = 32768, 1100, 64
    means2d = jnp.full((1, n, 2), size / 2, jnp.float32)
    radii = jnp.full((1, n, 2), size, jnp.int32)
    depths = jnp.asarray(np.linspace(5.0, 1.0, n, dtype=np.float32)[None])  # last nearest
    bins = bin_gaussians(means2d, radii, depths, size, size, capacity=capacity)
    n_tiles = (size // 16) ** 2
    assert int(bins.n_isects) == 2**31 - 1  # saturated, not wrapped
    assert (np.asarray(bins.tiles_per_gauss) == n_tiles).all()
    assert int(bins.true_tile_count.min()) == int(bins.true_tile_count.max()) == n
    stored = np.asarray(bins.tile_count)
    assert stored.sum() == capacity and (stored[:capacity] == 1).all()
    # What is kept: the nearest Gaussian's first `capacity` tiles.
    np.testing.assert_array_equal(np.asarray(bins.flat_ids), np.full(capacity, n - 1))
    assert int(bins.n_isects) - capacity > 0  # rasterization's isects_dropped
