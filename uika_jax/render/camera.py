"""Pinhole cameras in the OpenCV convention, and the project's face framing.

A camera is a world-to-camera 4x4 `viewmat` (x right, y down, z forward) and
3x3 intrinsics `K`. Pixel (i, j) (row, column) has its centre at image
coordinates (j + 0.5, i + 0.5), as in gsplat.

Face framing (shared by the synthetic data, the importers and reconstruction):
square images, the head centred, the head spanning `HEAD_FRACTION` of the image
height.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

HEAD_FRACTION = 0.7
DEFAULT_FOV_DEG = 20.0


def intrinsics(focal: float, width: int, height: int) -> np.ndarray:
    """Returns K (3, 3) with the principal point at the image centre."""
    return np.array(
        [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], np.float32
    )


def focal_from_fov(fov_deg: float, size: int) -> float:
    """Returns the focal length in pixels giving `fov_deg` across `size` pixels."""
    return 0.5 * size / np.tan(np.deg2rad(fov_deg) / 2.0)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 1.0, 0.0)) -> np.ndarray:
    """Returns the OpenCV world-to-camera matrix of a camera at `eye` facing `target`.

    Args:
      eye: camera centre (3,).
      target: the point the optical axis passes through (3,).
      up: world direction that appears upwards in the image (3,).
    """
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("look_at: `up` is parallel to the viewing direction")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    rotation = np.stack([x, y, z])
    viewmat = np.eye(4)
    viewmat[:3, :3] = rotation
    viewmat[:3, 3] = -rotation @ eye
    return viewmat.astype(np.float32)


def orbit_viewmat(
    yaw_deg: float, pitch_deg: float, distance: float, target: np.ndarray = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Returns a camera orbiting `target`: yaw about +y (0 = in front, on +z), pitch up."""
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    direction = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    target = np.asarray(target, np.float64)
    return look_at(target + distance * direction, target)


def framing_camera(
    head_center: np.ndarray,
    head_height: float,
    image_size: int,
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    fov_deg: float = DEFAULT_FOV_DEG,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (viewmat, K) framing a head per the project's face framing.

    Args:
      head_center: centre of the head's bounding box (3,).
      head_height: height of the head (chin to crown) in world units.
      image_size: side of the square image in pixels.
      yaw_deg: orbit angle about the vertical axis; 0 looks at the face.
      pitch_deg: orbit elevation.
      fov_deg: vertical field of view.
    """
    focal = focal_from_fov(fov_deg, image_size)
    distance = focal * head_height / (HEAD_FRACTION * image_size)
    return orbit_viewmat(yaw_deg, pitch_deg, distance, head_center), intrinsics(
        focal, image_size, image_size
    )


def world_to_camera(points: jnp.ndarray, viewmat: jnp.ndarray) -> jnp.ndarray:
    """Maps points (..., 3) to camera coordinates with a 4x4 world-to-camera matrix."""
    return points @ viewmat[:3, :3].T + viewmat[:3, 3]


def project(points_cam: jnp.ndarray, K: jnp.ndarray) -> jnp.ndarray:
    """Projects camera-space points (..., 3) to image coordinates (..., 2) (no clipping)."""
    return points_cam[..., :2] / points_cam[..., 2:3] * jnp.stack([K[0, 0], K[1, 1]]) + jnp.stack(
        [K[0, 2], K[1, 2]]
    )
