"""Cameras and rendering: the differentiable tile rasterizer of 3D Gaussians."""

from uika_jax.render.backends import register_backend
from uika_jax.render.capacity import calibrate_capacity
from uika_jax.render.config import RasterConfig, RasterOverflowError
from uika_jax.render.rasterize import check_overflow, rasterization

__all__ = [
    "RasterConfig",
    "RasterOverflowError",
    "calibrate_capacity",
    "check_overflow",
    "rasterization",
    "register_backend",
]
