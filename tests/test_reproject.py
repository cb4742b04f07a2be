"""Tests for the reprojection of views into UV space and their aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from network_fixtures import FAST_COMPILE

from uika_jax.models.reproject import reproject

_reproject = jax.jit(
    reproject, static_argnums=4, static_argnames="threshold", compiler_options=FAST_COMPILE
)
"""Jitted: eager calls dispatch dozens of small ops, each compiled on first use."""

R_HEAD = 128
"""UV map side for the head tests."""

S_HEAD = 256
"""Render side for the head tests: about 2 pixels per texel across on the face."""

HEAD_VIEWS = (
    (-90.0, 0.0),
    (-60.0, 20.0),
    (-30.0, -20.0),
    (0.0, 0.0),
    (0.0, 20.0),
    (0.0, -20.0),
    (30.0, -20.0),
    (60.0, 20.0),
    (90.0, 0.0),
)
"""(yaw, pitch) in degrees of the 9 views around the head."""


def _numpy_reference(images, uv, face, view_mask, r):
    """A loop-and-np.add.at reference of the module docstring's definitions."""
    b, n, h, w, _ = images.shape
    sums = np.zeros((b, n, r, r, 3))
    hits = np.zeros((b, n, r, r), np.int64)
    for i in range(b):
        for j in range(n):
            if not view_mask[i, j]:
                continue
            for y in range(h):
                for x in range(w):
                    p = uv[i, j, y, x]
                    if not (face[i, j, y, x] and np.all((p >= 0) & (p <= 1))):
                        continue
                    row = min(int(np.floor(p[1] * r)), r - 1)
                    col = min(int(np.floor(p[0] * r)), r - 1)
                    sums[i, j, row, col] += images[i, j, y, x]
                    hits[i, j, row, col] += 1
    i_uv = np.where(hits[..., None] > 0, sums / np.maximum(hits, 1)[..., None], 0)
    n_hit = hits.sum(1)
    i_aggr = np.where(n_hit[..., None] > 0, sums.sum(1) / np.maximum(n_hit, 1)[..., None], 0)
    n_views = (hits > 0).sum(1)
    n_real = np.asarray(view_mask).sum(1)[:, None, None]
    gamma = np.where(n_real > 0, np.log1p(n_views) / np.log1p(np.maximum(n_real, 1)), 0)
    return i_uv, hits, i_aggr, gamma, n_hit, n_views


def _random_inputs(seed, b=2, n=3, h=6, w=5):
    rng = np.random.default_rng(seed)
    images = rng.random((b, n, h, w, 3)).astype(np.float32)
    uv = rng.uniform(-0.1, 1.1, (b, n, h, w, 2)).astype(np.float32)  # some outside [0, 1]
    prob = rng.random((b, n, h, w, 1)).astype(np.float32)
    view_mask = np.ones((b, n), bool)
    view_mask[1, n - 1] = False
    return images, uv, prob, view_mask


def test_matches_numpy_reference():
    images, uv, prob, view_mask = _random_inputs(0)
    uv[0, 0, 0, 0] = [1.0, 1.0]  # the closed upper bound lands in the last texel
    images[1, 2] = np.nan  # a padded view's pixels are never read
    uv[1, 2] = np.nan
    out = _reproject(images, uv, prob, view_mask, 4)
    ref = _numpy_reference(images, uv, prob[..., 0] > 0.5, view_mask, 4)
    assert out.i_uv.shape == (2, 3, 4, 4, 3) and out.gamma.shape == (2, 4, 4, 1)
    assert out.hits.dtype == out.n_hit.dtype == out.n_views.dtype == jnp.int32
    outputs = (out.i_uv, out.hits, out.i_aggr, out.gamma[..., 0], out.n_hit, out.n_views)
    for got, want in zip(outputs, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    assert np.all(np.asarray(out.hits[1, 2]) == 0)
    assert np.asarray(out.hits)[0, 0, 3, 3] >= 1


def test_bool_mask_threshold_and_defaults():
    images, uv, prob, _ = _random_inputs(1)
    by_prob = _reproject(images, uv, prob, None, 5, threshold=0.3)
    by_mask = _reproject(images, uv, prob[..., 0] > 0.3, np.ones((2, 3), bool), 5)
    for a, b in zip(jax.tree.leaves(by_prob), jax.tree.leaves(by_mask), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    empty = _reproject(images, uv, np.zeros_like(prob), None, 5)
    assert float(jnp.abs(empty.gamma).max()) == 0.0 and float(jnp.abs(empty.i_aggr).max()) == 0.0


def test_view_permutation_invariance_and_padding():
    images, uv, prob, view_mask = _random_inputs(2, n=5, h=12, w=12)
    images, uv, prob = (np.repeat(a, 4, axis=2) for a in (images, uv, prob))  # many collisions
    out = _reproject(images, uv, prob, view_mask, 6)
    perm = np.array([3, 0, 4, 2, 1])
    permuted = _reproject(images[:, perm], uv[:, perm], prob[:, perm], view_mask[:, perm], 6)
    assert float(jnp.abs(out.i_aggr - permuted.i_aggr).max()) < 1e-6
    assert float(jnp.abs(out.gamma - permuted.gamma).max()) < 1e-6
    np.testing.assert_array_equal(np.asarray(out.n_hit), np.asarray(permuted.n_hit))
    np.testing.assert_array_equal(np.asarray(out.hits[:, perm]), np.asarray(permuted.hits))
    # whatever a padded view holds, nothing changes
    images2, uv2, prob2 = images.copy(), uv.copy(), prob.copy()
    images2[1, 4], uv2[1, 4], prob2[1, 4] = 7.0, 0.5, 1.0  # view 4 of sample 1 is padded
    other = _reproject(images2, uv2, prob2, view_mask, 6)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gamma_ignores_outlier_texels_and_counts_real_views():
    """A texel flooded by thousands of pixels (saturated UVs) leaves every other texel's
    gamma unchanged (a per-sample maximum of pixel counts would lower it), and gamma
    counts views, normalised by the real (unpadded) views."""
    r, n, side = 4, 4, 64
    uv = np.zeros((1, n, side, side, 2), np.float32)
    uv[..., :] = 0.3  # every pixel in texel (1, 1) ...
    uv[:, :2, :, :2] = 0.9  # ... except 2 columns of views 0 and 1: texel (3, 3)
    images = np.full((1, n, side, side, 3), 0.5, np.float32)
    face = np.zeros((1, n, side, side), bool)
    face[:, :, :4, :] = True  # texel (1, 1): 248 pixels of views 0, 1, 256 of view 2
    view_mask = np.array([[True, True, True, False]])
    base = _reproject(images, uv, face, view_mask, r)
    gamma = np.asarray(base.gamma[0, ..., 0])
    np.testing.assert_array_equal(np.asarray(base.n_views[0])[[1, 3], [1, 3]], [3, 2])
    np.testing.assert_allclose(gamma[[1, 3], [1, 3]], np.log1p([3, 2]) / np.log1p(3), rtol=1e-6)
    assert gamma.max() == 1.0  # every real view sees texel (1, 1); the padded one is ignored
    flooded = face.copy()
    flooded[:, 2] = True  # view 2 now puts 4092 pixels into texel (1, 1)
    out = _reproject(images, uv, flooded, view_mask, r)
    assert int(out.n_hit[0, 1, 1]) > 4000
    np.testing.assert_array_equal(np.asarray(out.gamma), np.asarray(base.gamma))
    none_real = _reproject(images, uv, face, np.zeros((1, n), bool), r)
    assert float(jnp.abs(none_real.gamma).max()) == 0.0


def test_gradients_flow_to_colours_only():
    images, uv, prob, view_mask = _random_inputs(3)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)

    def loss(images, uv, prob):
        out = reproject(images, uv, prob, view_mask, 4)
        return jnp.sum(out.i_aggr * weights) + jnp.sum(out.i_uv**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)
    g_img, g_uv, g_prob = grad(images, uv, prob)
    loss_value = jax.jit(loss, compiler_options=FAST_COMPILE)
    assert float(jnp.abs(g_uv).max()) == 0.0 and float(jnp.abs(g_prob).max()) == 0.0
    # finite differences in float32 on a linear-then-quadratic function of the colours
    direction = rng.normal(size=images.shape).astype(np.float32)
    eps = 1e-2
    fd = (
        loss_value(images + eps * direction, uv, prob)
        - loss_value(images - eps * direction, uv, prob)
    ) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g_img * direction)), float(fd), rtol=1e-3)
    # pixels off the face, outside the UV square or of a padded view get no gradient
    inside = np.all((uv >= 0) & (uv <= 1), axis=-1)
    face = (prob[..., 0] > 0.5) & inside & view_mask[..., None, None]
    assert float(jnp.abs(g_img[~face]).max()) == 0.0
    assert float(jnp.abs(g_img[face]).min()) > 0.0


def test_vmap_matches_loop():
    images, uv, prob, view_mask = _random_inputs(4)
    stacked = [np.stack([a, a[::-1]]) for a in (images, uv, prob, view_mask)]
    batched = jax.jit(jax.vmap(lambda *a: reproject(*a, 3)), compiler_options=FAST_COMPILE)(
        *stacked
    )
    single = _reproject(images[::-1], uv[::-1], prob[::-1], view_mask[::-1], 3)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a)[1], np.asarray(b))


def test_batch_sharded_without_collectives():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
    images, uv, prob, view_mask = _random_inputs(6, b=8, n=2, h=4, w=4)
    args = [jax.device_put(a, sharding) for a in (images, uv, prob, view_mask)]
    fn = jax.jit(lambda *a: reproject(*a, 4), compiler_options=FAST_COMPILE)
    hlo = fn.lower(*args).compile().as_text()
    assert not [op for op in ("all-gather", "all-reduce", "all-to-all") if op in hlo]
    out = fn(*args)
    assert out.i_aggr.sharding.spec == out.hits.sharding.spec == jax.P("data")


def test_shape_errors():
    images, uv, prob, view_mask = _random_inputs(5)
    with pytest.raises(ValueError, match="images"):
        reproject(images[0], uv, prob, view_mask, 4)
    with pytest.raises(ValueError, match="uv shape"):
        reproject(images, uv[..., :1], prob, view_mask, 4)
    with pytest.raises(ValueError, match="face mask"):
        reproject(images, uv, prob[:, :2], view_mask, 4)
    with pytest.raises(ValueError, match="face mask"):
        reproject(images, uv, np.repeat(prob, 2, -1), view_mask, 4)
    with pytest.raises(ValueError, match="view_mask"):
        reproject(images, uv, prob, view_mask[:, :2], 4)
    with pytest.raises(ValueError, match="resolution"):
        reproject(images, uv, prob, view_mask, 0)


@pytest.fixture(scope="module")
def head_views():
    """9 unshaded renders (ambient 1: image = texture(uv)) of the synthetic head, + texture."""
    from uika_jax.head.uv_raster import corner_image_uv, uv_rasterize
    from uika_jax.render import camera
    from uika_jax.render.mesh_render import render_mesh
    from uika_jax.synthetic.albedo import synthetic_albedo
    from uika_jax.synthetic.head import synthetic_head_model

    head = synthetic_head_model()
    texture = synthetic_albedo(0, 2 * R_HEAD)
    v0 = np.asarray(head.v_template)
    centre = (v0.min(0) + v0.max(0)) / 2
    height = float(v0[:, 1].max() - v0[:, 1].min())
    renders = []
    for yaw, pitch in HEAD_VIEWS:
        viewmat, K = camera.framing_camera(centre, height, S_HEAD, yaw_deg=yaw, pitch_deg=pitch)
        renders.append(
            render_mesh(
                v0,
                head.faces,
                viewmat,
                K,
                S_HEAD,
                S_HEAD,
                corner_uv=corner_image_uv(head),
                texture=texture,
                ambient=1.0,
            )
        )
    images, uv, mask = (
        np.stack([getattr(r, k) for r in renders]) for k in ("image", "image_uv", "mask")
    )
    uv_mask = np.asarray(uv_rasterize(head, R_HEAD).mask)
    return images, uv, mask, texture, uv_mask


def test_head_views_reproduce_texture_and_cover_uv_mask(head_views):
    """Ground-truth UV maps of the built-in head, 9 views, one padded view of garbage.

    Colour: the renders are unshaded, so a pixel is the 2R x 2R texture sampled
    bilinearly at its UV; a texel of the R x R map covers exactly 2 x 2 texture
    texels, and its reference is their mean (the texture at resolution R). Every
    seen texel counts (none excluded near seams or island borders).
    Coverage: the fraction of the full `uv_rasterize` mask at R hit by some view
    (measured 0.899 of 9812 texels; the 995 unseen ones are the whole mouth-cavity
    chart (450, hidden by the closed mouth), the hidden parts of the eyeball charts
    (327 of 432) and 218 skin texels, 2.4% of the skin).
    """
    images, uv, mask, texture, uv_mask = head_views
    n = len(HEAD_VIEWS)
    pad = lambda a, v: np.concatenate([a, np.full_like(a[:1], v)])[None]  # noqa: E731
    out = _reproject(
        pad(images, 0.3), pad(uv, 0.5), pad(mask, True), np.arange(n + 1)[None] < n, R_HEAD
    )
    n_hit = np.asarray(out.n_hit[0])
    seen = n_hit > 0
    assert np.asarray(out.hits[0, n]).sum() == 0
    reference = texture.reshape(R_HEAD, 2, R_HEAD, 2, 3).mean((1, 3))
    mse = np.mean((np.asarray(out.i_aggr[0])[seen] - reference[seen]) ** 2)
    psnr = -10 * np.log10(mse)
    coverage = (seen & uv_mask).sum() / uv_mask.sum()
    print(f"PSNR {psnr:.2f} dB over {seen.sum()} texels, coverage {coverage:.4f}")
    assert psnr >= 30.0, psnr
    assert coverage >= 0.8, coverage
    assert (seen & ~uv_mask).sum() < 0.01 * seen.sum()  # pixels land on the layout
    assert n_hit.sum() == mask.sum()  # every face pixel of the 9 views lands somewhere
    n_views = np.asarray(out.n_views[0])
    gamma = np.asarray(out.gamma[0, ..., 0])
    print(f"views per seen texel: {np.bincount(n_views[seen])[1:]} (1..{n_views.max()})")
    np.testing.assert_allclose(gamma, np.log1p(n_views) / np.log1p(n), rtol=1e-6)
    assert gamma[~seen].max() == 0.0 and n_views.max() <= n
