"""Square face-framing crops of real images: the window, its intrinsics, the resampling.

The project's face framing (`uika_jax.render.camera`): square images, the head
centred and spanning `HEAD_FRACTION` of the image height. Real frames (an
importer's, or `uika reconstruct`'s photos) get there by a square window around
the head's projection, resampled to the target size; the camera's intrinsics
follow the same affine map, so projecting with the new intrinsics lands on the
resampled pixels. Image coordinates put pixel (i, j)'s centre at (j + 0.5, i + 0.5)
in both the source and the result.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class SquareCrop:
    """A square window of a source image, in image coordinates (pixel centres at j + 0.5).

    Attributes:
      left: x of the window's left edge.
      top: y of its top edge.
      side: its side in source pixels (it may extend past the image).
    """

    left: float
    top: float
    side: float

    def intrinsics(self, K: np.ndarray, size: int) -> np.ndarray:
        """The intrinsics of the window resampled to size x size pixels."""
        scale = size / self.side
        window = np.array(
            [[scale, 0, -self.left * scale], [0, scale, -self.top * scale], [0, 0, 1]]
        )
        return window @ np.asarray(K, np.float64)


def framing_crop(boxes: np.ndarray, fraction: float) -> SquareCrop:
    """The square crop of one camera that frames the head at every timestep.

    The side makes the head's larger projected extent (over timesteps) span
    `fraction` of the crop, or more if needed so that every timestep's head fits;
    the crop is centred on the union of the boxes.

    Args:
      boxes: (T, 4) the head's projected bounding box per timestep: x_min, y_min,
        x_max, y_max in image coordinates.
      fraction: the head's share of the image height (the face framing's HEAD_FRACTION).
    """
    boxes = np.asarray(boxes, np.float64)
    extent = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]).max()
    low, high = boxes[:, :2].min(0), boxes[:, 2:].max(0)
    side = max(extent / fraction, *(high - low))
    centre = 0.5 * (low + high)
    return SquareCrop(float(centre[0] - side / 2), float(centre[1] - side / 2), float(side))


def crop_square(pixels: np.ndarray, crop: SquareCrop, size: int, *, is_mask: bool) -> np.ndarray:
    """Resamples a crop of an image (H, W, 3) or mask (H, W) uint8 to size x size.

    Outside the source, images repeat their edge and masks are 0. Images are
    resampled bicubically, masks bilinearly, both antialiased when shrinking.
    """
    height, width = pixels.shape[:2]
    margin = math.ceil(3 * max(1.0, crop.side / size))
    pad = (
        max(0, math.ceil(-crop.top) + margin),
        max(0, math.ceil(crop.top + crop.side - height) + margin),
        max(0, math.ceil(-crop.left) + margin),
        max(0, math.ceil(crop.left + crop.side - width) + margin),
    )
    widths = ((pad[0], pad[1]), (pad[2], pad[3])) + ((0, 0),) * (pixels.ndim - 2)
    padded = np.pad(pixels, widths, mode="constant" if is_mask else "edge")
    left, top = crop.left + pad[2], crop.top + pad[0]
    resample = Image.Resampling.BILINEAR if is_mask else Image.Resampling.BICUBIC
    resized = Image.fromarray(padded).resize(
        (size, size), resample, box=(left, top, left + crop.side, top + crop.side)
    )
    return np.asarray(resized)
