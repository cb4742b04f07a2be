"""Rasterizer precision and boundaries: float32 projection of bfloat16 Gaussians, the near/far
planes (kept exactly at either plane, as gsplat's CUDA projection does), zero scales as
eps2d points."""

import jax.numpy as jnp
import numpy as np
import pytest
from raster_cases import (
    ORACLE_SCENES,
    WIDE,
    loss_weights,
    render_value_and_grad,
    scene_arrays,
    wide_scene,
)
from render_oracle import random_scene

from uika_jax.render import rasterization

_, _, W, H, C = WIDE


def test_bfloat16_means_are_projected_in_float32():
    args = scene_arrays(wide_scene())
    means16 = args[0].astype(jnp.bfloat16)
    r16, a16, m16 = rasterization(means16, *args[1:], W, H)
    # The same values in float32: the input rounding is the only difference left.
    r32, a32, m32 = rasterization(means16.astype(jnp.float32), *args[1:], W, H)
    assert r16.dtype == a16.dtype == m16["means2d"].dtype == jnp.float32
    np.testing.assert_array_equal(m16["means2d"], m32["means2d"])
    np.testing.assert_array_equal(r16, r32)
    np.testing.assert_array_equal(a16, a32)


def test_bfloat16_gaussians_get_bfloat16_gradients():
    """Each gradient is the float32 computation's on the same values, rounded once: bitwise
    but where the two programs' float32 roundings straddle a bfloat16 step (measured: 1 element
    of 4,200, 1.5e-6 of its array's largest, the float32 values 5.4e-8 of that apart)."""
    args = scene_arrays(wide_scene())
    bf16 = [x.astype(jnp.bfloat16) for x in (*args[:5], jnp.zeros((C, 3)))]
    weights = loss_weights(0, (C, H, W), 4)
    _, grads = render_value_and_grad(*bf16, *args[5:], *weights, width=W, height=H)
    f32 = [x.astype(jnp.float32) for x in bf16]
    _, ref = render_value_and_grad(*f32, *args[5:], *weights, width=W, height=H)
    assert float(jnp.abs(ref[0]).max()) > 1.0
    same = 0
    for g, r in zip(grads, ref, strict=True):
        assert g.dtype == jnp.bfloat16
        g, rounded = np.asarray(g, np.float32), np.asarray(r.astype(jnp.bfloat16), np.float32)
        same += int((g == rounded).sum())
        scale = float(np.abs(rounded).max())
        np.testing.assert_allclose(g, rounded, rtol=2**-7, atol=5e-7 * scale)
    assert same >= 0.999 * sum(g.size for g in grads)


def _points_at_depths(depths):
    """Zero-scale Gaussians, opacity 0.8, on the optical axis of a 40 x 30 camera."""
    n = len(depths)
    means = np.zeros((n, 3), np.float32)
    means[:, 2] = depths
    ks = np.array([[[50.0, 0, 20], [0, 50, 15], [0, 0, 1]]], np.float32)
    return [
        jnp.asarray(means),
        jnp.tile(jnp.array([[1.0, 0, 0, 0]]), (n, 1)),
        jnp.zeros((n, 3)),
        jnp.full((n,), 0.8),
        jnp.ones((n, 3)),
        jnp.eye(4)[None],
        jnp.asarray(ks),
    ]


@pytest.mark.parametrize("near,far", [(0.5, 4.0), (0.01, 1e10)])  # and the defaults
def test_depths_exactly_on_the_planes_are_kept_as_eps2d_points(near, far):
    near32, far32 = np.float32(near), np.float32(far)
    depths = np.array(
        [near32, far32, np.nextafter(near32, 0), np.nextafter(far32, np.inf), 2.0], np.float32
    )
    args = _points_at_depths(depths)
    _, alphas, meta = rasterization(*args, 40, 30, near_plane=near, far_plane=far)
    radii = np.asarray(meta["radii"])[0]
    np.testing.assert_array_equal(radii[:, 0] > 0, [True, True, False, False, True])
    np.testing.assert_array_equal(np.asarray(meta["depths"])[0], depths)
    # Zero scale: cov = eps2d I = 0.3 I at any depth, radius ceil(3.33 sqrt(0.3)) = 2. The
    # three kept points are centred at (20, 15): the centre of pixel (14, 19) is 0.5 px off in
    # x and y.
    assert (radii[[0, 1, 4]] == 2).all()
    one = 0.8 * np.exp(-0.5 * 0.5 / 0.3)
    # Measured 5.9e-8 off.
    assert np.allclose(float(alphas[0, 14, 19, 0]), 1 - (1 - one) ** 3, rtol=0, atol=6e-7)


def test_oracle_scenes_stay_off_the_planes():
    """gsplat's torch projection (the oracle) culls depths equal to a plane, its CUDA kernel
    and ours keep them: no oracle scene has a depth within float32 reach of a plane."""
    for seed, n, w, h, c in ORACLE_SCENES:
        s = random_scene(seed, n, w, h, c)
        view = s["viewmats"].astype(np.float64)
        depths = s["means"].astype(np.float64) @ view[:, 2, :3].T + view[:, 2, 3]
        assert np.abs(depths - 0.01).min() > 1e-6, (seed, n)
        assert np.abs(depths - 1e10).min() > 1e3, (seed, n)
