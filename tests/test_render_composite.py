"""Tile compositor: the torch mirror of gsplat's CUDA forward, our forward and custom VJP
against it and against finite differences, tile-cap truncation, and the independence of
results from the traversal layout (lanes, block)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from raster_cases import (
    BRUTEFORCE,
    WIDE,
    bin_capacity,
    bin_gaussians,
    composite_value_and_grad,
    rel_error,
    wide_scene,
)
from render_oracle import composite_bruteforce, composite_torch, gsplat_project, random_scene

from uika_jax.render import composite
from uika_kernels.tiles import tile_grid

KEYS = ("means2d", "conics", "op", "col")


def _gsplat_inputs(scene, d=3):
    """gsplat's projection and tile intersection of a scene (torch), random colours."""
    torch = require_oracle("torch")
    ti = require_oracle("gsplat.cuda._torch_impl")
    w, h = scene["width"], scene["height"]
    radii, means2d, depths, conics = gsplat_project(torch, ti, scene)
    tw, th = tile_grid(w, h, 16)
    _, isect_ids, flat = ti._isect_tiles(means2d, radii, depths, 16, tw, th)
    offsets = ti._isect_offset_encode(isect_ids, means2d.shape[0], tw, th)
    c = means2d.shape[0]
    vis = (radii > 0).all(-1)
    op = torch.tensor(scene["opacities"])[None].expand(c, -1) * vis
    rng = np.random.default_rng(5)
    col = torch.tensor(rng.uniform(0, 1, (c, scene["means"].shape[0], d)).astype(np.float32))
    t = {"means2d": means2d, "conics": conics, "op": op, "col": col, "offsets": offsets,
         "flat": flat, "radii": radii, "depths": depths}  # fmt: skip
    return torch, t


@pytest.mark.oracle
def test_torch_mirror_matches_bruteforce():
    _, _, w, h, _ = BRUTEFORCE
    torch, t = _gsplat_inputs(random_scene(*BRUTEFORCE))
    rc, ra = composite_torch(
        torch, t["means2d"], t["conics"], t["col"], t["op"], w, h, 16, t["offsets"], t["flat"]
    )
    bc, ba = composite_bruteforce(
        *(t[k].numpy() for k in ("means2d", "conics", "col", "op", "radii", "depths")), w, h
    )
    assert ba.max() > 0.9
    np.testing.assert_allclose(rc.numpy(), bc, atol=2e-6)  # measured 1.7e-7
    np.testing.assert_allclose(ra.numpy(), ba, atol=2e-6)


@pytest.mark.oracle
def test_forward_and_vjp_match_the_mirror():
    """Five channels (not the RGB special case); gradients against torch autograd of the mirror."""
    _, n, w, h, c = WIDE
    torch, t = _gsplat_inputs(wide_scene(), d=5)
    leaves = {k: t[k].detach().clone().requires_grad_(True) for k in KEYS}
    rc, ra = composite_torch(
        torch, leaves["means2d"], leaves["conics"], leaves["col"], leaves["op"], w, h, 16,
        t["offsets"], t["flat"],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    wc = rng.normal(size=rc.shape).astype(np.float32)
    wt = rng.normal(size=(c, h, w)).astype(np.float32)
    ((rc * torch.tensor(wc)).sum() + ((1 - ra[..., 0]) * torch.tensor(wt)).sum()).backward()

    args = [jnp.asarray(t[k].detach().numpy()) for k in KEYS]
    bins = bin_gaussians(
        *(jnp.asarray(t[k].numpy()) for k in ("means2d", "radii", "depths")), w, h,
        capacity=bin_capacity(c, n, w, h),
    )  # fmt: skip
    (_, (acc, tr, truncated)), grads = composite_value_and_grad(
        *args, bins, wc, wt, compositor=composite.composite, width=w, height=h
    )
    assert acc.shape == (c, h, w, 5) and tr.shape == (c, h, w)
    assert not bool(truncated.any())
    err_c = np.abs(np.asarray(acc) - rc.detach().numpy()).max()
    err_a = np.abs((1 - np.asarray(tr)) - ra.detach().numpy()[..., 0]).max()
    assert err_c < 3e-6 and err_a < 3e-6, (err_c, err_a)  # measured 3.0e-7, 1.2e-7
    for k, g in zip(KEYS, grads, strict=True):
        rel = rel_error(g, leaves[k].grad.numpy())
        assert rel < 4e-6, (k, rel)  # measured at most 4.3e-7


@pytest.mark.oracle
def test_vectorised_torch_peer_matches_mirror():
    """The benchmarks' vectorised torch compositor composites exactly what the loop mirror does."""
    mirror = require_oracle("uika_jax.testing.gsplat_mirror")
    _, _, w, h, c = WIDE
    torch, t = _gsplat_inputs(wide_scene())
    bg = torch.tensor(np.random.default_rng(6).uniform(0, 1, (c, 3)).astype(np.float32))
    peer = functools.partial(mirror.composite_vectorised, max_elements=40_000)  # several groups
    results = []
    for fn in (mirror.composite, peer):
        leaves = [
            t[k].detach().clone().requires_grad_(True) for k in ("means2d", "conics", "col", "op")
        ]
        rc, ra = fn(*leaves, w, h, 16, t["offsets"], t["flat"], bg)
        (rc.sum() + (rc * rc).sum() + ra.sum()).backward()
        results.append([x.detach().numpy() for x in (rc, ra, *(x.grad for x in leaves))])
    assert results[0][1].max() > 0.9998  # pixels stopped at T <= 1e-4: the stop rule is exercised
    names = ("colour", "alpha", "means2d", "conics", "col", "op")
    for name, ref, vectorised in zip(names, *results, strict=True):
        rel = np.abs(vectorised - ref).max() / np.abs(ref).max()
        assert rel < 2e-6, (name, rel)  # measured at most 1.9e-7


# The float64 scene of the layout, finite-difference and tile-cap tests: 5 x 4 tiles (the last
# row partial) on two cameras, 160 Gaussians, capacity for 9 tiles each.
LAYOUT_C, LAYOUT_N, LAYOUT_W, LAYOUT_H = 2, 160, 80, 56


@functools.cache
def _layout_inputs(opaque_stack=True):
    """(m2, con, op, col, bins, wc, wt) in float64 (to be used under `jax.enable_x64`).

    opaque_stack: empty, short and long tiles, an opaque stack over the top-left tiles (its
      pixels terminate early); else faint Gaussians (opacity 0.05, no pixel terminates within
      a few dozen slots) covering every tile.
    """
    c, n, w, h, k = LAYOUT_C, LAYOUT_N, LAYOUT_W, LAYOUT_H, 40
    rng = np.random.default_rng(11 if opaque_stack else 4)
    a, cc = rng.uniform(0.005, 0.2, (2, c, n))
    b = rng.uniform(-0.5, 0.5, (c, n)) * np.sqrt(a * cc)
    if opaque_stack:
        m2 = rng.uniform(0, 40, (c, n, 2))
        op = rng.uniform(0.05, 0.95, (c, n))
        m2[:, :k] = rng.uniform(8, 24, (c, k, 2))
        a[:, :k], b[:, :k], cc[:, :k], op[:, :k] = 0.002, 0.0, 0.002, 0.99
        radii = rng.integers(4, 20, (c, n, 2))  # the right-most tile column stays empty
        radii[:, :k] = 24
    else:
        m2 = rng.uniform(0, (w, h), (c, n, 2))
        op = np.full((c, n), 0.05)
        radii = np.full((c, n, 2), 8)  # at most 2 x 2 tiles each
    depths = rng.uniform(1, 2, (c, n)).astype(np.float32)
    col = rng.uniform(0, 1, (c, n, 4))
    wc, wt = rng.normal(size=(c, h, w, 4)), rng.normal(size=(c, h, w))
    with jax.enable_x64(True):
        bins = bin_gaussians(
            jnp.asarray(m2), jnp.asarray(radii), jnp.asarray(depths), w, h, capacity=c * n * 9
        )
        assert int(bins.n_isects) <= c * n * 9
        arrays = [jnp.asarray(x) for x in (m2, np.stack([a, b, cc], -1), op, col, wc, wt)]
    return (*arrays[:4], bins, *arrays[4:])


@functools.cache
def _layout(lanes, block):
    """The reference compositor with this traversal layout (one object per layout)."""
    if lanes is None and block is None:
        return composite.composite
    return functools.partial(composite.composite, lanes=lanes, block=block)


@functools.cache
def _layout_result(tile_cap, lanes=None, block=None, opaque_stack=True):
    """Colour, T_final, truncated and the four gradients (float64, numpy) of a layout scene."""
    m2, con, op, col, bins, wc, wt = _layout_inputs(opaque_stack)
    with jax.enable_x64(True):
        (_, out), grads = composite_value_and_grad(
            m2, con, op, col, bins, wc, wt, compositor=_layout(lanes, block), width=LAYOUT_W,
            height=LAYOUT_H, tile_cap=tile_cap,
        )  # fmt: skip
    return [np.asarray(x) for x in (*out, *grads)]


def test_traversal_layout_does_not_change_results():
    """3 lanes (refilled from a queue of 40 tiles) of 5 slots a step, a tile cap of 11 cutting
    mid-block, against the default layout: equal to float64 rounding."""
    tile_cap = 11
    counts = np.asarray(_layout_inputs()[4].tile_count)
    ref = _layout_result(tile_cap)
    ours = _layout_result(tile_cap, lanes=3, block=5)
    assert (counts == 0).any() and counts.max() > 4 * composite.BLOCK
    assert ref[1].min() < 1e-3 and ref[1].max() == 1.0  # saturated and untouched pixels
    assert ref[2].any() and not ref[2].all()  # capped tiles with and without early exits
    np.testing.assert_array_equal(ours[2], ref[2])
    for x, y in zip(ours, ref, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_vjp_matches_finite_differences_float64():
    """Directional derivatives of the layout scene's loss (early termination included)."""
    m2, con, op, col, bins, wc, wt = _layout_inputs()
    args = [m2, con, op, col]
    grads = _layout_result(None)[3:]
    rng = np.random.default_rng(3)
    eps = 1e-8  # small: alpha >= 1/255 is a step, crossings must stay unlikely
    with jax.enable_x64(True):

        def f(*x):
            (value, _), _ = composite_value_and_grad(
                *x, bins, wc, wt, compositor=composite.composite, width=LAYOUT_W,
                height=LAYOUT_H,
            )  # fmt: skip
            return float(value)

        for i, (a, g) in enumerate(zip(args, grads, strict=True)):
            direction = rng.normal(size=a.shape)
            plus = [x if j != i else x + eps * direction for j, x in enumerate(args)]
            minus = [x if j != i else x - eps * direction for j, x in enumerate(args)]
            fd = (f(*plus) - f(*minus)) / (2 * eps)
            an = float(np.sum(g * direction))
            # measured at most 1.8e-7 (the rounding of f over eps)
            assert abs(fd - an) <= 2e-6 * max(1.0, abs(fd)), (KEYS[i], fd, an)


def test_tile_cap_truncation_is_reported():
    """Faint Gaussians: every pixel of a tile with more slots than the cap is truncated."""
    cap = 11
    counts = np.asarray(_layout_inputs(opaque_stack=False)[4].tile_count)
    full = _layout_result(None, opaque_stack=False)
    cut = _layout_result(cap, opaque_stack=False)
    assert not full[2].any()
    tiles_x, tiles_y = tile_grid(LAYOUT_W, LAYOUT_H, 16)
    over = (counts > cap).reshape(LAYOUT_C, tiles_y, tiles_x)
    over = np.repeat(np.repeat(over, 16, 1), 16, 2)[:, :LAYOUT_H, :LAYOUT_W]
    assert over.any() and not over.all()
    np.testing.assert_array_equal(cut[2], over)
    assert float(np.abs(full[0] - cut[0]).max()) > 1e-2


def test_segment_sum_sorted_matches_segment_sum():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.sort(rng.integers(0, 50, 1000)).astype(np.int32))
    vals = jnp.asarray(rng.normal(size=(1000, 4)).astype(np.float32))
    ours = jax.jit(composite.segment_sum_sorted, static_argnums=2)(vals, ids, 60)
    ref = jax.ops.segment_sum(vals, ids, num_segments=60)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert float(jnp.abs(ours[50:]).sum()) == 0.0
