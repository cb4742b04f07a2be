"""An independent SSIM for the tests: scipy's Gaussian filter in float64.

11 x 11 Gaussian window (sigma 1.5, radius 5), zeros outside the image (SAME
padding), K1 = 0.01, K2 = 0.03: the convention of `uika_jax.training.losses.ssim`.
"""

from __future__ import annotations

import numpy as np
from conftest import require_oracle


def scipy_ssim_maps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM maps (N, H, W, C) in float64 of images (N, H, W, C) (module docstring)."""
    ndimage = require_oracle("scipy.ndimage")

    def blur(x):
        return np.stack(
            [ndimage.gaussian_filter(im, 1.5, mode="constant", radius=5, axes=(0, 1)) for im in x]
        )

    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
