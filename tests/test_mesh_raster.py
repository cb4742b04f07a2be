"""Tests for the z-buffer triangle rasterizer (uika_jax.render.mesh_raster)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uika_jax.render.camera import framing_camera, project, world_to_camera
from uika_jax.render.mesh_raster import interpolate, needed_capacity, rasterize_triangles
from uika_jax.synthetic.head import synthetic_layout
from uika_jax.testing import mesh_oracle


def brute_force_inside(tri: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-pixel edge test in float64: centre inside or on an edge, either winding."""
    x = np.arange(width) + 0.5
    y = np.arange(height) + 0.5
    px, py = np.meshgrid(x, y)
    w = []
    for k in range(3):
        a, b = tri[(k + 1) % 3], tri[(k + 2) % 3]
        w.append((b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0]))
    w = np.stack(w)
    return np.all(w >= 0, axis=0) | np.all(w <= 0, axis=0)


def flat(corners) -> tuple[np.ndarray, np.ndarray]:
    corners = np.asarray(corners, np.float32)
    return corners, np.ones(corners.shape[:2], np.float32)


@pytest.mark.parametrize("winding", [1, -1])
def test_single_triangle_matches_brute_force_including_edges(winding):
    # Dyadic corners: edge functions are exact, and several pixel centres lie exactly on edges.
    tri = np.array([[1.5, 0.5], [13.5, 4.5], [3.5, 10.5]], np.float32)[::winding]
    corners, depth = flat(tri[None])
    frags = rasterize_triangles(corners, depth, 12, 16)
    expected = brute_force_inside(tri.astype(np.float64), 12, 16)
    np.testing.assert_array_equal(np.asarray(frags.mask), expected)
    np.testing.assert_array_equal(np.asarray(frags.triangle_id), np.where(expected, 0, -1))
    assert int(frags.overflow) == 0
    # Barycentrics reproduce the pixel centres; depth 1 everywhere covered.
    bary = np.asarray(frags.barycentrics)
    centres = np.stack(np.meshgrid(np.arange(16) + 0.5, np.arange(12) + 0.5), -1)
    np.testing.assert_allclose((bary @ tri)[expected], centres[expected], atol=1e-4)
    assert np.all(bary[expected] >= 0)
    np.testing.assert_allclose(bary.sum(-1)[expected], 1.0, atol=1e-6)
    assert np.all(bary[~expected] == 0)
    np.testing.assert_allclose(np.asarray(frags.depth)[expected], 1.0, rtol=1e-6)
    assert np.all(np.isinf(np.asarray(frags.depth)[~expected]))


def test_random_triangles_match_brute_force():
    rng = np.random.default_rng(0)
    height, width = 20, 24
    for _ in range(10):
        tri = rng.uniform([-5, -5], [width + 5, height + 5], size=(3, 2)).astype(np.float32)
        corners, depth = flat(tri[None])
        frags = rasterize_triangles(corners, depth, height, width)
        expected = brute_force_inside(tri.astype(np.float64), height, width)
        np.testing.assert_array_equal(np.asarray(frags.mask), expected)


def test_two_triangles_cover_the_image_and_ties_go_to_the_smaller_id():
    size = 10
    quad = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    corners, depth = flat(quad[[[0, 1, 2], [0, 2, 3]]])
    frags = rasterize_triangles(corners, depth, size, size)
    tid = np.asarray(frags.triangle_id)
    assert np.all(np.asarray(frags.mask))
    i, j = np.mgrid[:size, :size]
    # Triangle 0 is above the diagonal; the diagonal's centres lie on the shared edge.
    np.testing.assert_array_equal(tid, np.where(j >= i, 0, 1))
    swapped = rasterize_triangles(corners[::-1], depth, size, size)
    np.testing.assert_array_equal(np.asarray(swapped.triangle_id), np.where(j > i, 1, 0))


def test_shared_edges_leave_no_cracks():
    rng = np.random.default_rng(1)
    # A jittered grid mesh covering the image generously: every pixel must be covered.
    n, size = 8, 32
    grid = np.stack(np.meshgrid(np.linspace(-2, size + 2, n), np.linspace(-2, size + 2, n)), -1)
    grid[1:-1, 1:-1] += rng.uniform(-1.5, 1.5, size=(n - 2, n - 2, 2))
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    faces = np.concatenate([np.stack([a, b, c], -1), np.stack([a, c, d], -1)]).reshape(-1, 3)
    corners, depth = flat(grid.reshape(-1, 2)[faces])
    frags = rasterize_triangles(corners, depth, size, size)
    assert np.all(np.asarray(frags.mask))
    assert_matches_oracle(frags, corners, depth, size, size)


def plane_camera():
    focal, height, width = 40.0, 24, 32
    K = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float64)
    # A slanted plane X(s, t) = origin + s * a + t * b, (s, t) in [0, 1]^2.
    origin = np.array([-0.6, -0.5, 1.0])
    a = np.array([1.4, 0.0, 1.5])
    b = np.array([0.0, 1.1, 0.4])
    return K, height, width, origin, a, b


def test_perspective_correct_depth_and_attributes_on_a_slanted_plane():
    K, height, width, origin, a, b = plane_camera()
    st = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float64)
    points = origin + st[:, :1] * a + st[:, 1:] * b
    pix = points @ K.T
    pix = pix[:, :2] / pix[:, 2:]
    tris = np.array([[0, 1, 2], [0, 2, 3]])
    frags = rasterize_triangles(
        pix[tris].astype(np.float32), points[tris][..., 2].astype(np.float32), height, width
    )
    mask = np.asarray(frags.mask)
    assert mask.mean() > 0.5
    st_img = np.asarray(interpolate(frags, jnp.asarray(st[tris], jnp.float32)))

    # Closed form: the ray through each pixel centre meets the plane at lam * ray (ray_z = 1).
    x, y = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.stack([x, y, np.ones_like(x)], -1) @ np.linalg.inv(K).T
    solution = np.linalg.solve(
        np.stack([np.broadcast_to(a, rays.shape), np.broadcast_to(b, rays.shape), -rays], -1),
        -np.broadcast_to(origin, rays.shape)[..., None],
    )[..., 0]
    inside = np.all((solution[..., :2] >= 0) & (solution[..., :2] <= 1), axis=-1)
    np.testing.assert_array_equal(mask, inside)
    np.testing.assert_allclose(np.asarray(frags.depth)[mask], solution[..., 2][mask], rtol=1e-5)
    np.testing.assert_allclose(st_img[mask], solution[..., :2][mask], atol=1e-5)
    # Plain screen-space interpolation would be visibly wrong on this plane.
    assert np.abs(st_img[mask] - solution[..., :2][mask]).max() < 1e-3


def test_nearest_triangle_wins_regardless_of_order():
    size = 16
    big = np.array([[1, 1], [15, 2], [4, 15]], np.float32)
    small = np.array([[3, 3], [12, 4], [6, 12]], np.float32)
    big_mask = brute_force_inside(big.astype(np.float64), size, size)
    small_mask = brute_force_inside(small.astype(np.float64), size, size)
    corners = np.stack([big, small])
    for big_depth, small_depth in [(3.0, 2.0), (2.0, 3.0)]:
        depth = np.array([[big_depth] * 3, [small_depth] * 3], np.float32)
        if small_depth < big_depth:
            expected = np.where(small_mask, 1, np.where(big_mask, 0, -1))
        else:
            expected = np.where(big_mask, 0, np.where(small_mask, 1, -1))
        frags = rasterize_triangles(corners, depth, size, size)
        np.testing.assert_array_equal(np.asarray(frags.triangle_id), expected)
        swapped = rasterize_triangles(corners[::-1], depth[::-1], size, size)
        np.testing.assert_array_equal(
            np.asarray(swapped.triangle_id), np.where(expected >= 0, 1 - expected, -1)
        )
        np.testing.assert_array_equal(np.asarray(swapped.depth), np.asarray(frags.depth))


def test_interpenetrating_triangles_resolve_per_pixel():
    size = 20
    tri = np.array([[0, 0], [20, 0], [10, 20]], np.float32)
    corners = np.stack([tri, tri])
    depth = np.array([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0]], np.float32)
    frags = rasterize_triangles(corners, depth, size, size)
    mask = brute_force_inside(tri.astype(np.float64), size, size)
    np.testing.assert_array_equal(np.asarray(frags.mask), mask)
    # 1/z is affine on screen: 1 - x/30 - y/120 for triangle 0, the mirror image for
    # triangle 1, so triangle 0 is nearer exactly left of x = 10.
    x = np.arange(size) + 0.5
    expected = np.broadcast_to(np.where(x < 10, 0, 1), (size, size))
    np.testing.assert_array_equal(np.asarray(frags.triangle_id)[mask], expected[mask])
    y = (np.arange(size) + 0.5)[:, None]
    inv_depth = np.maximum(1 - x / 30 - y / 120, 1 - (20 - x) / 30 - y / 120)
    np.testing.assert_allclose(np.asarray(frags.depth)[mask], (1 / inv_depth)[mask], rtol=1e-5)


def test_overflow_counts_exactly_the_clipped_triangles():
    size = 48
    tris = np.array(
        [
            [[1, 1], [4, 1], [1, 4]],  # 3 x 3 box: 9 slots
            [[-50, -50], [-20, -50], [-50, -20]],  # off-screen: culled, no slots
            [[0, 10], [30, 12], [3, 35]],  # 30 x 25 box: 750 slots
            [[0, 0], [30, 30], [15, 15]],  # zero area: culled, no slots
            [[20, 2], [47, 3], [21, 6]],  # 27 x 4 box: 108 slots
        ],
        np.float32,
    )
    corners, depth = flat(tris)
    assert needed_capacity(corners, depth, size, size) == 9 + 750 + 108
    capacity = 9 + 400
    frags = rasterize_triangles(corners, depth, size, size, capacity=capacity)
    assert int(frags.overflow) == 2
    assert int(rasterize_triangles(corners, depth, size, size).overflow) == 0
    # Boxes take slots in triangle order, row-major: triangle 2 keeps its first 400 box
    # pixels, triangle 4 none.
    tid = np.asarray(frags.triangle_id)
    rows, cols = np.mgrid[:size, :size]
    box_rank = (rows - 10) * 30 + cols
    covered = [brute_force_inside(t.astype(np.float64), size, size) for t in tris]
    np.testing.assert_array_equal(tid == 0, covered[0])
    np.testing.assert_array_equal(tid == 2, covered[2] & (box_rank < 400))
    assert not np.any(tid == 4)
    # Near-culled triangles take no slots: triangle 2 behind the camera leaves room for 4.
    depth_behind = depth.copy()
    depth_behind[2, 0] = -1.0
    behind = rasterize_triangles(corners, depth_behind, size, size, capacity=capacity)
    assert int(behind.overflow) == 0
    np.testing.assert_array_equal(np.asarray(behind.triangle_id) == 4, covered[4])


def test_needed_capacity():
    corners, depth = flat([[[0.2, 0.2], [10.7, 0.2], [0.2, 3.9]]])
    assert needed_capacity(corners, depth, 32, 32) == 11 * 4
    assert needed_capacity(corners, depth, 5, 5) == 5 * 4  # clipped to the image
    batch = np.stack([corners, corners * 2])
    assert needed_capacity(batch, np.stack([depth, depth]), 32, 32) == 21 * 8
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(lambda c: needed_capacity(c, depth, 8, 8))(corners)


def test_jit_vmap_and_batch_match_eager():
    rng = np.random.default_rng(2)
    corners = rng.uniform(0, 16, size=(12, 3, 2)).astype(np.float32)
    depth = rng.uniform(1, 2, size=(2, 12, 3)).astype(np.float32)
    depth[1, ::2, 0] = -1.0  # frame 1: every other triangle behind the camera
    eager = [rasterize_triangles(corners, d, 16, 16) for d in depth]
    capacity = needed_capacity(corners, depth[0], 16, 16)
    assert needed_capacity(np.stack([corners, corners]), depth, 16, 16) == capacity
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(lambda c, d: rasterize_triangles(c, d, 16, 16))(corners, depth[0])
    batched = jax.jit(
        jax.vmap(lambda d: rasterize_triangles(corners, d, 16, 16, capacity=capacity))
    )(depth)
    # The batched path with one slot too few for frame 0: only frame 0 overflows, by the
    # last triangle's last box pixel.
    native = rasterize_triangles(np.stack([corners, corners]), depth, 16, 16, capacity=capacity - 1)
    assert native.triangle_id.shape == (2, 16, 16)
    np.testing.assert_array_equal(batched.overflow, [0, 0])
    np.testing.assert_array_equal(native.overflow, [1, 0])
    for frame in range(2):
        for field in ("triangle_id", "barycentrics", "depth"):
            expected = getattr(eager[frame], field)
            np.testing.assert_array_equal(getattr(batched, field)[frame], expected)
            if frame == 1:
                np.testing.assert_array_equal(getattr(native, field)[frame], expected)
    differs = np.asarray(native.triangle_id[0]) != np.asarray(eager[0].triangle_id)
    assert differs.sum() <= 1


def test_ties_go_to_the_smallest_id():
    rng = np.random.default_rng(3)
    corners = rng.uniform(-2, 26, size=(40, 3, 2)).astype(np.float32)
    # Equal depths everywhere: overlaps are pure ties, resolved by the smallest id.
    depth = np.ones((40, 3), np.float32)
    depth[::3] = 0.5
    frags = rasterize_triangles(corners, depth, 24, 24)
    covered = np.stack([brute_force_inside(t.astype(np.float64), 24, 24) for t in corners])
    score = np.where(covered, depth[:, :1, None], np.inf)
    winner = np.argmax(score == score.min(0), axis=0)  # the first (smallest) id at min depth
    expected = np.where(covered.any(0), winner, -1)
    np.testing.assert_array_equal(np.asarray(frags.triangle_id), expected)


def assert_matches_oracle(frags, corners, depth, height, width):
    """Same visible triangles as the numpy oracle; depth and barycentrics to float32 precision."""
    expected = mesh_oracle.rasterize(corners, depth, height, width)
    np.testing.assert_array_equal(np.asarray(frags.triangle_id), expected.triangle_id)
    mask = expected.mask
    np.testing.assert_allclose(np.asarray(frags.depth)[mask], expected.depth[mask], rtol=2e-6)
    assert np.all(np.isinf(np.asarray(frags.depth)[~mask]))
    np.testing.assert_allclose(
        np.asarray(frags.barycentrics)[mask], expected.barycentrics[mask], atol=2e-5
    )


def hard_triangles() -> tuple[np.ndarray, np.ndarray]:
    """A random perspective soup plus degenerate, edge-on, behind-camera and off-screen cases."""
    rng = np.random.default_rng(5)
    corners = rng.uniform(-4, 36, size=(60, 3, 2))
    depth = rng.uniform(0.5, 4.0, size=(60, 3))
    cases = [
        ([[2, 2], [12, 7], [22, 12]], [1, 1, 1]),  # collinear: zero area
        ([[5, 5], [5, 5], [20, 9]], [1, 1, 1]),  # repeated corner
        ([[0.5, 3.5], [30.5, 3.5001], [15.5, 3.5]], [1, 1, 1]),  # edge-on sliver on pixel centres
        ([[3, 20], [28, 21], [10, 30]], [-1, 2, 2]),  # a corner behind the camera
        ([[3, 3], [28, 4], [10, 13]], [0, 0.5, 0.5]),  # a corner on the camera plane
        ([[40, 40], [60, 41], [45, 60]], [1, 1, 1]),  # off-screen
        ([[-100, -100], [200, -100], [-100, 200]], [9, 9, 9]),  # covers everything, far
        ([[np.nan, 3], [9, 3], [3, 9]], [1, 1, 1]),  # not finite
        ([[4, 4], [20, 4], [4, 20]], [np.inf, 1, 1]),  # infinite depth
    ]
    extra_corners, extra_depth = (np.array(a, np.float64) for a in zip(*cases, strict=True))
    corners = np.concatenate([corners, extra_corners]).astype(np.float32)
    return corners, np.concatenate([depth, extra_depth]).astype(np.float32)


def test_parity_with_numpy_oracle_on_hard_triangles():
    corners, depth = hard_triangles()
    height, width = 30, 34
    frags = rasterize_triangles(corners, depth, height, width)
    assert_matches_oracle(frags, corners, depth, height, width)
    tid = np.asarray(frags.triangle_id)
    assert np.all(np.asarray(frags.mask)) and np.any(tid == 66)  # the far cover shows through
    assert not np.any(np.isin(tid, [60, 61, 63, 64, 65, 67, 68]))  # culled or off-screen


def test_parity_with_numpy_oracle_on_the_synthetic_head():
    # The synthetic head's rest shape framed as the synthetic views frame it: frontal and a
    # profile view (many edge-on faces at the silhouette), rasterized as one batch.
    layout, vertices = synthetic_layout()
    size = 64
    cameras = [framing_camera(np.array([0.0, 0.01, 0.0]), 0.23, size, yaw) for yaw in (0.0, 80.0)]
    viewmats, Ks = (jnp.asarray(np.stack(a), jnp.float32) for a in zip(*cameras, strict=True))
    camera = jax.vmap(world_to_camera, in_axes=(None, 0))(jnp.asarray(vertices), viewmats)
    corners = np.asarray(jax.vmap(project)(camera, Ks))[:, layout.faces]
    depth = np.asarray(camera[..., 2])[:, layout.faces]
    frags = rasterize_triangles(corners, depth, size, size)
    assert frags.triangle_id.shape == (2, size, size)
    for view in range(2):
        view_frags = jax.tree.map(lambda a, view=view: a[view], frags)
        assert_matches_oracle(view_frags, corners[view], depth[view], size, size)
        assert 0.2 < np.mean(np.asarray(view_frags.mask)) < 0.8


def test_culling_and_empty_input():
    corners, depth = flat([[[1, 1], [9, 1], [1, 9]]])
    assert not np.any(np.asarray(rasterize_triangles(corners, -depth, 10, 10).mask))
    nan = corners.copy()
    nan[0, 0, 0] = np.nan
    assert not np.any(np.asarray(rasterize_triangles(nan, depth, 10, 10).mask))
    empty = rasterize_triangles(np.zeros((0, 3, 2)), np.zeros((0, 3)), 4, 5)
    assert empty.triangle_id.shape == (4, 5) and not np.any(np.asarray(empty.mask))
    with pytest.raises(ValueError, match="corner_depth has shape"):
        rasterize_triangles(corners, depth[:, :2], 10, 10)
    with pytest.raises(ValueError, match="capacity must be"):
        rasterize_triangles(corners, depth, 10, 10, capacity=0)
    with pytest.raises(ValueError, match="int32 indices"):
        rasterize_triangles(np.zeros((3, 1, 3, 2)), np.ones((3, 1, 3)), 8, 8, capacity=2**30)


def test_barycentric_gradients_are_finite():
    corners, _ = flat([[[1, 1], [9, 2], [2, 8]]])

    def loss(c, d):
        frags = rasterize_triangles(c, d, 10, 10, capacity=100)
        attr = jnp.arange(9.0).reshape(1, 3, 3)
        return jnp.sum(interpolate(frags, attr)) + jnp.sum(jnp.where(frags.mask, frags.depth, 0))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(corners), jnp.full((1, 3), 2.0))
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
