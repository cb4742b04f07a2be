"""UV correspondence estimator: shapes, loss by hand, frozen-backbone gradients, flip averaging,
and a small overfit on renders of the built-in synthetic head."""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from network_fixtures import FAST_COMPILE, fast_jit, noise_filled

from uika_jax.models.correspondence import (
    SYNTHETIC_MIRROR_U,
    CorrespondenceEstimator,
    CorrespondenceLossWeights,
    CorrespondenceOutput,
    correspondence_loss,
    flip_averaged,
)
from uika_jax.models.dpt import DPTConfig
from uika_jax.models.frozen import FrozenParam
from uika_jax.models.vit import ViTConfig

SIZE = 56
VIT = ViTConfig(
    family="dinov2",
    hidden_size=32,
    num_layers=4,
    num_heads=2,
    mlp_dim=64,
    patch_size=14,
    image_size=SIZE,
)
DPT = DPTConfig(in_dim=32, neck_channels=(8, 16, 24, 32), features=16, out_channels=3)


def _rngs():
    # rbg keys: random init compiles per weight shape, and threefry costs ~2.5x the CPU time.
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


@pytest.fixture(scope="module")
def model():
    """A tiny estimator with a frozen random DINOv2-style backbone."""
    return noise_filled(nnx.eval_shape(lambda: CorrespondenceEstimator(VIT, DPT, rngs=_rngs())))


def _uniform(seed, shape):
    """Random images in [0, 1) from NumPy (no JAX random program to compile)."""
    return jnp.asarray(np.random.default_rng(seed).random(shape, np.float32))


def _render(yaw, beta_seed=None):
    """A 56 x 56 render of the synthetic head (identity from a seed, or the template)."""
    from uika_jax.head.uv_raster import corner_image_uv
    from uika_jax.render import camera
    from uika_jax.render.mesh_render import render_mesh
    from uika_jax.synthetic.head import synthetic_head_model

    head = synthetic_head_model()
    v0 = np.asarray(head.v_template)
    centre = (v0.min(0) + v0.max(0)) / 2
    height = float(v0[:, 1].max() - v0[:, 1].min())
    vertices = v0
    if beta_seed is not None:
        shapedirs = np.asarray(head.shapedirs)
        beta = np.random.RandomState(beta_seed).randn(shapedirs.shape[-1]).astype(np.float32)
        vertices = v0 + shapedirs @ beta
    viewmat, K = camera.framing_camera(centre, height, SIZE, yaw_deg=yaw, pitch_deg=5.0)
    return render_mesh(
        vertices,
        head.faces,
        viewmat,
        K,
        SIZE,
        SIZE,
        corner_uv=corner_image_uv(head),
        background=0.5,
    )


@pytest.fixture(scope="module")
def renders():
    """Four renders of the synthetic head (two identities, four yaws)."""
    views = [_render(yaw, i % 2) for i, yaw in enumerate((-35.0, -10.0, 15.0, 40.0))]
    return tuple(jnp.stack([getattr(r, k) for r in views]) for k in ("image", "image_uv", "mask"))


def test_synthetic_uv_layout_mirror_axis(renders):
    # a frontal render is mirror-symmetric: flipping it maps u to 2 c - u (the flip-averaging axis)
    r = _render(0.0)
    uv, mask = np.asarray(r.image_uv), np.asarray(r.mask)
    both = mask & mask[:, ::-1]
    assert both.sum() > 0.95 * mask.sum()
    err_u = np.abs(2 * SYNTHETIC_MIRROR_U - uv[:, ::-1, 0] - uv[..., 0])[both]
    err_v = np.abs(uv[:, ::-1, 1] - uv[..., 1])[both]
    assert np.median(err_u) < 1e-3 and np.median(err_v) < 1e-3
    assert np.quantile(err_u, 0.99) < 2e-2


def test_output_shapes_and_ranges(model):
    images = _uniform(0, (2, 3, SIZE, SIZE, 3))
    out, flat = fast_jit(lambda m, x: (m(x), m(x.reshape(6, SIZE, SIZE, 3))))(model, images)
    assert out.uv.shape == (2, 3, SIZE, SIZE, 2)
    assert out.face_prob.shape == out.face_logit.shape == (2, 3, SIZE, SIZE, 1)
    for a in (out.uv, out.face_prob):
        assert a.dtype == jnp.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_allclose(out.face_prob, jax.nn.sigmoid(out.face_logit), atol=1e-7)
    # leading dims are only flattened: the (2, 3) batch equals the flat batch of 6
    np.testing.assert_allclose(out.uv.reshape(6, SIZE, SIZE, 2), flat.uv, atol=1e-6)


def test_view_mask_and_shared_backbone_pass(model):
    """Padded views are black images; a shared ViT pass with more taps gives the same output."""
    images = _uniform(2, (2, 2, SIZE, SIZE, 3))
    images = images.at[1, 0].set(jnp.nan)  # a padded view may hold anything
    view_mask = jnp.array([[True, True], [False, True]])

    @fast_jit
    def run(m, images, view_mask):
        shared = m.backbone(images, view_mask, extra_layers=(0, -1))
        black = jnp.where(view_mask[..., None, None, None], images, 0.0)
        return m(images, view_mask), m(images, view_mask, backbone=shared), m(black)

    own, given, black = run(model, images, view_mask)
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(given), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(black), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="view_mask shape"):
        jax.eval_shape(lambda x: model(x, view_mask[0]), images)


@pytest.mark.parametrize("readout", ["add", "project"])
def test_readout_and_bfloat16_shapes(readout):
    # abstract build + call (no compile): the cls tokens reach the DPT, outputs stay float32
    dpt = dataclasses.replace(DPT, readout=readout)

    def run():
        model = CorrespondenceEstimator(VIT, dpt, dtype=jnp.bfloat16, rngs=_rngs())
        return model(jnp.ones((2, SIZE, 2 * SIZE, 3)))

    out = nnx.eval_shape(run)
    assert out.uv.shape == (2, SIZE, 2 * SIZE, 2) and out.uv.dtype == jnp.float32
    assert out.face_logit.shape == (2, SIZE, 2 * SIZE, 1)


def test_bfloat16_outputs_are_float32_resolution():
    """In bfloat16 the UV and face logits still come out of a float32 last conv: almost none
    is a bfloat16 number (bfloat16 logits would quantise UV by up to 0.31 texel at 384)."""
    model = noise_filled(
        nnx.eval_shape(lambda: CorrespondenceEstimator(VIT, DPT, dtype=jnp.bfloat16, rngs=_rngs()))
    )
    out = fast_jit(lambda m, x: m(x))(model, _uniform(5, (1, SIZE, SIZE, 3)))
    for a in (out.uv, out.face_prob, out.face_logit):
        assert a.dtype == jnp.float32
    face_logit = np.asarray(out.face_logit)
    in_bf16 = face_logit.astype(jnp.bfloat16).astype(np.float32) == face_logit
    assert in_bf16.mean() < 0.01, in_bf16.mean()
    # UV: neighbouring distinct logit(uv) values closer than a quarter of bfloat16's spacing
    uv_logits = np.unique(np.log(out.uv / (1 - out.uv)))
    bf16_spacing = 2.0 ** (np.floor(np.log2(np.abs(uv_logits[1:]) + 1e-30)) - 7)
    assert np.mean(np.diff(uv_logits) < bf16_spacing / 4) > 0.5


def _pred(uv, logit):
    logit = jnp.asarray(logit, jnp.float32)
    return CorrespondenceOutput(jnp.asarray(uv, jnp.float32), jax.nn.sigmoid(logit), logit)


def test_loss_hand_computed():
    # one image of 1 x 2 pixels: pixel 0 in the face, pixel 1 background
    pred = _pred([[[[0.2, 0.4], [0.9, 0.1]]]], [[[[0.0], [2.0]]]])
    uv_gt = jnp.array([[[[0.3, 0.1], [0.5, 0.5]]]])
    mask = jnp.array([[[True, False]]])
    loss, terms = correspondence_loss(pred, uv_gt, mask)
    uv_l1 = (0.1 + 0.3) / 2  # only pixel 0, mean over (u, v)
    bce = (np.log(2.0) + np.log1p(np.exp(2.0))) / 2  # y=1 at z=0, y=0 at z=2
    np.testing.assert_allclose(terms["uv_l1"], uv_l1, rtol=1e-6)
    np.testing.assert_allclose(terms["mask_bce"], bce, rtol=1e-6)
    np.testing.assert_allclose(loss, 10.0 * uv_l1 + bce, rtol=1e-6)
    weights = CorrespondenceLossWeights(uv=2.0, mask=0.5)
    np.testing.assert_allclose(
        correspondence_loss(pred, uv_gt, mask, weights)[0], 2.0 * uv_l1 + 0.5 * bce, rtol=1e-6
    )

    # a padded second view (valid 0) full of garbage changes nothing
    pred2 = jax.tree.map(lambda a: jnp.concatenate([a, 1e3 * jnp.ones_like(a)]), pred)
    uv2 = jnp.concatenate([uv_gt, -5.0 * jnp.ones_like(uv_gt)])
    mask2 = jnp.concatenate([mask, jnp.ones_like(mask)])
    loss2, _ = correspondence_loss(pred2, uv2, mask2, valid=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_loss_empty_mask_is_safe():
    pred = _pred(jnp.full((1, 2, 2, 2), 0.5), jnp.full((1, 2, 2, 1), -1.0))
    mask = jnp.zeros((1, 2, 2), bool)

    def f(p):
        return correspondence_loss(p, jnp.zeros((1, 2, 2, 2)), mask)[0]

    loss, grads = jax.value_and_grad(f)(pred)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-1.0)), rtol=1e-6)  # BCE only
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    np.testing.assert_array_equal(grads.uv, 0.0)
    with pytest.raises(ValueError, match="mask_gt shape"):
        correspondence_loss(pred, jnp.zeros((1, 2, 2, 2)), mask[..., None])
    with pytest.raises(ValueError, match="uv_gt shape"):
        correspondence_loss(pred, jnp.zeros((1, 2, 2, 3)), mask)


def _loss(model, images, uv, mask):
    return correspondence_loss(model(images), uv, mask)[0]


def test_gradients_reach_every_dpt_param_and_skip_the_frozen_vit(model, renders):
    images, uv, mask = renders
    images, uv, mask = images[:2], uv[:2], mask[:2]
    grad_fn = fast_jit(nnx.grad(_loss, argnums=(nnx.DiffState(0, nnx.Param), 1)))
    grads, d_images = grad_fn(model, images, uv, mask)
    leaves = nnx.to_flat_state(grads)
    assert not any(isinstance(v, FrozenParam) for _, v in leaves)
    assert {p for p, _ in leaves} == {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert all(p[0] == "dpt" for p, _ in leaves)
    assert len(nnx.to_flat_state(nnx.state(model.vit, FrozenParam))) > 0
    for path, g in leaves:
        assert np.abs(np.asarray(g[...])).max() > 0, f"no gradient reaches {path}"
    # the backbone's outputs are under stop_gradient: nothing flows back to the pixels
    np.testing.assert_array_equal(d_images, 0.0)


def test_train_backbone_switch():
    abstract = nnx.eval_shape(
        lambda: CorrespondenceEstimator(VIT, DPT, train_backbone=True, rngs=_rngs())
    )
    assert not nnx.to_flat_state(nnx.state(abstract, FrozenParam))
    vit_params = nnx.to_flat_state(nnx.state(abstract.vit, nnx.Param))
    assert len(vit_params) > 0
    assert abstract.vit.stop_gradient is False


def test_flip_averaged_is_mirror_equivariant(model):
    images = _uniform(1, (2, SIZE, SIZE, 3))
    c = 0.52
    # the images, then their flips, in one batch (no image's mirror at the mirrored index)
    both = jnp.concatenate([images, images[:, :, ::-1]])
    run = fast_jit(lambda m, x: (flip_averaged(m, x, mirror_u=c), m(x[:2])))
    averaged, plain = run(model, both)
    out, out_flipped = (jax.tree.map(lambda t, i=i: t[i : i + 2], averaged) for i in (0, 2))
    back = out_flipped.uv[:, :, ::-1]
    back = jnp.concatenate([2 * c - back[..., :1], back[..., 1:]], -1)
    np.testing.assert_allclose(back, out.uv, atol=1e-5)
    np.testing.assert_allclose(out_flipped.face_logit[:, :, ::-1], out.face_logit, atol=1e-4)
    assert float(jnp.abs(plain.uv - out.uv).max()) > 1e-4  # the average is not the plain pass


def test_bad_configs_and_inputs(model):
    with pytest.raises(ValueError, match="out_channels"):
        CorrespondenceEstimator(VIT, DPTConfig(in_dim=32), rngs=_rngs())
    with pytest.raises(ValueError, match="ViT width"):
        CorrespondenceEstimator(VIT, DPTConfig(in_dim=16, out_channels=3), rngs=_rngs())
    with pytest.raises(ValueError, match="tapped layers"):
        CorrespondenceEstimator(VIT, DPT, layers=(0, 1, 2), rngs=_rngs())
    with pytest.raises(ValueError, match="out of range"):
        CorrespondenceEstimator(VIT, DPT, layers=(0, 1, 2, 4), rngs=_rngs())
    with pytest.raises(ValueError, match="RGB"):
        jax.eval_shape(lambda x: model(x), jnp.ones((1, SIZE, SIZE, 4)))
    with pytest.raises(ValueError, match="multiple of patch"):
        jax.eval_shape(lambda x: model(x), jnp.ones((1, 50, SIZE, 3)))


def test_overfit_synthetic_renders(model, renders):
    """Adam on 4 renders with the backbone frozen: within 40 steps the loss drops below half
    (measured: to about a quarter)."""
    images, uv, mask = renders
    assert 0.1 < float(mask.mean()) < 0.6
    graphdef, params, rest = nnx.split(nnx.clone(model), nnx.Param, ...)
    tx = optax.adam(3e-3)

    def loss_fn(p):
        return correspondence_loss(nnx.merge(graphdef, p, rest)(images), uv, mask)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(p, opt_state):
        (loss, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, terms["uv_l1"]

    # A Python loop over a jitted step: XLA:CPU runs a lax.scan of this body ~10x slower.
    start = time.perf_counter()
    opt_state, history = tx.init(params), []
    for _ in range(40):
        params, opt_state, loss, uv_l1 = step(params, opt_state)
        history.append((loss, uv_l1))
    losses, uv_l1 = np.asarray(jax.device_get(history)).T
    elapsed = time.perf_counter() - start
    first, last = float(losses[0]), float(losses[-5:].mean())
    print(f"overfit: loss {first:.4f} -> {last:.4f}, uv L1 {uv_l1[0]:.4f} -> {uv_l1[-1]:.4f}")
    print(f"overfit: {len(losses)} steps incl. compile {elapsed:.1f} s")
    assert np.isfinite(losses).all()
    assert last <= 0.5 * first
