"""Shared rasterizer test cases: the scene shapes and the jitted programs many tests run.

Compiling the rasterizer's traversal dominates these tests' time (about 7 s a forward and
12 s a forward + backward program on 2 CPU cores, whatever the scene's size), so tests
share a few scene shapes and a few jitted programs, taking everything that varies as
arguments: a program compiled for one test is reused by the next from the in-process jit
cache, or from the persistent compilation cache (which JAX never gives a program with a
host callback, such as the overflow warning's: the programs here turn it off). They
compile with `FAST_COMPILE`: about a third of the time, the same maths rounded differently
(about 1e-6 relative apart from the default options).

- `WIDE` is the scene of the torch-oracle parity tests and of the `rasterization()` API
  tests: its forward program (`rasterization` with the default config) and
  `render_value_and_grad` on it (RGB+D, backgrounds) are compiled once for all of them.
- `bin_gaussians` is the one jitted binning program of the binning and compositing tests,
  with `bin_capacity` slots for a scene shape.
- `composite_value_and_grad` is the compositor-level program of the compositing and kernel
  tests, for any compositing function with the reference's signature.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from network_fixtures import FAST_COMPILE
from render_oracle import random_scene

from uika_jax.render import RasterConfig, binning, rasterization
from uika_kernels.tiles import tile_grid

# `rasterization()`'s array arguments, in order.
KEYS = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")
# (seed, Gaussians, width, height, cameras): partial last tile column and row, W != H,
# two cameras with different intrinsics; `random_scene`'s hard cases (behind the camera,
# across the near plane, huge, tiny, zero-scale, faint and opaque Gaussians).
WIDE = (2, 300, 70, 45, 2)
# One camera, portrait: for the cheap projection and binning parity tests.
TALL = (3, 150, 40, 70, 1)
# Small enough for `render_oracle.composite_bruteforce`'s per-pixel Python loop.
BRUTEFORCE = (7, 120, 40, 29, 1)
# Every scene a torch-oracle test renders.
ORACLE_SCENES = (WIDE, TALL, BRUTEFORCE)

bin_gaussians = jax.jit(
    binning.bin_gaussians,
    static_argnums=(3, 4),
    static_argnames=("tile_size", "capacity"),
    compiler_options=FAST_COMPILE,
)


@functools.cache
def wide_scene() -> dict:
    """`random_scene(*WIDE)` (numpy arrays; do not modify)."""
    return random_scene(*WIDE)


def scene_arrays(scene: dict, dtype=None) -> list[jax.Array]:
    """The scene's `KEYS` arrays as jax arrays (optionally cast to `dtype`)."""
    return [jnp.asarray(scene[k], dtype) for k in KEYS]


def bin_capacity(n_cams: int, n: int, width: int, height: int) -> int:
    """Slots that hold every intersection of a scene shape: C * N * n_tiles (no overflow)."""
    tiles_x, tiles_y = tile_grid(width, height, 16)
    return n_cams * n * tiles_x * tiles_y


def loss_weights(seed: int, shape: tuple[int, ...], channels: int) -> tuple[jax.Array, ...]:
    """Random weights (colour (*shape, channels), alpha (*shape, 1)) for a linear loss."""
    rng = np.random.default_rng(seed)
    wc = rng.normal(size=(*shape, channels)).astype(np.float32)
    wa = rng.normal(size=(*shape, 1)).astype(np.float32)
    return jnp.asarray(wc), jnp.asarray(wa)


@functools.partial(
    jax.jit,
    static_argnames=("width", "height", "render_mode", "config"),
    compiler_options=FAST_COMPILE,
)
def render_value_and_grad(
    means: jax.Array,
    quats: jax.Array,
    scales: jax.Array,
    opacities: jax.Array,
    colors: jax.Array,
    backgrounds: jax.Array,
    viewmats: jax.Array,
    Ks: jax.Array,
    weights_color: jax.Array,
    weights_alpha: jax.Array,
    *,
    width: int,
    height: int,
    render_mode: str = "RGB+D",
    config: RasterConfig | None = None,
):
    """The loss sum(render * weights_color) + sum(alphas * weights_alpha), its gradients.

    Args:
      means: as `rasterization`, likewise quats, scales, opacities, colors, viewmats, Ks.
      quats: see means.
      scales: see means.
      opacities: see means.
      colors: see means.
      backgrounds: (..., C, D) background colours.
      viewmats: see means (not differentiated).
      Ks: see means (not differentiated).
      weights_color: weights of the rendered channels, shaped like the render.
      weights_alpha: weights of the alphas, shaped like them.
      width: image width.
      height: image height.
      render_mode: as `rasterization`.
      config: as `rasterization`, with the overflow warning off (its host callback would keep
        the program out of the persistent compilation cache).

    Returns:
      ((loss, (render, alphas, meta)), gradients of the loss with respect to means, quats,
      scales, opacities, colors and backgrounds).
    """
    config = dataclasses.replace(config or RasterConfig(), warn_on_overflow=False)

    def loss(means, quats, scales, opacities, colors, backgrounds):
        render, alphas, meta = rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            backgrounds=backgrounds, render_mode=render_mode, config=config,
        )  # fmt: skip
        value = jnp.sum(render * weights_color) + jnp.sum(alphas * weights_alpha)
        return value, (render, alphas, meta)

    return jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)(
        means, quats, scales, opacities, colors, backgrounds
    )


@functools.partial(
    jax.jit,
    static_argnames=("compositor", "width", "height", "tile_cap"),
    compiler_options=FAST_COMPILE,
)
def composite_value_and_grad(
    means2d: jax.Array,
    conics: jax.Array,
    opacities: jax.Array,
    colors: jax.Array,
    bins: binning.Bins,
    weights_color: jax.Array,
    weights_transmittance: jax.Array,
    *,
    compositor: Callable,
    width: int,
    height: int,
    tile_cap: int | None = None,
):
    """sum(colour * weights_color) + sum(T_final * weights_transmittance), its gradients.

    Args:
      means2d: image-space means (C, N, 2).
      conics: conics (C, N, 3).
      opacities: opacities (C, N).
      colors: colours or features (C, N, D).
      bins: the `binning.Bins` of the means.
      weights_color: (C, H, W, D).
      weights_transmittance: (C, H, W).
      compositor: `composite.composite` or a function with its signature (keep one object
        per variant: it is part of the jit cache key).
      width: image width.
      height: image height.
      tile_cap: as `composite.composite`.

    Returns:
      ((loss, (colour, T_final, truncated)), gradients with respect to means2d, conics,
      opacities and colors).
    """

    def loss(means2d, conics, opacities, colors):
        out = compositor(
            means2d, conics, opacities, colors, bins.flat_ids, bins.tile_start,
            bins.tile_count, width, height, tile_cap=tile_cap,
        )  # fmt: skip
        return jnp.sum(out[0] * weights_color) + jnp.sum(out[1] * weights_transmittance), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
        means2d, conics, opacities, colors
    )


def rel_error(a, b) -> float:
    """Relative L2 error of `a` against the reference `b` (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
