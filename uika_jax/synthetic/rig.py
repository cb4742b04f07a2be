"""The synthetic dataset's 9 fixed views, jittered per identity.

`FIXED_VIEWS` lists the rig's (yaw, pitch) in degrees, yaw about the world
+y axis (positive: from the subject's left, +x) and pitch the camera's
elevation (positive: from above):

    near frontal:  (0, 0), (-25, 0), (25, 0), (0, 15), (0, -15)
    wide:          (-55, 0), (55, 0), (-40, 20), (40, 20)

so five views stay within 25 degrees of the face (where frontal face
detectors and most phone footage live: dlib's HOG detector found the face in
97% of them, 32 jittered identities with hair and random lights at 128 pixels
upsampled to 256, against 59% with views at (+-30, +-20) instead) and four
more reach round to the ears and look down from above, together covering the
front half of the head. Every view frames the identity's neutral head as the project's
face framing does (`uika_jax.synthetic.views.identity_framing`, then
`uika_jax.render.camera.framing_camera`: the head centred, crown to chin
spanning `HEAD_FRACTION` of the image height).

`fixed_view_rig(model, shape, size, seed)` jitters each camera of an identity
(deterministically by the identity's seed; `RigJitter` holds the ranges):
yaw and pitch by up to +-4 degrees, roll by up to +-6 degrees about the optical
axis, the vertical field of view log-uniform in [12, 32] degrees (the camera
distance follows it, keeping the head's size), the head's fraction of the
image height scaled by [0.9, 1.1] (0.63 to 0.77 of the height), and the
principal point shifted by up to 3% of the size (the head a little off
centre). Cameras are OpenCV world-to-camera viewmats and 3 x 3 intrinsics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uika_jax.head.model import HeadModel
from uika_jax.render.camera import framing_camera
from uika_jax.synthetic.views import identity_framing

FIXED_VIEWS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (-25.0, 0.0),
    (25.0, 0.0),
    (0.0, 15.0),
    (0.0, -15.0),
    (-55.0, 0.0),
    (55.0, 0.0),
    (-40.0, 20.0),
    (40.0, 20.0),
)
"""The rig's (yaw, pitch) in degrees (module docstring)."""


@dataclasses.dataclass(frozen=True)
class RigJitter:
    """Ranges of the per-identity camera jitter (all zero-width: no jitter).

    Attributes:
      yaw_deg: yaw offset drawn from [-yaw_deg, yaw_deg].
      pitch_deg: pitch offset drawn from [-pitch_deg, pitch_deg].
      roll_deg: roll about the optical axis drawn from [-roll_deg, roll_deg].
      fov_deg: (low, high) vertical field of view, drawn log-uniformly.
      head_scale: (low, high) factor on the head's fraction of the image height.
      shift: principal point offset drawn from [-shift, shift] times the size, per axis.
    """

    yaw_deg: float = 4.0
    pitch_deg: float = 4.0
    roll_deg: float = 6.0
    fov_deg: tuple[float, float] = (12.0, 32.0)
    head_scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.03


NO_JITTER = RigJitter(0.0, 0.0, 0.0, (20.0, 20.0), (1.0, 1.0), 0.0)
"""The rig without jitter: `FIXED_VIEWS` exactly, the default 20 degree field of view."""


def _roll(viewmat: np.ndarray, roll_deg: float) -> np.ndarray:
    """Rotates a camera about its optical axis (the image turns by -roll_deg)."""
    angle = np.deg2rad(roll_deg)
    rotation = np.eye(4, dtype=np.float32)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return (rotation @ viewmat).astype(np.float32)


def fixed_view_rig(
    model: HeadModel,
    shape: np.ndarray,
    size: int,
    seed: int,
    jitter: RigJitter = RigJitter(),
    views: tuple[tuple[float, float], ...] = FIXED_VIEWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns an identity's jittered rig: viewmats (C, 4, 4) and Ks (C, 3, 3), C = len(views).

    Deterministic per seed (a private generator); camera c's jitter does not
    depend on the image size, so one identity's rig at 64 and at 256 pixels is
    the same up to scale.

    Args:
      model: a synthetic head model.
      shape: the identity's coefficients (S,).
      size: image side in pixels.
      seed: the identity's seed, a non-negative int.
      jitter: ranges of the jitter (`NO_JITTER` for the exact views).
      views: (yaw, pitch) of each camera in degrees.

    Raises:
      ValueError: if a range is reversed or not positive where it must be.
    """
    (fov_low, fov_high), (scale_low, scale_high) = jitter.fov_deg, jitter.head_scale
    if not (0.0 < fov_low <= fov_high < 180.0 and 0.0 < scale_low <= scale_high):
        raise ValueError(f"fixed_view_rig: bad jitter ranges {jitter}")
    centre, height = identity_framing(model, shape)
    rng = np.random.default_rng([seed, 0x416])
    viewmats, Ks = [], []
    for yaw, pitch in views:
        draw = rng.uniform(-1.0, 1.0, 7)
        fov = fov_low * (fov_high / fov_low) ** (0.5 + 0.5 * draw[3])
        scale = scale_low + (scale_high - scale_low) * (0.5 + 0.5 * draw[4])
        viewmat, K = framing_camera(
            centre,
            height / scale,
            size,
            yaw + jitter.yaw_deg * draw[0],
            pitch + jitter.pitch_deg * draw[1],
            fov_deg=fov,
        )
        K = K.copy()
        K[:2, 2] += jitter.shift * size * draw[5:7]
        viewmats.append(_roll(viewmat, jitter.roll_deg * draw[2]))
        Ks.append(K)
    return np.stack(viewmats), np.stack(Ks).astype(np.float32)
