"""Gaussian scales: the soft cap (values, gradients vs finite differences), the init from the
anchor spacing, and `GaussianHeadConfig.from_config`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uika_jax.models.gaussians import (
    GaussianHead,
    GaussianHeadConfig,
    mean_anchor_spacing,
    soft_cap_log_scale,
)
from uika_jax.render.camera import focal_from_fov, intrinsics, look_at
from uika_jax.render.capacity import scene_counts

MAX_SCALE = 0.01


def test_soft_cap_values_and_gradient_across_the_cap():
    """Below the cap log s ~ v, above it log s -> log m from below; d/dv > 0 and matches
    central differences (float64) from 8 nats below to 8 nats above the cap."""
    log_max = math.log(MAX_SCALE)
    v = np.linspace(log_max - 8.0, log_max + 8.0, 33)
    with jax.enable_x64(True):
        log_s = np.asarray(soft_cap_log_scale(jnp.asarray(v), MAX_SCALE))
        grad = np.asarray(jax.vmap(jax.grad(lambda x: soft_cap_log_scale(x, MAX_SCALE)))(v))
        h = 1e-5
        plus = np.asarray(soft_cap_log_scale(jnp.asarray(v + h), MAX_SCALE))
        minus = np.asarray(soft_cap_log_scale(jnp.asarray(v - h), MAX_SCALE))
    np.testing.assert_allclose(grad, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-10)
    assert np.all(grad > 0) and np.all(grad < 1)
    assert grad[16] == pytest.approx(0.5)  # at v = log m
    assert grad[-1] > 1e-4, "the gradient must not vanish just past the cap"
    assert np.all(log_s < log_max) and np.all(np.diff(log_s) > 0)
    assert log_s[0] == pytest.approx(v[0], abs=1e-3)  # far below: s = exp(v)
    assert log_s[-1] == pytest.approx(log_max, abs=1e-3)  # far above: s -> max_scale
    # The same function as max_scale * sigmoid(v - log max_scale).
    np.testing.assert_allclose(np.exp(log_s), MAX_SCALE / (1 + np.exp(log_max - v)), rtol=1e-12)


def test_head_scale_gradient_passes_the_cap():
    """A head whose scale bias sits above the cap still gets a scale-layer gradient
    (LAM's hard clamp gives exactly 0 there)."""
    head = GaussianHead(4, GaussianHeadConfig(), color_fusion=False, rngs=nnx.Rngs(0))
    head.scale.bias[...] = jnp.full((3,), math.log(MAX_SCALE) + 2.0)
    features = jnp.ones((1, 2, 4))
    graphdef, state = nnx.split(head)

    def mean_log_scale(state):
        return jnp.mean(nnx.merge(graphdef, state)(features, jnp.zeros((2, 3))).log_scales)

    grads = jax.grad(mean_log_scale)(state)
    assert np.all(np.asarray(grads["scale"]["bias"][...]) > 0.03)


def test_mean_anchor_spacing_matches_brute_force():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 3))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert mean_anchor_spacing(points) == pytest.approx(distances.min(axis=1).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="anchor positions"):
        mean_anchor_spacing(points[:1])


def test_init_scale_from_anchor_spacing_is_exact():
    """init_scale_in_spacings = 0.5 on a grid of spacing 2 mm: every scale is 1 mm at init."""
    grid = np.stack(np.meshgrid(*[np.arange(4) * 0.002] * 3, indexing="ij"), -1).reshape(-1, 3)
    config = GaussianHeadConfig.from_config({"init_scale_in_spacings": 0.5}, grid)
    assert config.anchor_spacing == pytest.approx(0.002)
    head = GaussianHead(4, config, color_fusion=False, rngs=nnx.Rngs(0))
    features = jnp.asarray(np.random.default_rng(1).normal(size=(1, len(grid), 4)), jnp.float32)
    g = head(features, grid)
    np.testing.assert_allclose(g.scales(), 0.001, rtol=1e-5)
    np.testing.assert_allclose(g.log_scales, config.init_log_scale, rtol=1e-6)
    # The default is LAM's e^-5 m, reached exactly through the soft cap.
    g = GaussianHead(4, GaussianHeadConfig(), color_fusion=False, rngs=nnx.Rngs(0))(features, grid)
    np.testing.assert_allclose(g.scales(), math.exp(-5.0), rtol=1e-5)


def test_from_config_fields_and_errors():
    config = GaussianHeadConfig.from_config({"max_scale": 0.02, "init_opacity": 0.2})
    assert (config.max_scale, config.init_opacity) == (0.02, 0.2)
    assert config.init_scale == pytest.approx(math.exp(-5.0))
    assert GaussianHeadConfig.from_config(None) == GaussianHeadConfig()
    explicit = GaussianHeadConfig.from_config({"init_scale_in_spacings": 2, "anchor_spacing": 1e-3})
    assert explicit.initial_scale == pytest.approx(2e-3)
    with pytest.raises(ValueError, match=r"unknown.*max_scal"):
        GaussianHeadConfig.from_config({"max_scal": 0.01})
    with pytest.raises(ValueError, match="anchor_positions"):
        GaussianHeadConfig.from_config({"init_scale_in_spacings": 0.5})
    with pytest.raises(ValueError, match="below max_scale"):
        GaussianHeadConfig(max_scale=0.005)  # LAM's 6.7 mm init above a 5 mm cap
    with pytest.raises(ValueError, match="anchor_spacing"):
        GaussianHeadConfig(init_scale_in_spacings=0.5)


def test_largest_head_scales_bound_the_rasterizer_intersections():
    """Saturated scale and opacity layers give at most the intersections of Gaussians at
    exactly max_scale and opacity 1, so a capacity calibrated there never overflows.

    600 anchors on a 10 cm sphere (about 14 mm apart) seen from 45 cm at 512 x 512: the
    stated bound (measured 58,947 at 10 mm, 10^5 allowed) grows with the anchor count and
    the framing (the built-in head's 88,464 anchors at 384: 5.1M a 512 x 512 view).
    """
    num = 600
    golden = np.pi * (3.0 - np.sqrt(5.0))
    y = 1.0 - 2.0 * (np.arange(num) + 0.5) / num
    ring = np.sqrt(1.0 - y**2)
    sphere = np.stack(
        [ring * np.cos(golden * np.arange(num)), y, ring * np.sin(golden * np.arange(num))], -1
    )
    positions = 0.1 * sphere.astype(np.float32)
    config = GaussianHeadConfig()
    head = GaussianHead(4, config, color_fusion=False, rngs=nnx.Rngs(0))
    head.scale.bias[...] = jnp.full((3,), 30.0)
    head.opacity.bias[...] = jnp.full((1,), 30.0)
    g = head(jnp.zeros((1, num, 4)), positions)
    # Two scenes in one count: the head's output, and max_scale with opacity 1.
    scales = jnp.stack([g.scales()[0], jnp.full((num, 3), config.max_scale)])
    opacities = jnp.stack([g.opacities()[0], jnp.ones((num,))])
    viewmat = jnp.asarray(look_at(np.array([0.0, 0.0, 0.45]), np.zeros(3)), jnp.float32)
    K = jnp.asarray(intrinsics(focal_from_fov(30.0, 512), 512, 512), jnp.float32)
    (head_total, cap_total), _ = scene_counts(
        jnp.broadcast_to(g.means, (2, num, 3)),
        jnp.broadcast_to(g.quats, (2, num, 4)),
        scales,
        opacities,
        jnp.broadcast_to(viewmat, (2, 1, 4, 4)),
        jnp.broadcast_to(K, (2, 1, 3, 3)),
        width=512,
        height=512,
    )
    assert int(head_total) <= int(cap_total) < 100_000
    assert int(head_total) > 0.95 * int(cap_total)
