"""Expression blendshapes and pose correctives of the built-in synthetic head.

All fields are smooth displacement fields (Gaussian falloffs around facial
landmarks of the base sculpt) evaluated at the rest vertices. Skin vertices
get the field; the mouth cavity follows the lip vertex it hangs from, fading
towards its back; the eyeballs stay rigid (they only follow their joints).
Left means the subject's left, +x.
"""

from __future__ import annotations

import numpy as np

from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic import sculpt as sculpt

EXPRESSION_NAMES = (
    "smile",
    "brow_raise",
    "brow_furrow",
    "pucker",
    "blink_left",
    "blink_right",
    "lips_part",
    "frown",
    "cheek_puff",
    "mouth_stretch",
)
"""The named expression blendshapes, in order; a coefficient of 1 is a full expression."""


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3) of a counter-clockwise mesh."""
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices)
    np.add.at(normals, faces.reshape(-1), np.repeat(face_normals, 3, axis=0))
    return normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)


def _gauss(points: np.ndarray, centre, sigma) -> np.ndarray:
    """Anisotropic Gaussian falloff exp(-|(p - c) / sigma|^2 / 2) (N,)."""
    q = (points - np.asarray(centre, np.float64)) / np.asarray(sigma, np.float64)
    return np.exp(-0.5 * np.sum(q * q, axis=-1))


class Landmarks:
    """Facial landmarks of the base sculpt, read off the rest mesh.

    Attributes:
      mouth: centre of the mouth line (3,).
      corners: mouth corners (2, 3), left (+x) first.
      eyes: eyeball centres (2, 3), left first.
      brow_y: height of the brows.
    """

    def __init__(self, layout: mesh.MeshLayout, vertices: np.ndarray) -> None:
        row = layout.grid[layout.mouth_row]
        half, span = mesh.NUM_COLUMNS // 2, layout.slit_columns.size // 2 + 1
        self.mouth = vertices[row[half]]
        self.corners = vertices[[row[half + span], row[half - span]]]
        self.eyes = sculpt.eye_centres(sculpt.BASE_PARAMS)
        self.brow_y = sculpt.BASE_PARAMS["brow_y"]


def _finish(layout: mesh.MeshLayout, field: np.ndarray) -> np.ndarray:
    """Zeroes the eyeballs and makes cavity vertices follow their rim vertex, fading inwards."""
    out = np.where((layout.part == mesh.SKIN)[:, None], field, 0.0)
    cavity = layout.part == mesh.CAVITY
    fade = (1.0 - layout.cavity_depth[cavity])[:, None]
    out[cavity] = fade * out[layout.cavity_rim[cavity]]
    return out


def _blink(vertices: np.ndarray, eye: np.ndarray) -> np.ndarray:
    """Moves the skin inside one eye opening onto the lid sphere in front of the eyeball."""
    g = sculpt.BASE_PARAMS
    rel = vertices - eye
    radius = g["eye_r"] + sculpt.LID_THICKNESS + 0.0003
    flat = np.minimum(rel[:, 0] ** 2 + rel[:, 1] ** 2, radius**2)
    target_z = eye[2] + np.sqrt(radius**2 - flat)
    opening = sculpt.eye_opening(np.sign(eye[0]) * rel[:, 0], rel[:, 1], g)
    inside = (1.0 - sculpt.smoothstep(0.0, 0.002, opening)) * sculpt.smoothstep(
        -0.02, -0.012, rel[:, 2]
    )
    out = np.zeros_like(vertices)
    out[:, 2] = np.maximum(target_z - vertices[:, 2], 0.0) * inside
    out[:, 1] = -0.0015 * _gauss(rel, (0.0, 0.009, 0.012), (0.014, 0.006, 0.02))
    return out


def expression_directions(
    layout: mesh.MeshLayout, vertices: np.ndarray, normals: np.ndarray
) -> np.ndarray:
    """The named expression blendshapes (V, 3, len(EXPRESSION_NAMES)), in EXPRESSION_NAMES order.

    Args:
      layout: the mesh structure.
      vertices: rest vertices (V, 3).
      normals: rest vertex normals (V, 3).
    """
    p = vertices
    lm = Landmarks(layout, p)
    front = sculpt.smoothstep(0.02, 0.05, p[:, 2])[:, None]
    y_m = lm.mouth[1]
    lips = _gauss(p[:, :2], lm.mouth[:2], (0.021, 0.011))[:, None] * front
    fields: dict[str, np.ndarray] = {name: np.zeros_like(p) for name in EXPRESSION_NAMES}
    for s, corner in zip((1.0, -1.0), lm.corners, strict=True):
        near_corner = _gauss(p, corner, (0.014, 0.012, 0.014))[:, None]
        cheek = _gauss(p, (s * 0.036, -0.018, 0.08), 0.016)[:, None] * front
        fields["smile"] += near_corner * [s * 0.005, 0.0065, -0.004] + cheek * [0, 0.0035, 0.0025]
        brow = _gauss(p, (s * 0.03, lm.brow_y + 0.006, 0.085), (0.022, 0.012, 0.03))[:, None]
        fields["brow_raise"] += brow * front * [0.0, 0.005, 0.0005]
        inner = _gauss(p, (s * 0.016, lm.brow_y, 0.088), (0.012, 0.01, 0.02))[:, None]
        fields["brow_furrow"] += inner * front * [-s * 0.0028, -0.0025, 0.0]
        fields["frown"] += _gauss(p, corner, 0.013)[:, None] * [s * 0.001, -0.004, -0.0005]
        puff = _gauss(p, (s * 0.042, -0.04, 0.07), 0.018)[:, None] * front
        own_side = sculpt.smoothstep(0.0, 0.015, s * p[:, :1])
        fields["cheek_puff"] += puff * own_side * 0.006 * normals
        fields["mouth_stretch"] += near_corner * [s * 0.0045, -0.001, -0.0015]
    forehead = _gauss(p, (0.0, lm.brow_y + 0.03, 0.085), (0.05, 0.025, 0.04))[:, None]
    fields["brow_raise"] += forehead * front * [0.0, 0.003, 0.0]
    glabella = _gauss(p, (0.0, lm.brow_y - 0.004, 0.092), 0.008)[:, None]
    fields["brow_furrow"] += glabella * [0.0, 0.0, 0.0008]
    fields["pucker"] = lips * np.stack(
        [-0.45 * p[:, 0], np.zeros(len(p)), np.full(len(p), 0.006)], -1
    )
    fields["blink_left"] = _blink(p, lm.eyes[0])
    fields["blink_right"] = _blink(p, lm.eyes[1])
    side = np.where(layout.lip_side != 0, layout.lip_side, np.tanh((p[:, 1] - y_m) / 0.0015))
    corner_fade = 1.0 - _gauss(np.abs(p[:, :1]), np.abs(lm.corners[0, :1]), 0.004)
    opening = np.where(side > 0, 0.003, 0.0035) * side * corner_fade
    fields["lips_part"] = lips * np.stack([np.zeros(len(p)), opening, np.zeros(len(p))], -1)
    chin = _gauss(p, (0.0, sculpt.BASE_PARAMS["chin_y"] + 0.005, 0.085), 0.012)[:, None]
    lower_lip = _gauss(p[:, :2], (0.0, y_m - 0.006), (0.015, 0.006))[:, None] * front
    fields["frown"] += chin * [0.0, 0.0015, 0.0015] + lower_lip * [0.0, 0.0, 0.0015]
    fields["cheek_puff"] += lips * [0.0, 0.0, 0.001]
    fields["mouth_stretch"] += lips * [0.0, 0.0, -0.001]
    return np.stack([_finish(layout, fields[name]) for name in EXPRESSION_NAMES], axis=-1)


def extra_directions(
    layout: mesh.MeshLayout,
    vertices: np.ndarray,
    normals: np.ndarray,
    count: int,
    *,
    seed: int,
    amplitude: float,
    face_only: bool,
) -> np.ndarray:
    """Small smooth symmetric bumps along the normals (V, 3, count), beyond the named ones.

    Component i is a deterministic sum of three mirrored Gaussian bumps of
    amplitude `amplitude / sqrt(1 + i / 10)` (metres).

    Args:
      layout: the mesh structure.
      vertices: rest vertices (V, 3).
      normals: rest vertex normals (V, 3).
      count: number of components.
      seed: seed of component 0 (component i uses seed + i).
      amplitude: peak displacement of the first component.
      face_only: place bumps on the face (for expressions) instead of anywhere on the skin.
    """
    skin = np.nonzero(layout.part == mesh.SKIN)[0]
    if face_only:
        skin = skin[(vertices[skin, 2] > 0.05) & (np.abs(vertices[skin, 1]) < 0.09)]
    mirrored = vertices * [-1.0, 1.0, 1.0]
    out = np.zeros((*vertices.shape, count))
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        field = np.zeros(vertices.shape[0])
        for centre in vertices[rng.choice(skin, size=3, replace=False)]:
            sigma = rng.uniform(0.012, 0.03)
            sign = rng.choice([-1.0, 1.0])
            field += sign * (_gauss(vertices, centre, sigma) + _gauss(mirrored, centre, sigma))
        scale = amplitude / np.sqrt(1.0 + i / 10.0) / max(np.abs(field).max(), 1e-12)
        out[..., i] = _finish(layout, scale * field[:, None] * normals)
    return out


def _rotation_terms(direction: np.ndarray, axis: int) -> list[tuple[int, np.ndarray]]:
    """Posedir entries (offset within a joint's 9, field) that add `direction * sin(angle)`.

    For a rotation by angle a about coordinate axis `axis`, R - I holds +sin(a)
    and -sin(a) in two off-diagonal entries; half the field goes on each.
    """
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    return [(3 * j + i, 0.5 * direction), (3 * i + j, -0.5 * direction)]


def pose_correctives(
    layout: mesh.MeshLayout, vertices: np.ndarray, normals: np.ndarray, num_joints: int
) -> np.ndarray:
    """Pose-corrective blendshapes (V, 3, 9 (num_joints - 1)) in FLAME's feature order.

    Args:
      layout: the mesh structure.
      vertices: rest vertices (V, 3).
      normals: rest vertex normals (V, 3).
      num_joints: J (5 for FLAME).
    """
    p = vertices
    lm = Landmarks(layout, p)
    out = np.zeros((*p.shape, 9 * (num_joints - 1)))

    def add(joint: int, axis: int, field: np.ndarray) -> None:
        for entry, half in _rotation_terms(_finish(layout, field), axis):
            out[..., 9 * (joint - 1) + entry] += half

    throat = _gauss(p, (0.0, -0.125, 0.035), (0.03, 0.02, 0.03))[:, None]
    add(1, 0, throat * [0.0, 0.0, 0.006])
    muscle = np.zeros_like(p)
    for s in (1.0, -1.0):
        band = _gauss(p, (s * 0.04, -0.13, 0.01), (0.015, 0.04, 0.02))[:, None]
        muscle += -s * band * 0.003 * normals
    add(1, 1, muscle)
    under_chin = _gauss(p, (0.0, -0.108, 0.05), (0.03, 0.012, 0.025))[:, None]
    jaw = under_chin * [0.0, -0.004, 0.002]
    for s in (1.0, -1.0):
        cheek = _gauss(p, (s * 0.045, -0.045, 0.055), (0.015, 0.018, 0.02))[:, None]
        jaw = jaw + cheek * [-s * 0.003, 0.0, 0.0]
    add(2, 0, jaw)
    for joint, eye in ((3, lm.eyes[0]), (4, lm.eyes[1])):
        upper_lid = _gauss(p - eye, (0.0, 0.006, 0.013), (0.013, 0.005, 0.03))[:, None]
        add(joint, 0, upper_lid * [0.0, -0.004, 0.0])
    return out
