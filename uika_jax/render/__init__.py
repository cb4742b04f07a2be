"""Cameras and rendering: the differentiable tile rasterizer of 3D Gaussians."""

from uika_jax.render.capacity import calibrate_capacity
from uika_jax.render.rasterize import (
    RasterConfig,
    RasterOverflowError,
    rasterization,
    register_backend,
)

__all__ = [
    "RasterConfig",
    "RasterOverflowError",
    "calibrate_capacity",
    "rasterization",
    "register_backend",
]
