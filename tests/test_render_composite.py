"""Tile compositor: the torch mirror of gsplat's CUDA forward, our forward, our custom VJP and
the independence of results from the traversal layout (lanes, block)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from render_oracle import composite_bruteforce, composite_torch, gsplat_project, random_scene

from uika_jax.render import binning, composite

# Jitted once per shape: eager calls would compile every small op separately.
_composite = jax.jit(composite.composite, static_argnums=(7, 8), static_argnames=("tile_cap",))
_bin = jax.jit(binning.bin_gaussians, static_argnums=(3, 4), static_argnames=("capacity",))


def _gsplat_inputs(scene, d=3):
    """gsplat's projection + binning of a scene: torch tensors, plus our Bins of them."""
    torch = require_oracle("torch")
    ti = require_oracle("gsplat.cuda._torch_impl")
    w, h = scene["width"], scene["height"]
    radii, means2d, depths, conics = gsplat_project(torch, ti, scene)
    tw, th = binning.tile_grid(w, h, 16)
    tpg, isect_ids, flat = ti._isect_tiles(means2d, radii, depths, 16, tw, th)
    offsets = ti._isect_offset_encode(isect_ids, means2d.shape[0], tw, th)
    c = means2d.shape[0]
    vis = (radii > 0).all(-1)
    op = torch.tensor(scene["opacities"])[None].expand(c, -1) * vis
    rng = np.random.default_rng(5)
    col = torch.tensor(rng.uniform(0, 1, (c, scene["means"].shape[0], d)).astype(np.float32))
    bins = _bin(
        jnp.asarray(means2d.numpy()),
        jnp.asarray(radii.numpy()),
        jnp.asarray(depths.numpy()),
        w,
        h,
        capacity=int(tpg.sum()),
    )
    t = {
        "means2d": means2d,
        "conics": conics,
        "op": op,
        "col": col,
        "offsets": offsets,
        "flat": flat,
        "radii": radii,
        "depths": depths,
    }
    return torch, t, bins


def _ours(t, bins, w, h, tile_cap=None):
    return _composite(
        jnp.asarray(t["means2d"].detach().numpy()),
        jnp.asarray(t["conics"].detach().numpy()),
        jnp.asarray(t["op"].detach().numpy()),
        jnp.asarray(t["col"].detach().numpy()),
        bins.flat_ids,
        bins.tile_start,
        bins.tile_count,
        w,
        h,
        tile_cap=tile_cap,
    )


@pytest.mark.oracle
def test_torch_mirror_matches_bruteforce():
    scene = random_scene(7, 120, 40, 29, 1)
    torch, t, _ = _gsplat_inputs(scene)
    rc, ra = composite_torch(
        torch, t["means2d"], t["conics"], t["col"], t["op"], 40, 29, 16, t["offsets"], t["flat"]
    )
    bc, ba = composite_bruteforce(
        *(t[k].numpy() for k in ("means2d", "conics", "col", "op", "radii", "depths")), 40, 29
    )
    assert ba.max() > 0.9
    np.testing.assert_allclose(rc.numpy(), bc, atol=2e-6)  # measured 1.7e-7
    np.testing.assert_allclose(ra.numpy(), ba, atol=2e-6)


@pytest.mark.oracle
@pytest.mark.parametrize("seed,n,w,h,c,d", [(1, 600, 128, 96, 3, 3), (2, 400, 70, 45, 2, 5)])
def test_forward_matches_mirror(seed, n, w, h, c, d):
    scene = random_scene(seed, n, w, h, c)
    torch, t, bins = _gsplat_inputs(scene, d)
    rc, ra = composite_torch(
        torch, t["means2d"], t["conics"], t["col"], t["op"], w, h, 16, t["offsets"], t["flat"]
    )
    acc, tr, truncated = _ours(t, bins, w, h)
    assert acc.shape == (c, h, w, d) and tr.shape == (c, h, w)
    assert not bool(truncated.any())
    err_c = np.abs(np.asarray(acc) - rc.numpy()).max()
    err_a = np.abs((1 - np.asarray(tr)) - ra.numpy()[..., 0]).max()
    assert err_c < 1e-5 and err_a < 1e-5, (err_c, err_a)  # measured 7.5e-7, 5.4e-7


@pytest.mark.oracle
def test_vjp_matches_torch_autograd():
    w, h = 70, 45
    scene = random_scene(2, 300, w, h, 2)
    torch, t, bins = _gsplat_inputs(scene, 3)
    leaves = {
        k: t[k].detach().clone().requires_grad_(True) for k in ("means2d", "conics", "op", "col")
    }
    rc, ra = composite_torch(
        torch,
        leaves["means2d"],
        leaves["conics"],
        leaves["col"],
        leaves["op"],
        w,
        h,
        16,
        t["offsets"],
        t["flat"],
    )
    rng = np.random.default_rng(0)
    wc = rng.normal(size=rc.shape).astype(np.float32)
    wa = rng.normal(size=(2, h, w)).astype(np.float32)
    loss = (rc * torch.tensor(wc)).sum() + ((1 - ra[..., 0]) * torch.tensor(wa)).sum()
    loss.backward()

    def f(m2, con, op, col):
        acc, tr, _ = composite.composite(
            m2, con, op, col, bins.flat_ids, bins.tile_start, bins.tile_count, w, h
        )
        return jnp.sum(acc * wc) + jnp.sum(tr * wa)

    args = [jnp.asarray(leaves[k].detach().numpy()) for k in ("means2d", "conics", "op", "col")]
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args)
    for k, g in zip(("means2d", "conics", "op", "col"), grads, strict=True):
        ref = leaves[k].grad.numpy()
        rel = np.linalg.norm(np.asarray(g) - ref) / np.linalg.norm(ref)
        assert rel < 4e-6, (k, rel)  # measured at most 3.9e-7


def test_vjp_matches_finite_differences_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        c, n, w, h = 1, 40, 37, 21
        m2 = jnp.asarray(rng.uniform(0, 37, (c, n, 2)))
        con = jnp.asarray(
            np.stack(
                [
                    rng.uniform(0.01, 0.1, (c, n)),
                    rng.uniform(-0.005, 0.005, (c, n)),
                    rng.uniform(0.01, 0.1, (c, n)),
                ],
                -1,
            )
        )
        op = jnp.asarray(rng.uniform(0.1, 0.9, (c, n)))
        col = jnp.asarray(rng.uniform(0, 1, (c, n, 3)))
        radii = jnp.full((c, n, 2), 20, jnp.int32)
        depths = jnp.asarray(rng.uniform(1, 2, (c, n)).astype(np.float32))
        bins = _bin(m2, radii, depths, w, h, capacity=c * n * 6)
        wc = jnp.asarray(rng.normal(size=(c, h, w, 3)))
        wt = jnp.asarray(rng.normal(size=(c, h, w)))

        @jax.jit
        def f(m2, con, op, col):
            acc, tr, _ = composite.composite(
                m2, con, op, col, bins.flat_ids, bins.tile_start, bins.tile_count, w, h
            )
            return jnp.sum(acc * wc) + jnp.sum(tr * wt)

        args = [m2, con, op, col]
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args)
        eps = 1e-8  # small: alpha >= 1/255 is a step, crossings must stay unlikely
        for i, (a, g) in enumerate(zip(args, grads, strict=True)):
            direction = jnp.asarray(rng.normal(size=a.shape))
            plus = [x if j != i else x + eps * direction for j, x in enumerate(args)]
            minus = [x if j != i else x - eps * direction for j, x in enumerate(args)]
            fd = (f(*plus) - f(*minus)) / (2 * eps)
            an = jnp.sum(g * direction)
            # measured at most 5.5e-7 (the rounding of f over eps)
            assert abs(float(fd - an)) <= 5e-6 * max(1.0, abs(float(fd))), (i, fd, an)


def _layout_case(tile_cap, lanes=None, block=composite.BLOCK):
    """Colour, T_final, truncated and gradients (float64) of a scene with empty, short and long
    tiles on two cameras, an opaque stack over the top-left tiles (they terminate early)."""
    rng = np.random.default_rng(11)
    c, n, w, h, k = 2, 160, 80, 56, 40  # 5 x 4 tiles, the last row partial
    m2 = rng.uniform(0, 40, (c, n, 2))
    a, cc = rng.uniform(0.005, 0.2, (2, c, n))
    b = rng.uniform(-0.5, 0.5, (c, n)) * np.sqrt(a * cc)
    op = rng.uniform(0.05, 0.95, (c, n))
    m2[:, :k] = rng.uniform(8, 24, (c, k, 2))
    a[:, :k], b[:, :k], cc[:, :k], op[:, :k] = 0.002, 0.0, 0.002, 0.99
    radii = rng.integers(4, 20, (c, n, 2))  # the right-most tile column stays empty
    radii[:, :k] = 24
    depths = rng.uniform(1, 2, (c, n)).astype(np.float32)
    col = rng.uniform(0, 1, (c, n, 4))
    wc, wt = rng.normal(size=(c, h, w, 4)), rng.normal(size=(c, h, w))
    with jax.enable_x64(True):
        bins = _bin(
            jnp.asarray(m2), jnp.asarray(radii), jnp.asarray(depths), w, h, capacity=c * n * 9
        )
        assert int(bins.n_isects) <= c * n * 9

        def loss(m2, con, op, col):
            out = composite.composite(
                m2, con, op, col, bins.flat_ids, bins.tile_start, bins.tile_count, w, h,
                tile_cap=tile_cap, lanes=lanes, block=block,
            )  # fmt: skip
            return jnp.sum(out[0] * wc) + jnp.sum(out[1] * wt), out

        args = [jnp.asarray(x) for x in (m2, np.stack([a, b, cc], -1), op, col)]
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
        (_, out), grads = grad(*args)
        return np.asarray(bins.tile_count), [np.asarray(x) for x in (*out, *grads)]


@pytest.mark.parametrize("lanes,block,tile_cap", [(1, 1, None), (3, 5, None), (2, 3, 11)])
def test_traversal_layout_does_not_change_results(lanes, block, tile_cap):
    counts, ref = _layout_case(tile_cap)
    _, ours = _layout_case(tile_cap, lanes, block)
    assert (counts == 0).any() and counts.max() > 4 * composite.BLOCK
    assert ref[1].min() < 1e-3 and ref[1].max() == 1.0  # saturated and untouched pixels
    assert ref[2].any() == (tile_cap is not None)
    np.testing.assert_array_equal(ours[2], ref[2])
    for x, y in zip(ours, ref, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_tile_cap_truncation_is_reported():
    rng = np.random.default_rng(4)
    c, n, w, h = 1, 200, 32, 32
    m2 = jnp.asarray(rng.uniform(0, 32, (c, n, 2)).astype(np.float32))
    con = jnp.tile(jnp.array([0.02, 0.0, 0.02], jnp.float32), (c, n, 1))
    op = jnp.full((c, n), 0.05, jnp.float32)
    col = jnp.ones((c, n, 3), jnp.float32)
    radii = jnp.full((c, n, 2), 40, jnp.int32)
    depths = jnp.asarray(rng.uniform(1, 2, (c, n)).astype(np.float32))
    bins = _bin(m2, radii, depths, w, h, capacity=c * n * 4)
    full = _composite(m2, con, op, col, bins.flat_ids, bins.tile_start, bins.tile_count, w, h)
    cut = _composite(
        m2, con, op, col, bins.flat_ids, bins.tile_start, bins.tile_count, w, h, tile_cap=50
    )
    assert not bool(full[2].any())
    assert int(cut[2].sum()) == w * h  # low opacity: no pixel terminates within 50
    assert float(jnp.abs(full[0] - cut[0]).max()) > 1e-2


def test_segment_sum_sorted_matches_segment_sum():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.sort(rng.integers(0, 50, 1000)).astype(np.int32))
    vals = jnp.asarray(rng.normal(size=(1000, 4)).astype(np.float32))
    ours = jax.jit(composite.segment_sum_sorted, static_argnums=2)(vals, ids, 60)
    ref = jax.ops.segment_sum(vals, ids, num_segments=60)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert float(jnp.abs(ours[50:]).sum()) == 0.0
