"""Random rasterizer scenes and torch oracles mirroring gsplat 1.5.3 on CPU.

gsplat's own compositor (`_torch_impl._rasterize_to_pixels`) does not run on
CPU: it calls the CUDA `rasterize_to_indices_in_range` and needs `nerfacc`.
`composite_torch` mirrors the CUDA forward kernel (RasterizeToPixels3DGSFwd.cu)
tile by tile; torch autograd through it gives reference gradients (gsplat's
CUDA backward zeroes the sigma/opacity gradient where alpha is clamped to
0.999, as torch's clamp does). `composite_bruteforce` is an independent
per-pixel loop used to check the mirror.
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
    """gsplat's torch projection; with the opacity rule, radii follow its CUDA kernel's rule."""
    t = {k: torch.tensor(v) for k, v in scene.items() if isinstance(v, np.ndarray)}
    w, h = scene["width"], scene["height"]
    covars, _ = ti._quat_scale_to_covar_preci(t["quats"], t["scales"], compute_preci=False)
    radii, means2d, depths, conics, _ = ti._fully_fused_projection(
        t["means"], covars, t["viewmats"], t["Ks"], w, h, eps2d=eps2d
    )
    if radius_rule == "opacity":
        means_c, covars_c = ti._world_to_cam(t["means"], covars, t["viewmats"])
        _, cov2d = ti._persp_proj(means_c, covars_c, t["Ks"], w, h)
        cov2d = cov2d + torch.eye(2) * eps2d
        op = t["opacities"][None].expand(depths.shape)
        thr = torch.tensor(1.0 / 255.0, dtype=torch.float32)
        extend = torch.clamp(torch.sqrt(2.0 * torch.log(torch.clamp(op / thr, min=1.0))), max=3.33)
        rx = torch.ceil(extend * torch.sqrt(cov2d[..., 0, 0]))
        ry = torch.ceil(extend * torch.sqrt(cov2d[..., 1, 1]))
        keep = (radii > 0).all(-1) & (op >= thr) & ((rx > 0) | (ry > 0))
        keep &= (means2d[..., 0] + rx > 0) & (means2d[..., 0] - rx < w)
        keep &= (means2d[..., 1] + ry > 0) & (means2d[..., 1] - ry < h)
        radii = torch.where(keep[..., None], torch.stack([rx, ry], -1), 0.0).int()
    return radii, means2d, depths, conics


def composite_torch(
    torch,
    means2d,
    conics,
    colors,
    opacities,
    width,
    height,
    tile_size,
    offsets,
    flatten_ids,
    backgrounds=None,
):
    """Mirror of gsplat's CUDA rasterize_to_pixels forward for (C, N, ...) inputs, autograd-able.

    Returns (colors (C, H, W, D), alphas (C, H, W, 1)).
    """
    n_cams, _n = means2d.shape[:2]
    d = colors.shape[-1]
    th, tw = offsets.shape[-2:]
    n_isects = flatten_ids.shape[0]
    flat_off = [*offsets.reshape(-1).tolist(), n_isects]
    m2 = means2d.reshape(-1, 2)
    con = conics.reshape(-1, 3)
    col = colors.reshape(-1, d)
    op = opacities.reshape(-1)
    rows_c, rows_a = [], []
    for cam in range(n_cams):
        img_rows_c = []
        img_rows_a = []
        for ty in range(th):
            tile_cols_c, tile_cols_a = [], []
            for tx in range(tw):
                tile = cam * th * tw + ty * tw + tx
                ids = flatten_ids[flat_off[tile] : flat_off[tile + 1]].long()
                ys = torch.arange(ty * tile_size, (ty + 1) * tile_size, dtype=m2.dtype) + 0.5
                xs = torch.arange(tx * tile_size, (tx + 1) * tile_size, dtype=m2.dtype) + 0.5
                py, px = torch.meshgrid(ys, xs, indexing="ij")
                px, py = px.reshape(-1), py.reshape(-1)
                tr = torch.ones_like(px)
                acc = torch.zeros(px.shape[0], d, dtype=m2.dtype)
                done = torch.zeros(px.shape[0], dtype=torch.bool)
                for g in ids.tolist():
                    dx = m2[g, 0] - px
                    dy = m2[g, 1] - py
                    c = con[g]
                    sigma = 0.5 * (c[0] * dx * dx + c[2] * dy * dy) + c[1] * dx * dy
                    alpha = torch.clamp(op[g] * torch.exp(-sigma), max=0.999)
                    use = ~done & (sigma >= 0) & (alpha >= 1.0 / 255.0)
                    next_t = tr * (1.0 - alpha)
                    stop = use & (next_t <= 1e-4)
                    done = done | stop
                    use = use & ~stop
                    acc = acc + torch.where(use[:, None], col[g][None] * (alpha * tr)[:, None], 0.0)
                    tr = torch.where(use, next_t, tr)
                tile_cols_c.append(acc.reshape(tile_size, tile_size, d))
                tile_cols_a.append(tr.reshape(tile_size, tile_size))
            img_rows_c.append(torch.cat(tile_cols_c, 1))
            img_rows_a.append(torch.cat(tile_cols_a, 1))
        rows_c.append(torch.cat(img_rows_c, 0)[:height, :width])
        rows_a.append(torch.cat(img_rows_a, 0)[:height, :width])
    render = torch.stack(rows_c)
    t_final = torch.stack(rows_a)[..., None]
    if backgrounds is not None:
        render = render + t_final * backgrounds[:, None, None, :]
    return render, 1.0 - t_final


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
