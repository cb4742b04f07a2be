"""gsplat 1.5.3's rasterizer on CPU in torch: the oracle of the parity tests and benchmarks.

Test and benchmark use only (imports torch and gsplat). gsplat's own
compositor (`_torch_impl._rasterize_to_pixels`) does not run on CPU: it calls
the CUDA `rasterize_to_indices_in_range` and needs `nerfacc`. So:

- `project`: gsplat's torch projection (`_torch_impl._fully_fused_projection`),
  with radii following its CUDA kernel's opacity rule when asked;
- `composite`: a mirror of the CUDA forward kernel (RasterizeToPixels3DGSFwd.cu),
  tile by tile, one Gaussian at a time, in torch ops; torch autograd through it
  gives reference gradients (gsplat's CUDA backward zeroes the sigma/opacity
  gradient where alpha is clamped to 0.999, as torch's clamp does);
- `composite_vectorised`: the same compositing as batched torch ops (tiles
  grouped by intersection count, padded, alpha for every slot x pixel, T by
  a cumulative product): the peer a torch user would write, for benchmarks;
- `intersect`: gsplat's torch `_isect_tiles` / `_isect_offset_encode`;
- `render`: the whole pipeline (projection, `intersect`, then `composite` or
  another compositor), autograd-able.

`composite` is the correctness oracle, not a fast path: it is a Python loop
over every (tile, intersection).
"""

from __future__ import annotations

import torch
from gsplat.cuda import _torch_impl as ti

from uika_kernels.tiles import ALPHA_THRESHOLD, tile_grid


def project(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    radius_rule: str = "opacity",
    eps2d: float = 0.3,
):
    """The projection of gsplat's torch code; with the opacity rule, its CUDA kernel's radii.

    Args are torch tensors as in `uika_jax.render.rasterization` (one scene).

    Returns:
      (radii (C, N, 2) int32, means2d (C, N, 2), depths (C, N), conics (C, N, 3)).
    """
    covars, _ = ti._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = ti._fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d
    )
    if radius_rule == "opacity":
        means_c, covars_c = ti._world_to_cam(means, covars, viewmats)
        _, cov2d = ti._persp_proj(means_c, covars_c, Ks, width, height)
        cov2d = cov2d + torch.eye(2) * eps2d
        op = opacities[None].expand(depths.shape)
        thr = torch.tensor(ALPHA_THRESHOLD, dtype=torch.float32)
        extend = torch.clamp(torch.sqrt(2.0 * torch.log(torch.clamp(op / thr, min=1.0))), max=3.33)
        rx = torch.ceil(extend * torch.sqrt(cov2d[..., 0, 0]))
        ry = torch.ceil(extend * torch.sqrt(cov2d[..., 1, 1]))
        keep = (radii > 0).all(-1) & (op >= thr) & ((rx > 0) | (ry > 0))
        keep &= (means2d[..., 0] + rx > 0) & (means2d[..., 0] - rx < width)
        keep &= (means2d[..., 1] + ry > 0) & (means2d[..., 1] - ry < height)
        radii = torch.where(keep[..., None], torch.stack([rx, ry], -1), 0.0).int()
    return radii, means2d, depths, conics


def composite(
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
                    use = ~done & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
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


def render(
    means,
    quats,
    scales,
    opacities,
    colors,
    viewmats,
    Ks,
    width,
    height,
    *,
    tile_size=16,
    backgrounds=None,
    render_mode="RGB",
    compositor=composite,
    intersections=None,
):
    """gsplat.rasterization (packed=False, opacity radius rule) on CPU, autograd-able.

    Args:
      means: (N, 3) torch tensors here and below, as in `uika_jax.render.rasterization`.
      quats: (N, 4).
      scales: (N, 3).
      opacities: (N,).
      colors: (N, D).
      viewmats: (C, 4, 4).
      Ks: (C, 3, 3).
      width: image width.
      height: image height.
      tile_size: tile side in pixels.
      backgrounds: (C, D) or None.
      render_mode: "RGB" or "RGB+D".
      compositor: `composite` (the loop mirror) or `composite_vectorised`.
      intersections: `intersect`'s result for these Gaussians and cameras, to reuse
        (gsplat's torch intersection is a Python loop over Gaussians); None: computed.

    Returns:
      (render (C, H, W, D'), alphas (C, H, W, 1), radii (C, N, 2), flatten_ids (n_isects,)).
    """
    if render_mode not in ("RGB", "RGB+D"):
        raise ValueError(f"render_mode {render_mode!r} is not mirrored")
    with torch.no_grad():
        radii, _, _, _ = project(means, quats, scales, opacities, viewmats, Ks, width, height)
    covars, _ = ti._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    _, means2d, depths, conics, _ = ti._fully_fused_projection(
        means, covars, viewmats, Ks, width, height
    )
    c = means2d.shape[0]
    if intersections is None:
        intersections = intersect(means2d, radii, depths, width, height, tile_size)
    offsets, flat = intersections
    op = opacities[None].expand(c, -1)
    colors = colors[None].expand(c, -1, -1)
    if render_mode == "RGB+D":
        colors = torch.cat([colors, depths[..., None]], -1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, torch.zeros(c, 1)], -1)
    rc, ra = compositor(means2d, conics, colors, op, width, height, tile_size, offsets, flat,
                        backgrounds)  # fmt: skip
    return rc, ra, radii, flat


def intersect(means2d, radii, depths, width, height, tile_size=16):
    """Tile intersection by gsplat's torch code: (offsets (C, tiles down, across), flatten_ids)."""
    tw, th = tile_grid(width, height, tile_size)
    _, isect_ids, flat = ti._isect_tiles(means2d, radii, depths, tile_size, tw, th)
    return ti._isect_offset_encode(isect_ids, means2d.shape[0], tw, th), flat


def composite_vectorised(
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
    max_elements=1 << 24,
):
    """`composite` as batched torch ops: the vectorised peer of the benchmarks, autograd-able.

    Tiles with intersections are sorted by count and taken in groups of similar
    counts (at most 25% padding) and at most `max_elements` slot x pixel
    entries, each group padded to its longest tile: alpha for every (tile,
    slot, pixel) at once, T as a cumulative product over the slots, a slot used
    where the product up to and including it stays above 1e-4 (gsplat's stop
    rule: once T (1 - alpha) <= 1e-4 the pixel stops).
    Memory grows with the intersections times the tile's pixels (autograd keeps
    each group's tensors for the backward pass).

    Args and returns as `composite`; `max_elements` bounds one group's tensors.
    """
    n_cams = means2d.shape[0]
    d = colors.shape[-1]
    th, tw = offsets.shape[-2:]
    n_pix = tile_size * tile_size
    n_isects = flatten_ids.shape[0]
    starts = offsets.reshape(-1).long()
    counts = torch.diff(starts, append=torch.tensor([n_isects]))
    m2, con = means2d.reshape(-1, 2), conics.reshape(-1, 3)
    col, op = colors.reshape(-1, d), opacities.reshape(-1)
    p = torch.arange(n_pix)
    order = torch.argsort(counts, descending=True, stable=True)
    busy = order[counts[order] > 0]
    tiles, colour_parts, trans_parts = [], [], []
    i = 0
    while i < busy.shape[0]:
        k = int(counts[busy[i]])  # the group's longest tile; the others pad up to it
        similar = int((5 * counts[busy[i:]] >= 4 * k).sum())  # at most 25% padding
        group = busy[i : i + min(similar, max(1, max_elements // (k * n_pix)))]
        i += group.shape[0]
        local = group % (th * tw)
        px = ((local % tw) * tile_size)[:, None] + p % tile_size + 0.5
        py = ((local // tw) * tile_size)[:, None] + p // tile_size + 0.5
        slot = starts[group][:, None] + torch.arange(k)
        listed = torch.arange(k) < counts[group][:, None]
        g = flatten_ids[slot.clamp(max=max(n_isects - 1, 0))].long()
        dx = m2[g][..., 0:1] - px[:, None, :].to(m2.dtype)
        dy = m2[g][..., 1:2] - py[:, None, :].to(m2.dtype)
        c = con[g]
        sigma = 0.5 * (c[..., 0:1] * dx * dx + c[..., 2:3] * dy * dy) + c[..., 1:2] * dx * dy
        alpha = torch.clamp(op[g][..., None] * torch.exp(-sigma), max=0.999)
        keep = listed[..., None] & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        alpha = torch.where(keep, alpha, 0.0)
        t_after = torch.cumprod(1.0 - alpha, dim=1)
        t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], 1)
        use = t_after > 1e-4
        weight = torch.where(use, alpha * t_before, 0.0)
        colour_parts.append(torch.einsum("tkp,tkd->tpd", weight, col[g]))
        trans_parts.append(torch.prod(torch.where(use, 1.0 - alpha, 1.0), dim=1))
        tiles.append(group)
    colour = means2d.new_zeros(th * tw * n_cams, n_pix, d)
    trans = means2d.new_ones(th * tw * n_cams, n_pix)
    if tiles:
        index = (torch.cat(tiles),)
        colour = colour.index_put(index, torch.cat(colour_parts))
        trans = trans.index_put(index, torch.cat(trans_parts))

    def image(x):
        x = x.reshape(n_cams, th, tw, tile_size, tile_size, *x.shape[2:]).transpose(2, 3)
        return x.reshape(n_cams, th * tile_size, tw * tile_size, *x.shape[5:])[:, :height, :width]

    render, t_final = image(colour), image(trans)[..., None]
    if backgrounds is not None:
        render = render + t_final * backgrounds[:, None, None, :]
    return render, 1.0 - t_final
