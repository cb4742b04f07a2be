"""The rasterizer's compositing backends: the registry, the Pallas kernels, and ``"auto"``.

A backend composites binned Gaussians with the signature and outputs of the
reference `composite.composite`. Registered names:

- ``"reference"``: `composite.composite` (plain jnp, every platform).
- ``"pallas"``, ``"pallas_triton"``, ``"pallas_mosaic"`` and their
  ``"_interpret"`` variants: the Pallas kernels of `uika_kernels.raster`,
  imported and registered on first use (`uika_kernels` is leaf code that
  imports nothing of ours).
- ``"auto"``: per platform the computation is lowered for, Pallas Triton on
  CUDA/ROCm GPUs and Pallas Mosaic on TPU once that platform is in
  `VERIFIED_PALLAS_PLATFORMS`, the reference everywhere else (CPU included).
- anything added with `register_backend`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax

from uika_jax.render import composite

# Platforms (as `jax.lax.platform_dependent` names them) on which "auto" runs the Pallas
# kernel. A platform goes in only once its kernel passed the gpu- or tpu-marked parity
# tests of tests/test_pallas_raster.py on real hardware; until then "auto" keeps the
# reference there. None has yet.
VERIFIED_PALLAS_PLATFORMS: frozenset[str] = frozenset()
PALLAS_BACKEND_OF_PLATFORM = {
    "cuda": "pallas_triton",
    "rocm": "pallas_triton",
    "tpu": "pallas_mosaic",
}

_BACKENDS: dict[str, Callable] = {"reference": composite.composite}


def register_backend(name: str, fn: Callable) -> None:
    """Registers a compositing backend with the signature of `composite.composite`."""
    _BACKENDS[name] = fn


def _register_pallas() -> None:
    raster = importlib.import_module("uika_kernels.raster")
    for name, fn in raster.BACKENDS.items():
        _BACKENDS.setdefault(name, fn)


def get_backend(name: str) -> Callable:
    """The compositing function registered as `name` (importing the Pallas kernels on demand).

    Raises:
      ValueError: no backend of that name.
    """
    if name == "auto":
        return _auto
    if name not in _BACKENDS and name.startswith("pallas"):
        _register_pallas()
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; have {sorted({'auto', *_BACKENDS})}")
    return _BACKENDS[name]


def resolve(name: str) -> str:
    """`name`, or for "auto" the reference where no platform's kernel is verified yet."""
    if name == "auto" and set(auto_choices().values()) == {"reference"}:
        return "reference"
    return name


def auto_choices(verified: frozenset[str] | None = None) -> dict[str, str]:
    """The backend "auto" runs on each GPU/TPU platform (the reference on any other)."""
    verified = VERIFIED_PALLAS_PLATFORMS if verified is None else verified
    return {
        platform: (pallas if platform in verified else "reference")
        for platform, pallas in PALLAS_BACKEND_OF_PLATFORM.items()
    }


def _auto(means2d, conics, opacities, colors, flat_ids, tile_start, tile_count, width, height,
          **kwargs):  # fmt: skip
    """The "auto" backend: `auto_choices()` per lowering platform, the reference elsewhere."""
    arrays = (means2d, conics, opacities, colors, flat_ids, tile_start, tile_count)
    branches = {
        platform: functools.partial(get_backend(name), width=width, height=height, **kwargs)
        for platform, name in auto_choices().items()
    }
    default = functools.partial(composite.composite, width=width, height=height, **kwargs)
    return jax.lax.platform_dependent(*arrays, default=default, **branches)
