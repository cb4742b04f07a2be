"""Views of synthetic identities: the camera that frames an identity, and its render.

The synthetic data's viewing API, used by the contact sheet (`preview.py`) and the
synthetic dataset generator: an identity (a seed: shape from
`identity_coefficients`, albedo from `synthetic_albedo`) posed with an expression
preset, neck and gaze, seen from a camera on an orbit (yaw, pitch) that frames
its neutral head per the project's face framing (`uika_jax.render.camera.framing_camera`).
"""

from __future__ import annotations

import jax
import numpy as np

from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import HeadModel
from uika_jax.head.uv_raster import corner_image_uv
from uika_jax.render.camera import framing_camera
from uika_jax.render.mesh_render import MeshRender, render_mesh
from uika_jax.synthetic.albedo import synthetic_albedo
from uika_jax.synthetic.head import expression_preset, framing_landmarks, identity_coefficients

BACKGROUND = (0.82, 0.84, 0.87)
"""Colour behind the heads (a light grey-blue)."""


@jax.jit
def _posed_vertices(model: HeadModel, shape, expression, pose):
    return flame_forward(model, shape, expression, pose)[0]


def identity_framing(model: HeadModel, shape: np.ndarray) -> tuple[np.ndarray, float]:
    """Returns (centre (3,), height) of an identity's neutral head, crown to chin, for face framing.

    Args:
      model: a synthetic head model.
      shape: identity coefficients (S,).
    """
    expression = np.zeros(model.num_expression, np.float32)
    neutral = np.asarray(_posed_vertices(model, shape, expression, np.zeros((5, 3), np.float32)))
    crown, chin = framing_landmarks()
    top, bottom = neutral[crown], neutral[chin]
    centre = np.array([0.0, 0.5 * (top[1] + bottom[1]), 0.5 * (top[2] + bottom[2])])
    return centre, float(top[1] - bottom[1])


def identity_camera(
    model: HeadModel, shape: np.ndarray, size: int, yaw_deg: float = 0.0, pitch_deg: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (viewmat, K) framing an identity's neutral head (crown to chin) per face framing.

    Args:
      model: a synthetic head model.
      shape: identity coefficients (S,).
      size: image side in pixels.
      yaw_deg: camera orbit about +y; positive looks from the subject's left (+x).
      pitch_deg: camera elevation.
    """
    centre, height = identity_framing(model, shape)
    return framing_camera(centre, height, size, yaw_deg, pitch_deg)


def render_identity(
    model: HeadModel,
    seed: int,
    *,
    expression: str = "neutral",
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    neck: tuple[float, float, float] = (0.0, 0.0, 0.0),
    gaze: tuple[float, float, float] = (0.0, 0.0, 0.0),
    size: int = 256,
    texture: np.ndarray | None = None,
    background=BACKGROUND,
) -> MeshRender:
    """Renders one synthetic identity, framed like the project's face images.

    The camera frames the identity's neutral head (`identity_camera`) before the
    pose is applied, so a turned head moves within the frame as it would.

    Args:
      model: a synthetic head model (`synthetic_head_model()`).
      seed: identity seed: shape from `identity_coefficients`, albedo from
        `synthetic_albedo` (unless `texture` is given).
      expression: an `expression_preset` name (sets the jaw too).
      yaw_deg: camera orbit about +y; positive looks from the subject's left (+x).
      pitch_deg: camera elevation.
      neck: axis-angle rotation of the neck joint.
      gaze: axis-angle rotation of both eyes.
      size: image side in pixels.
      texture: albedo map; None paints `synthetic_albedo(seed, 256)`.
      background: colour of empty pixels, a scalar or (3,).

    Returns:
      The `MeshRender` (image (size, size, 3) in [0, 1], mask, depth, ...).
    """
    shape = identity_coefficients(seed, model.num_shape)
    expr, jaw = expression_preset(expression, model.num_expression)
    viewmat, K = identity_camera(model, shape, size, yaw_deg, pitch_deg)
    pose = np.zeros((5, 3), np.float32)
    pose[1], pose[2], pose[3], pose[4] = neck, jaw, gaze, gaze
    vertices = _posed_vertices(model, shape, expr, pose)
    if texture is None:
        texture = synthetic_albedo(seed, 256)
    return render_mesh(
        vertices,
        model.faces,
        viewmat,
        K,
        size,
        size,
        corner_uv=corner_image_uv(model),
        texture=texture,
        background=background,
    )
