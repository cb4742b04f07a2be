"""`rasterization()` against gsplat 1.5.3 (its torch projection and tile intersection on CPU
and a torch mirror of its CUDA compositor), forward and gradients, and gradients against
finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_oracle
from raster_cases import (
    KEYS,
    WIDE,
    loss_weights,
    rel_error,
    render_value_and_grad,
    scene_arrays,
    wide_scene,
)
from render_oracle import random_scene

from uika_jax.render import RasterConfig, rasterization


def _gsplat_render(scene, backgrounds=None, render_mode="RGB", grad=False):
    """gsplat's full pipeline on CPU (`uika_jax.testing.gsplat_mirror.render`) on leaf tensors.

    Returns:
      (colours, alphas, radii, flatten_ids, the input leaf tensors, the background leaf).
    """
    torch = require_oracle("torch")
    mirror = require_oracle("uika_jax.testing.gsplat_mirror")
    t = {k: torch.tensor(scene[k]).requires_grad_(grad) for k in KEYS}
    bg = None if backgrounds is None else torch.tensor(backgrounds).requires_grad_(grad)
    rc, ra, radii, flat = mirror.render(
        **t,
        width=scene["width"],
        height=scene["height"],
        backgrounds=bg,
        render_mode=render_mode,
    )
    return rc, ra, radii, flat, t, bg


def _max_error(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.oracle
def test_forward_parity_with_gsplat():
    _, _, w, h, _ = WIDE
    rc, ra, radii, flat, _, _ = _gsplat_render(wide_scene())
    render, alphas, meta = rasterization(
        *scene_arrays(wide_scene()), w, h, config=RasterConfig(strict=True)
    )
    np.testing.assert_array_equal(np.asarray(meta["radii"]), radii.numpy())
    total = int(meta["n_isects"])
    assert total == flat.shape[0]
    np.testing.assert_array_equal(np.asarray(meta["flatten_ids"])[:total], flat.numpy())
    err_c = _max_error(render, rc.detach().numpy())
    err_a = _max_error(alphas, ra.detach().numpy())
    assert err_c < 3e-5 and err_a < 3e-5, (err_c, err_a)  # measured 2.3e-6, 1.8e-6


@pytest.mark.oracle
def test_gradient_parity_with_gsplat():
    """RGB+D with backgrounds: the colour, depth and background terms, forward and gradients."""
    torch = require_oracle("torch")
    _, _, w, h, c = WIDE
    scene = wide_scene()
    bg = np.random.default_rng(1).uniform(0, 1, (c, 3)).astype(np.float32)
    rc, ra, _, _, t, tbg = _gsplat_render(scene, bg, "RGB+D", grad=True)
    wc, wa = loss_weights(2, (c, h, w), 4)
    (
        (rc * torch.tensor(np.asarray(wc))).sum() + (ra * torch.tensor(np.asarray(wa))).sum()
    ).backward()

    args = scene_arrays(scene)
    (_, (render, alphas, _)), grads = render_value_and_grad(
        *args[:5], jnp.asarray(bg), *args[5:], wc, wa, width=w, height=h
    )
    assert _max_error(render, rc.detach().numpy()) < 3e-5  # measured 3.6e-6
    assert _max_error(alphas, ra.detach().numpy()) < 3e-5  # measured 1.8e-6
    refs = [t[k].grad for k in KEYS[:5]] + [tbg.grad]
    for name, g, ref in zip((*KEYS[:5], "backgrounds"), grads, refs, strict=True):
        rel = rel_error(g, ref.numpy())
        assert rel < 3e-5, (name, rel)  # measured at most 2.9e-6


def test_gradients_match_finite_differences_float64():
    _, _, w, h, c = scene_shape = (5, 40, 37, 21, 2)
    with jax.enable_x64(True):
        args = scene_arrays(random_scene(*scene_shape), jnp.float64)
        args[2] = jnp.maximum(args[2], 1e-3)  # FD steps must not make scales negative
        args[3] = jnp.clip(args[3], 0.05, 0.95)
        rng = np.random.default_rng(0)
        params = [*args[:5], jnp.asarray(rng.uniform(0, 1, (c, 3)))]
        wc = jnp.asarray(rng.normal(size=(c, h, w, 4)))
        wa = jnp.ones((c, h, w, 1))

        def value_and_grads(*x):
            (value, _), grads = render_value_and_grad(
                *x, args[5], args[6], wc, wa, width=w, height=h
            )
            return float(value), grads

        _, grads = value_and_grads(*params)
        eps = 1e-7
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            direction = jnp.asarray(rng.normal(size=p.shape))
            plus = [x + eps * direction if j == i else x for j, x in enumerate(params)]
            minus = [x - eps * direction if j == i else x for j, x in enumerate(params)]
            fd = (value_and_grads(*plus)[0] - value_and_grads(*minus)[0]) / (2 * eps)
            an = float(jnp.sum(g * direction))
            # measured at most 2.2e-7 (the rounding of f over eps)
            assert abs(fd - an) <= 2e-6 * max(1.0, abs(fd)), (KEYS[i] if i < 5 else "bg", fd, an)
