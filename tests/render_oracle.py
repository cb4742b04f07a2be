"""Random rasterizer scenes and torch oracles mirroring gsplat 1.5.3 on CPU.

The torch mirror itself (gsplat's torch projection and intersection, and a
mirror of its CUDA compositor) lives in `uika_jax.testing.gsplat_mirror`, shared
with benchmarks/rasterizer.py; `gsplat_project` and `composite_torch` wrap it
(imported lazily, so that collecting tests needs no torch).
`composite_bruteforce` is an independent per-pixel loop used to check the mirror.
"""

from __future__ import annotations

import numpy as np

from uika_jax.render import camera


def random_scene(seed: int, n: int, width: int, height: int, n_cams: int = 2) -> dict:
    """A hard scene: behind-camera, near-plane, huge, tiny, zero-scale and dense Gaussians."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 0.6, (n, 3))
    k = n // 8
    means[:k] = rng.normal(0.0, 0.05, (k, 3))  # dense overlapping cluster
    scales = np.exp(rng.uniform(np.log(0.005), np.log(0.15), (n, 3)))
    scales[k : k + 4] = rng.uniform(0.5, 1.5, (4, 3))  # huge
    scales[k + 4 : k + 10] = rng.uniform(0.0, 1e-4, (6, 3))  # tiny
    scales[k + 10 : k + 13] = 0.0  # points
    quats = rng.normal(size=(n, 4))
    opacities = rng.uniform(0.0, 1.0, n)
    opacities[: k // 2] = rng.uniform(0.9, 1.0, k // 2)  # opaque core: early termination
    opacities[k + 13 : k + 16] = rng.uniform(0.0, 1.0 / 255.0, 3)  # below the alpha threshold
    colors = rng.uniform(0.0, 1.0, (n, 3))
    viewmats, ks = [], []
    for c in range(n_cams):
        viewmats.append(camera.orbit_viewmat(25.0 * c - 10.0, 8.0 * c, 3.0))
        focal = 0.9 * max(width, height)
        ks.append(
            np.array(
                [
                    [focal, 0.0, 0.5 * width + 7.3 * (c + 1)],
                    [0.0, 1.1 * focal, 0.5 * height - 5.1 * c],
                    [0.0, 0.0, 1.0],
                ]
            )
        )
    viewmats = np.stack(viewmats)
    # Put a few Gaussians behind the first camera and across its near plane.
    inv = np.linalg.inv(viewmats[0])
    for i, z in enumerate([-0.5, -0.01, 0.005, 0.02, 0.05, 0.3]):
        p = np.array([rng.uniform(-0.1, 0.1) * max(z, 0.05), 0.02 * i * max(z, 0.05), z, 1.0])
        means[k + 16 + i] = (inv @ p)[:3]
    f32 = np.float32
    return {
        "means": means.astype(f32),
        "quats": quats.astype(f32),
        "scales": scales.astype(f32),
        "opacities": opacities.astype(f32),
        "colors": colors.astype(f32),
        "viewmats": viewmats.astype(f32),
        "Ks": np.stack(ks).astype(f32),
        "width": width,
        "height": height,
    }


def gsplat_project(torch, ti, scene: dict, radius_rule: str = "opacity", eps2d: float = 0.3):
    """gsplat's torch projection of a numpy scene (`gsplat_mirror.project`)."""
    from uika_jax.testing import gsplat_mirror

    t = {k: torch.tensor(v) for k, v in scene.items() if isinstance(v, np.ndarray)}
    return gsplat_mirror.project(
        t["means"], t["quats"], t["scales"], t["opacities"], t["viewmats"], t["Ks"],
        scene["width"], scene["height"], radius_rule=radius_rule, eps2d=eps2d,
    )  # fmt: skip


def composite_torch(torch, *args, **kwargs):
    """The torch mirror of gsplat's CUDA compositor (`gsplat_mirror.composite`)."""
    from uika_jax.testing import gsplat_mirror

    return gsplat_mirror.composite(*args, **kwargs)


def composite_bruteforce(means2d, conics, colors, opacities, radii, depths, width, height):
    """Per-pixel loop over all Gaussians in exact depth order (numpy float64), no tiles.

    A Gaussian counts at a pixel when its tile box (16 px tiles) covers the pixel's tile.
    """
    n_cams, _n = means2d.shape[:2]
    d = colors.shape[-1]
    out = np.zeros((n_cams, height, width, d))
    alphas = np.zeros((n_cams, height, width, 1))
    for cam in range(n_cams):
        order = [g for g in np.argsort(depths[cam], kind="stable") if (radii[cam, g] > 0).all()]
        for i in range(height):
            for j in range(width):
                tr, acc = 1.0, np.zeros(d)
                ti, tj = i // 16, j // 16
                for g in order:
                    m = means2d[cam, g].astype(np.float64)
                    r = radii[cam, g]
                    x0 = int(np.clip(np.floor(m[0] / 16 - r[0] / 16), 0, None))
                    x1 = int(np.ceil(m[0] / 16 + r[0] / 16))
                    y0 = int(np.clip(np.floor(m[1] / 16 - r[1] / 16), 0, None))
                    y1 = int(np.ceil(m[1] / 16 + r[1] / 16))
                    if not (x0 <= tj < x1 and y0 <= ti < y1):
                        continue
                    dx, dy = m[0] - (j + 0.5), m[1] - (i + 0.5)
                    c = conics[cam, g].astype(np.float64)
                    sigma = 0.5 * (c[0] * dx * dx + c[2] * dy * dy) + c[1] * dx * dy
                    alpha = min(0.999, opacities[cam, g] * np.exp(-sigma))
                    if sigma < 0 or alpha < 1.0 / 255.0:
                        continue
                    if tr * (1 - alpha) <= 1e-4:
                        break
                    acc += colors[cam, g] * alpha * tr
                    tr *= 1 - alpha
                out[cam, i, j] = acc
                alphas[cam, i, j, 0] = 1 - tr
    return out, alphas
