"""Rasterizer precision and boundaries: float32 projection of bfloat16 Gaussians, and the
near/far planes (kept exactly at either plane, as gsplat's CUDA projection does)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from render_oracle import random_scene

from uika_jax.render import rasterization

KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
W, H = 40, 30
# Every random_scene the torch-oracle tests render (seed, n, width, height, cameras).
ORACLE_SCENES = [
    (0, 300, 70, 45, 2), (1, 600, 128, 96, 3), (2, 400, 70, 45, 2), (3, 150, 40, 70, 1),
    (2, 300, 70, 45, 2), (5, 40, 37, 21, 2), (7, 120, 40, 29, 1), (1, 500, 128, 96, 3),
    (2, 200, 50, 37, 1), (1, 200, 64, 48, 2),
]  # fmt: skip


def test_bfloat16_means_are_projected_in_float32():
    scene = random_scene(11, 120, W, H, 2)
    args = [jnp.asarray(scene[k]) for k in KEYS]
    means16 = args[0].astype(jnp.bfloat16)
    r16, a16, m16 = rasterization(means16, *args[1:], W, H)
    # The same values in float32: the input rounding is the only difference left.
    r32, a32, m32 = rasterization(means16.astype(jnp.float32), *args[1:], W, H)
    assert r16.dtype == a16.dtype == m16["means2d"].dtype == jnp.float32
    np.testing.assert_array_equal(m16["means2d"], m32["means2d"])
    np.testing.assert_array_equal(r16, r32)
    np.testing.assert_array_equal(a16, a32)


def test_bfloat16_gaussians_get_bfloat16_gradients():
    scene = random_scene(11, 120, W, H, 2)
    args = [jnp.asarray(scene[k]) for k in KEYS]
    bf16 = [a.astype(jnp.bfloat16) for a in args[:5]]

    def loss(means, colors):
        render, alphas, _ = rasterization(means, *bf16[1:4], colors, *args[5:], W, H)
        return jnp.sum(render) + jnp.sum(alphas)

    g_means, g_colors = jax.jit(jax.grad(loss, argnums=(0, 1)))(bf16[0], bf16[4])
    assert g_means.dtype == g_colors.dtype == jnp.bfloat16
    f32 = jax.jit(jax.grad(loss, argnums=(0, 1)))(bf16[0].astype(jnp.float32), bf16[4])
    # The float32 computation's gradient, rounded once (measured: bitwise equal).
    assert float(jnp.abs(f32[0]).max()) > 1.0
    np.testing.assert_array_equal(g_means, f32[0].astype(jnp.bfloat16))
    np.testing.assert_array_equal(g_colors, f32[1])


def _one_gaussian_per_depth(depths):
    n = len(depths)
    means = np.zeros((n, 3), np.float32)
    means[:, 2] = depths
    ks = np.array([[[50.0, 0, 20], [0, 50, 15], [0, 0, 1]]], np.float32)
    return [
        jnp.asarray(means),
        jnp.tile(jnp.array([[1.0, 0, 0, 0]]), (n, 1)),
        jnp.full((n, 3), 1e-4),
        jnp.full((n,), 0.9),
        jnp.ones((n, 3)),
        jnp.eye(4)[None],
        jnp.asarray(ks),
    ]


@pytest.mark.parametrize("near,far", [(0.5, 4.0), (0.01, 1e10)])  # and the defaults
def test_depths_exactly_on_the_planes_are_kept(near, far):
    near32, far32 = np.float32(near), np.float32(far)
    depths = np.array(
        [near32, far32, np.nextafter(near32, 0), np.nextafter(far32, np.inf), 2.0], np.float32
    )
    args = _one_gaussian_per_depth(depths)
    _, alphas, meta = rasterization(*args, W, H, near_plane=near, far_plane=far)
    kept = np.asarray(meta["radii"])[0, :, 0] > 0
    np.testing.assert_array_equal(kept, [True, True, False, False, True])
    np.testing.assert_array_equal(np.asarray(meta["depths"])[0], depths)
    assert float(alphas[0, 15, 20, 0]) > 0.5


def test_oracle_scenes_stay_off_the_planes():
    """gsplat's torch projection (the oracle) culls depths equal to a plane, its CUDA kernel
    and ours keep them: no oracle scene has a depth within float32 reach of a plane."""
    for seed, n, w, h, c in ORACLE_SCENES:
        s = random_scene(seed, n, w, h, c)
        view = s["viewmats"].astype(np.float64)
        depths = s["means"].astype(np.float64) @ view[:, 2, :3].T + view[:, 2, 3]
        assert np.abs(depths - 0.01).min() > 1e-6, (seed, n)
        assert np.abs(depths - 1e10).min() > 1e3, (seed, n)
