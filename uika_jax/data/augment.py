"""Photometric augmentation of source images: colour jitter, blur, noise, JPEG re-encoding.

The pipeline applies it (an option) to a sample's source views only, never to
its targets: the network must reconstruct the clean identity from degraded
inputs, as from a phone video. Each view independently gets, each with its own
probability and in this order (a camera pipeline's):

- colour jitter: brightness and contrast scale, saturation towards grey, and a
  per-channel gain (white balance), each factor uniform in [1 - a, 1 + a];
- Gaussian blur with sigma uniform in `blur_sigma`, in pixels of a 512 x 512 image
  (scaled with the image size, so a blur looks alike at every resolution);
- additive Gaussian noise with sigma uniform in `noise_sigma` (8-bit levels);
- JPEG re-encoding at a quality uniform in `jpeg_quality`.

Images stay 8-bit RGB (S, S, 3) uint8 throughout. The draws come from the
generator given, which the pipeline seeds from (seed, step, slot), so an
augmented batch is reproducible.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageFilter

BLUR_REFERENCE_SIZE = 512
"""Image size at which `AugmentConfig.blur_sigma` is in pixels."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the photometric augmentations (module docstring)."""

    jitter_probability: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.3
    channel_gain: float = 0.05
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 4.0)
    noise_probability: float = 0.2
    noise_sigma: tuple[float, float] = (1.0, 8.0)
    jpeg_probability: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 95)

    def __post_init__(self):
        probabilities = (
            self.jitter_probability,
            self.blur_probability,
            self.noise_probability,
            self.jpeg_probability,
        )
        if not all(0.0 <= p <= 1.0 for p in probabilities):
            raise ValueError(f"augmentation probabilities must lie in [0, 1]: {self}")
        for name in ("blur_sigma", "noise_sigma", "jpeg_quality"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"AugmentConfig.{name} must be an ordered range, got {low, high}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")


def _factor(rng: np.random.Generator, amount: float, size=None):
    return rng.uniform(1.0 - amount, 1.0 + amount, size)


def _jitter(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    x = image.astype(np.float32)
    grey = x @ np.float32([0.299, 0.587, 0.114])
    x = grey[..., None] + _factor(rng, config.saturation) * (x - grey[..., None])
    x = x.mean() + _factor(rng, config.contrast) * (x - x.mean())
    x = x * _factor(rng, config.brightness) * _factor(rng, config.channel_gain, 3)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    sigma = rng.uniform(*config.blur_sigma) * image.shape[0] / BLUR_REFERENCE_SIZE
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def _noise(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    sigma = rng.uniform(*config.noise_sigma)
    noisy = image + rng.normal(0.0, sigma, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def augment_image(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """One view, augmented (module docstring).

    Args:
      image: (S, S, 3) uint8 RGB.
      rng: the draws' generator.
      config: probabilities and ranges.

    Returns:
      A new (S, S, 3) uint8 image (the input is not modified).
    """
    steps = (
        (config.jitter_probability, _jitter),
        (config.blur_probability, _blur),
        (config.noise_probability, _noise),
        (config.jpeg_probability, _jpeg),
    )
    out = np.array(image, np.uint8, copy=True)
    for probability, step in steps:
        if rng.random() < probability:
            out = step(out, rng, config)
    return out


def augment_views(images: np.ndarray, rng: np.random.Generator, config: AugmentConfig):
    """Every view of (n, S, S, 3) uint8 images augmented independently; a new array."""
    return np.stack([augment_image(image, rng, config) for image in images])
