"""Training losses: SSIM against dm_pix (VALID) and a scipy oracle (SAME), the masked
L1, the offset regulariser's gradient against finite differences, the stage-1 loss's
view mask, LPIPS VGG, and `total_loss`'s weighting."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from ssim_oracle import scipy_ssim_maps

from uika_jax.models.correspondence import CorrespondenceOutput
from uika_jax.training import losses

WEIGHTS = {"l1": 1.0, "ssim": 0.1, "lpips": 1.0, "reg": 0.1, "reg_eps": 0.0}


def _image_pairs(shape, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random(shape, dtype=np.float32)
    b = np.clip(a + noise * rng.standard_normal(shape).astype(np.float32), 0.0, 1.0)
    return a, b


def test_ssim_valid_equals_dm_pix():
    dm_pix = require_oracle("dm_pix")
    a, b = _image_pairs((2, 3, 24, 20, 3))
    ours = losses.ssim(a, b, padding="VALID")
    theirs = dm_pix.ssim(a.reshape(6, 24, 20, 3), b.reshape(6, 24, 20, 3)).reshape(2, 3)
    assert ours.shape == (2, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_ssim_same_matches_scipy_oracle_with_and_without_weights():
    a, b = _image_pairs((3, 16, 18, 3), seed=1)
    maps = scipy_ssim_maps(a, b)
    np.testing.assert_allclose(losses.ssim(a, b), maps.mean(axis=(1, 2, 3)), atol=2e-6)
    weight = np.random.default_rng(2).random((3, 16, 18)).astype(np.float32)
    expected = (weight * maps.mean(-1)).sum((1, 2)) / weight.sum((1, 2))
    np.testing.assert_allclose(losses.ssim(a, b, weight=weight), expected, atol=2e-6)
    # SAME is not VALID: the border windows see the zero padding.
    assert abs(float(losses.ssim(a, b)[0] - losses.ssim(a, b, padding="VALID")[0])) > 1e-4


def test_ssim_identical_is_one_and_gradients_are_finite():
    a, b = _image_pairs((2, 16, 16, 3), seed=3)
    np.testing.assert_allclose(losses.ssim(a, a), 1.0, atol=1e-6)
    flat = np.full_like(a, 0.5)
    ssim_grad = jax.jit(jax.grad(lambda p, y: jnp.sum(losses.ssim(p, y))))
    for x, y in ((a, b), (a, a), (flat, flat)):
        assert np.all(np.isfinite(ssim_grad(x, y)))
    assert np.abs(ssim_grad(a, b)).max() > 0


def test_masked_l1_is_the_l1_of_images_composited_with_one_mask():
    pred, target = _image_pairs((2, 3, 8, 8, 3), noise=0.3, seed=4)
    mask = np.random.default_rng(5).random((2, 3, 8, 8)).astype(np.float32)
    mask[0, 0, :4] = 0.0
    for background in ((1.0, 1.0, 1.0), (0.2, 0.5, 0.0)):
        bg = jnp.asarray(background)
        expected = np.mean(
            np.abs(losses.composite(pred, mask, bg) - losses.composite(target, mask, bg))
        )
        np.testing.assert_allclose(losses.masked_l1(pred, target, mask), expected, rtol=1e-5)
    outside = pred.copy()
    outside[0, 0, :4] += 0.5
    np.testing.assert_allclose(
        losses.masked_l1(outside, target, mask), losses.masked_l1(pred, target, mask), rtol=1e-6
    )


def _finite_difference_gradient(fn, x, step=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (fn(plus) - fn(minus)) / (2 * step)
    return grad


def test_offset_regularizer_value_and_gradient_against_finite_differences():
    eps = 0.5
    direction = np.array([0.6, 0.0, 0.8])  # unit length
    # Norms 0.3 and 0.49 (inside the free radius), 0.51 and 1.2 (outside), a random one.
    offsets = np.stack(
        [0.3 * direction, 0.49 * direction, 0.51 * direction, 1.2 * direction, [0.4, -0.7, 0.2]]
    )[None]
    norms = np.linalg.norm(offsets, axis=-1)
    np.testing.assert_allclose(
        losses.offset_regularizer(jnp.asarray(offsets, jnp.float32), eps),
        np.mean(np.maximum(norms - eps, 0.0)),
        rtol=1e-6,
    )
    with jax.enable_x64(True):
        x = jnp.asarray(offsets, jnp.float64)
        analytic = np.asarray(jax.grad(losses.offset_regularizer)(x, eps))
        regularizer = jax.jit(losses.offset_regularizer, static_argnums=1)
        numeric = _finite_difference_gradient(lambda v: float(regularizer(v, eps)), offsets)
    np.testing.assert_allclose(analytic, numeric, atol=1e-7)
    assert np.all(analytic[0, :2] == 0) and np.abs(analytic[0, 2:]).min(axis=-1).max() > 0
    zero_grad = jax.grad(losses.offset_regularizer)(jnp.zeros((2, 4, 3)), 0.0)
    assert np.all(zero_grad == 0)


def _stage1_case(seed=6):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 8, 8)
    logits = rng.standard_normal((*shape, 3)).astype(np.float32)
    pred = CorrespondenceOutput(
        uv=jax.nn.sigmoid(logits[..., :2]),
        face_prob=jax.nn.sigmoid(logits[..., 2:]),
        face_logit=jnp.asarray(logits[..., 2:]),
    )
    uv_valid = rng.random(shape) < 0.5
    batch = {
        "source_uv": np.where(uv_valid[..., None], rng.random((*shape, 2)), 0.0).astype(np.float32),
        "source_uv_valid": uv_valid,
        "view_mask": np.array([[True, True, False], [True, False, False]]),
    }
    return pred, batch


def test_correspondence_stage_loss_ignores_padded_views():
    pred, batch = _stage1_case()
    loss, terms = losses.correspondence_stage_loss(pred, batch)
    assert float(terms["uv_l1"]) > 0 and float(terms["mask_bce"]) > 0

    changed_pred, changed_batch = _stage1_case(seed=7)
    padded = ~batch["view_mask"]
    mixed_pred = jax.tree.map(
        lambda own, other: jnp.where(padded.reshape(2, 3, 1, 1, 1), other, own), pred, changed_pred
    )
    mixed_batch = dict(batch)
    for key in ("source_uv", "source_uv_valid"):
        mask = padded.reshape(2, 3, *([1] * (batch[key].ndim - 2)))
        mixed_batch[key] = np.where(mask, changed_batch[key], batch[key])
    mixed_loss, _ = losses.correspondence_stage_loss(mixed_pred, mixed_batch)
    assert float(mixed_loss) == float(loss)

    # A real view without ground-truth UV (a dataset without UV maps) counts as padded.
    no_uv = dict(batch, source_uv_valid=batch["source_uv_valid"].copy())
    no_uv["source_uv_valid"][0, 1] = False
    dropped = dict(no_uv, view_mask=batch["view_mask"] & np.array([[1, 0, 1], [1, 1, 1]], bool))
    np.testing.assert_allclose(
        losses.correspondence_stage_loss(pred, no_uv)[0],
        losses.correspondence_stage_loss(pred, dropped)[0],
        rtol=1e-6,
    )
    # A real view's change does change it.
    real_changed = dict(batch, source_uv=batch["source_uv"] + 0.1)
    assert float(losses.correspondence_stage_loss(pred, real_changed)[0]) != float(loss)


@pytest.fixture(scope="module")
def lpips_vgg():
    return losses.load_lpips()


def test_lpips_vgg_identical_is_zero_perturbed_is_more_and_compiles_fast(lpips_vgg):
    apply_fn, params = lpips_vgg
    a, b = _image_pairs((2, 32, 32, 3), noise=0.05, seed=8)
    c = np.clip(b + 0.2 * (np.random.default_rng(9).random(b.shape) - 0.5), 0, 1).astype(np.float32)
    fn = jax.jit(apply_fn)
    start = time.perf_counter()
    same = np.asarray(fn(params, a, a))
    seconds = time.perf_counter() - start
    print(f"LPIPS VGG compile + run, 2 images 32x32: {seconds:.2f} s")
    assert seconds < 15.0
    near, far = np.asarray(fn(params, a, b)), np.asarray(fn(params, a, c))
    assert same.shape == (2,) and np.all(np.abs(same) < 1e-6)
    assert np.all(near > 1e-3) and np.all(far > near)


def _avatar_case(seed=10):
    rng = np.random.default_rng(seed)
    target, rendered = _image_pairs((1, 2, 32, 32, 3), noise=0.2, seed=seed)
    mask = (rng.random((1, 2, 32, 32)) < 0.7).astype(np.float32)
    pred = losses.Prediction(
        images=jnp.asarray(rendered),
        offsets=jnp.asarray(0.01 * rng.standard_normal((1, 20, 3)), jnp.float32),
        background=jnp.ones(3),
    )
    return pred, {"target_image": target, "target_mask": mask}


def test_total_loss_weights_its_terms_and_runs_under_jit(lpips_vgg):
    apply_fn, params = lpips_vgg
    pred, batch = _avatar_case()

    @jax.jit
    def step_loss(pred, batch, params):
        return losses.total_loss(pred, batch, WEIGHTS, lpips=(apply_fn, params))

    loss, terms = step_loss(pred, batch, params)
    bg = pred.background
    gt = losses.composite(batch["target_image"], batch["target_mask"], bg)
    out = pred.images  # the render as it is: floaters outside the mask count
    np.testing.assert_allclose(terms["l1"], np.mean(np.abs(out - gt)), rtol=1e-5)
    np.testing.assert_allclose(terms["ssim"], np.mean(losses.ssim(out, gt)), rtol=1e-5)
    lpips_reference = jax.jit(apply_fn)(params, out.reshape(2, 32, 32, 3), gt.reshape(2, 32, 32, 3))
    np.testing.assert_allclose(terms["lpips"], np.mean(lpips_reference), rtol=1e-4)
    np.testing.assert_allclose(terms["reg"], losses.offset_regularizer(pred.offsets), rtol=1e-6)
    assert float(terms["lpips"]) > 0
    expected = terms["l1"] + 0.1 * (1 - terms["ssim"]) + terms["lpips"] + 0.1 * terms["reg"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], loss)


def test_total_loss_sees_floaters_outside_the_target_mask():
    pred, batch = _avatar_case()
    no_lpips = dict(WEIGHTS, lpips=0.0)
    outside = np.asarray(batch["target_mask"]) < 0.5
    assert outside.any()
    floater = np.where(outside[..., None], 0.0, np.asarray(pred.images))  # dark where bg is 1
    clean = np.where(outside[..., None], 1.0, np.asarray(pred.images))
    loss_clean, _ = losses.total_loss(
        dataclasses.replace(pred, images=jnp.asarray(clean)), batch, no_lpips
    )
    loss_floater, _ = losses.total_loss(
        dataclasses.replace(pred, images=jnp.asarray(floater)), batch, no_lpips
    )
    assert float(loss_floater) > float(loss_clean) + 0.1


def test_total_loss_with_lpips_weight_zero_never_runs_the_network():
    pred, batch = _avatar_case()

    def refuse(*_):
        raise AssertionError("LPIPS ran with weight 0")

    no_lpips = dict(WEIGHTS, lpips=0.0)
    loss_and_grad = jax.jit(
        jax.value_and_grad(
            lambda p: losses.total_loss(p, batch, no_lpips, lpips=(refuse, None)), has_aux=True
        )
    )
    (loss, terms), grad = loss_and_grad(pred)
    assert float(terms["lpips"]) == 0.0
    np.testing.assert_allclose(
        loss, terms["l1"] + 0.1 * (1 - terms["ssim"]) + 0.1 * terms["reg"], rtol=1e-6
    )
    assert np.all(np.isfinite(grad.images)) and np.abs(grad.images).max() > 0
    with pytest.raises(ValueError, match="lpips"):
        losses.total_loss(pred, batch, WEIGHTS)
