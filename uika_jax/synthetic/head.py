"""The built-in synthetic head: a procedural FLAME-format model that ships with the code.

FLAME files are licensed and never shipped, so tests, the tiny config and the
demo use this head instead. `synthetic_head_model()` returns a `HeadModel` in
the exact FLAME layout (5 joints global, neck, jaw, left eye, right eye with
parents (-1, 0, 1, 1, 1); metres, y up, the face looking along +z; about
0.23 m chin to crown) with a UV layout, built deterministically from a
sculpted signed distance field (`synthetic_sculpt`) and a fixed mesh structure
(`synthetic_mesh`):

* identity blendshapes: the first `len(SHAPE_NAMES)` move named sculpt
  parameters (masculinity, age, head width, nose length, ...) by one standard
  deviation each, so coefficients of unit spread (`identity_coefficients`:
  masculinity and age from the identity's traits, `identity.identity_traits`,
  the rest N(0, 1)) give plausible, clearly different heads (the skin over the
  eyes moves with them, so the lids stay on the eyeballs); further ones are
  small smooth symmetric bumps;
* expression blendshapes (`EXPRESSION_NAMES`: smile, brow raise, blinks, ...,
  further ones small smooth bumps) and presets (`expression_preset`);
* skinning: the lower face blends into the jaw below the mouth line, the neck
  into the global joint at its base, the eyeballs follow their eye joints;
* pose correctives: soft tissue under the chin and on the cheeks when the jaw
  opens, the throat when the head nods or turns, the upper lids when the eyes
  look up or down.

The joints are convex combinations of vertices (the neck base ring, a ring
around the upper neck, two points in front of the ears, each eyeball's poles),
so identity changes move them.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from uika_jax.head.model import HeadModel, ModelFingerprint, array_digest, validate_head_model
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.deform import (
    EXPRESSION_NAMES,
    expression_directions,
    extra_directions,
    pose_correctives,
    vertex_normals,
)
from uika_jax.synthetic.identity import identity_traits

GENERATOR_VERSION = "3"
"""Bumped whenever the generated arrays change; part of the model's fingerprint."""

SHAPE_COMPONENTS: tuple[tuple[str, dict[str, float]], ...] = (
    (
        "masculinity",
        {
            "cranium_w": 0.0025,
            "cranium_h": 0.0025,
            "cranium_d": 0.003,
            "face_w": 0.0025,
            "jaw_w": 0.0045,
            "jaw_h": 0.003,
            "jaw_d": 0.003,
            "chin_w": 0.0015,
            "chin_y": -0.002,
            "brow_z": 0.0022,
            "brow_y": -0.0012,
            "nose_r": 0.0012,
            "ala_x": 0.0008,
            "nose_tip_y": -0.0018,
            "nose_tip_z": 0.0018,
            "bridge_r": 0.0008,
            "lip_r": -0.0011,
            "cheek_r": -0.0015,
            "neck_w": 0.006,
            "neck_d": 0.005,
            "ear_h": 0.002,
        },
    ),
    (
        "age",
        {
            "cheek_y": -0.003,
            "cheek_z": -0.0015,
            "jaw_w": 0.002,
            "nose_tip_y": -0.002,
            "nose_r": 0.0008,
            "ear_h": 0.004,
            "lip_r": -0.0012,
            "brow_y": -0.0012,
            "neck_w": 0.002,
        },
    ),
    ("head_width", {"cranium_w": 0.0055, "face_w": 0.004, "jaw_w": 0.003, "neck_w": 0.0025}),
    ("head_height", {"cranium_h": 0.007, "cranium_y": 0.0038}),
    ("head_depth", {"cranium_d": 0.007, "cranium_z": -0.003}),
    (
        "face_length",
        {
            "jaw_y": -0.0065,
            "chin_y": -0.0075,
            "jaw_h": 0.003,
            "face_h": 0.004,
            "mouth_y": -0.0012,
        },
    ),
    ("nose_length", {"nose_tip_y": -0.0045, "nose_root_y": 0.0012}),
    ("nose_width", {"ala_x": 0.0019, "ala_r": 0.001, "nose_r": 0.0011}),
    ("nose_projection", {"nose_tip_z": 0.0045}),
    ("cheek_fullness", {"cheek_r": 0.003, "cheek_z": 0.0015}),
    ("chin_projection", {"chin_z": 0.0045, "chin_w": 0.0015}),
    ("jaw_width", {"jaw_w": 0.0055}),
    ("eye_spacing", {"eye_x": 0.0022}),
    ("eye_size", {"eye_open_h": 0.0006, "eye_open_w": 0.0007}),
    ("brow_ridge", {"brow_z": 0.003, "brow_y": 0.0014}),
    ("midface_depth", {"face_z": 0.0045, "lip_z": 0.0022}),
    ("lip_fullness", {"lip_r": 0.0015, "lip_z": 0.0012}),
    ("mouth_width", {"mouth_w": 0.003}),
    ("ear_size", {"ear_h": 0.006, "ear_out": 0.002}),
    ("neck_thickness", {"neck_w": 0.0045, "neck_d": 0.0045}),
    ("cheekbones", {"cheekbone_x": 0.003, "cheekbone_y": 0.0022}),
    ("eye_height", {"eye_y": 0.0022, "brow_y": 0.0022, "nose_root_y": 0.0018}),
    ("forehead_slope", {"cranium_z": -0.005, "cranium_y": 0.003, "brow_z": 0.002}),
    ("nose_bridge", {"bridge_r": 0.0016, "nose_root_z": 0.004}),
    ("nose_tip_bulb", {"nose_r": 0.0016, "ala_r": 0.0008}),
    ("jaw_angle", {"jaw_d": 0.007, "jaw_z": -0.003, "jaw_h": 0.002}),
    ("chin_height", {"chin_y": -0.005, "jaw_y": -0.002, "jaw_h": 0.002}),
    ("face_taper", {"cranium_w": 0.004, "face_w": 0.001, "jaw_w": -0.005, "chin_w": -0.002}),
    ("cheek_hollows", {"cheek_r": -0.003, "cheekbone_x": 0.002, "cheek_x": 0.002}),
    ("ear_protrusion", {"ear_out": 0.003, "ear_z": -0.002}),
)
"""Named identity components: sculpt parameter changes (metres) for a coefficient of 1."""

SHAPE_NAMES = tuple(name for name, _ in SHAPE_COMPONENTS)
NUM_SHAPE = len(SHAPE_COMPONENTS)
NUM_EXPRESSION = len(EXPRESSION_NAMES)

NECK_JOINT_HEIGHT = -0.10
"""The neck joint is the centroid of the skin row whose mean height is nearest this."""
JAW_HINGE = (0.058, -0.012, 0.006)
"""Where the jaw hinges (in front of the ear, +x side); the jaw joint averages the two sides."""
NECK_BLEND = 0.06
"""Height over which the neck's skinning blends into the global joint above the neck base."""


@functools.lru_cache(maxsize=1)
def synthetic_layout() -> tuple[mesh.MeshLayout, np.ndarray]:
    """Returns the mesh structure and the rest vertices (V, 3) of the base sculpt.

    Cached; the arrays are read-only (float64 vertices, before the model's float32).
    """
    layout, vertices = mesh.build_layout(dict(sculpt.BASE_PARAMS))
    for array in [vertices, *(getattr(layout, f.name) for f in dataclasses.fields(layout))]:
        if isinstance(array, np.ndarray):
            array.flags.writeable = False
    return layout, vertices


def framing_landmarks() -> tuple[int, int]:
    """Returns the vertex indices (crown, chin) that span the head's height (for face framing)."""
    layout, vertices = synthetic_layout()
    midline = layout.grid[: layout.mouth_row, mesh.NUM_COLUMNS // 2]
    front = midline[vertices[midline, 2] > 0.04]
    return layout.pole, int(front[np.argmin(vertices[front, 1])])


def _shape_direction(
    layout: mesh.MeshLayout, vertices: np.ndarray, delta: dict[str, float]
) -> np.ndarray:
    """Displacements (V, 3) of every vertex when the sculpt parameters move by `delta`.

    The skin moves along its rays (`sculpt.ray_derivative`), except over the
    eyes, where it moves with the eye (`sculpt.eye_skin_motion`), so that the lids
    stay on the eyeball for any combination of coefficients.
    """
    base = dict(sculpt.BASE_PARAMS)
    skin = layout.part == mesh.SKIN
    follow = sculpt.eye_follow_weight(vertices[skin], base)[:, None]
    moved = np.zeros_like(vertices)
    moved[skin] = follow * sculpt.eye_skin_motion(vertices[skin], base, delta) + (
        1.0 - follow
    ) * sculpt.ray_derivative(vertices[skin], layout.directions[skin], base, delta)
    plus = mesh.attached_positions(
        layout, vertices + moved, {k: v + delta.get(k, 0.0) for k, v in base.items()}
    )
    minus = mesh.attached_positions(
        layout, vertices - moved, {k: v - delta.get(k, 0.0) for k, v in base.items()}
    )
    return 0.5 * (plus - minus)


def _jaw_weight(layout: mesh.MeshLayout, vertices: np.ndarray) -> np.ndarray:
    """Jaw share (V,) of the skin's skinning: 1 below the mouth line and in front of the ears.

    On the lips the cut decides (upper copies 0, lower copies 1); beside the mouth
    corners the boundary rises towards the jaw hinge and softens; it fades
    behind the jaw's ramus and below its lower border.
    """
    x, y, z = np.abs(vertices[:, 0]), vertices[:, 1], vertices[:, 2]
    half = mesh.NUM_COLUMNS // 2
    columns = np.arange(half, layout.slit_columns.max() + 2)
    line_x = x[layout.grid[layout.mouth_row, columns]]
    line_y = y[layout.grid[layout.mouth_row, columns]]
    hinge_x, hinge_y, _ = JAW_HINGE
    lateral = np.clip((x - line_x[-1]) / (hinge_x - line_x[-1]), 0.0, 1.0)
    line = np.interp(x, line_x, line_y) + (hinge_y - line_y[-1]) * lateral
    width = np.minimum(0.002 + 0.5 * np.maximum(x - line_x[-1], 0.0), 0.015)
    below_line = 1.0 - sculpt.smoothstep(-1.0, 1.0, (y - line) / width)
    front_of_ramus = sculpt.smoothstep(-0.035, 0.01, z)
    border = np.interp(z, [-0.01, 0.03, 0.07], [-0.07, -0.09, -0.108])
    above_neck = sculpt.smoothstep(-0.02, 0.005, y - border)
    weight = below_line * front_of_ramus * above_neck
    return np.where(layout.lip_side > 0, 0.0, np.where(layout.lip_side < 0, 1.0, weight))


def _lbs_weights(layout: mesh.MeshLayout, vertices: np.ndarray) -> np.ndarray:
    """Skinning weights (V, 5) over (global, neck, jaw, left eye, right eye)."""
    neck_base = vertices[layout.grid[0], 1].mean()
    root = 1.0 - sculpt.smoothstep(neck_base, neck_base + NECK_BLEND, vertices[:, 1])
    jaw = _jaw_weight(layout, vertices)
    weights = np.stack(
        [
            root,
            (1.0 - root) * (1.0 - jaw),
            (1.0 - root) * jaw,
            np.zeros_like(jaw),
            np.zeros_like(jaw),
        ],
        axis=-1,
    )
    cavity = np.nonzero(layout.part == mesh.CAVITY)[0]
    weights[cavity] = weights[layout.cavity_rim[cavity]]
    back = cavity[layout.cavity_depth[cavity] == 1.0]
    weights[back] = weights[layout.cavity_rim[cavity]].mean(axis=0)
    weights[layout.part == mesh.LEFT_EYE] = np.eye(5)[3]
    weights[layout.part == mesh.RIGHT_EYE] = np.eye(5)[4]
    return weights


def _ring_weights(ring: np.ndarray) -> np.ndarray:
    """Weights (n,) summing to 1 that give the arc-length centroid of a closed polyline."""
    edges = np.linalg.norm(np.roll(ring, -1, axis=0) - ring, axis=-1)
    share = 0.5 * (edges + np.roll(edges, 1))
    return share / share.sum()


def _joint_regressor(layout: mesh.MeshLayout, vertices: np.ndarray) -> np.ndarray:
    """(5, V) convex combinations of vertices giving the joints (see the module docstring)."""
    regressor = np.zeros((5, vertices.shape[0]))
    row_heights = vertices[layout.grid, 1].mean(axis=1)
    neck_row = int(np.argmin(np.abs(row_heights[: layout.mouth_row] - NECK_JOINT_HEIGHT)))
    for joint, row in ((0, 0), (1, neck_row)):
        regressor[joint, layout.grid[row]] = _ring_weights(vertices[layout.grid[row]])
    skin = np.nonzero(layout.part == mesh.SKIN)[0]
    hinge = np.asarray(JAW_HINGE)
    for side in (hinge, hinge * [-1.0, 1.0, 1.0]):
        nearest = skin[np.argmin(np.linalg.norm(vertices[skin] - side, axis=-1))]
        regressor[2, nearest] += 0.5
    for joint, part in ((3, mesh.LEFT_EYE), (4, mesh.RIGHT_EYE)):
        ball = np.nonzero(layout.part == part)[0]
        poles = ball[np.abs(np.abs(layout.eye_offsets[ball, 2]) - 1.0) < 1e-9]
        regressor[joint, poles] = 1.0 / poles.size
    return regressor


def _readonly(array: np.ndarray, dtype) -> np.ndarray:
    out = np.ascontiguousarray(array, dtype=dtype)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _build(num_shape: int, num_expression: int) -> HeadModel:
    """Generates the model (see `synthetic_head_model`)."""
    layout, vertices = synthetic_layout()
    normals = vertex_normals(vertices, layout.faces)
    named = [_shape_direction(layout, vertices, delta) for _, delta in SHAPE_COMPONENTS]
    shapedirs = np.concatenate(
        [
            np.stack(named, axis=-1)[..., :num_shape],
            extra_directions(
                layout,
                vertices,
                normals,
                max(num_shape - NUM_SHAPE, 0),
                seed=1000,
                amplitude=0.0015,
                face_only=False,
            ),
        ],
        axis=-1,
    )
    exprdirs = np.concatenate(
        [
            expression_directions(layout, vertices, normals)[..., :num_expression],
            extra_directions(
                layout,
                vertices,
                normals,
                max(num_expression - NUM_EXPRESSION, 0),
                seed=2000,
                amplitude=0.0015,
                face_only=True,
            ),
        ],
        axis=-1,
    )
    arrays = {
        "v_template": _readonly(vertices, np.float32),
        "faces": _readonly(layout.faces, np.int32),
        "shapedirs": _readonly(shapedirs, np.float32),
        "exprdirs": _readonly(exprdirs, np.float32),
        "posedirs": _readonly(pose_correctives(layout, vertices, normals, 5), np.float32),
        "j_regressor": _readonly(_joint_regressor(layout, vertices), np.float32),
        "lbs_weights": _readonly(_lbs_weights(layout, vertices), np.float32),
        "uv_coords": _readonly(layout.uv_coords, np.float32),
        "uv_faces": _readonly(layout.uv_faces, np.int32),
    }
    fingerprint = ModelFingerprint("synthetic", GENERATOR_VERSION, array_digest(arrays))
    model = HeadModel(**arrays, parents=(-1, 0, 1, 1, 1), fingerprint=fingerprint)
    return validate_head_model(model, "synthetic")


def synthetic_head_model(
    num_shape: int = NUM_SHAPE, num_expression: int = NUM_EXPRESSION
) -> HeadModel:
    """Returns the built-in synthetic head model (deterministic, cached, read-only arrays).

    Args:
      num_shape: identity blendshapes S; the first min(S, NUM_SHAPE) are the named
        SHAPE_COMPONENTS, the rest small smooth bumps.
      num_expression: expression blendshapes E; the first min(E, NUM_EXPRESSION)
        are EXPRESSION_NAMES, the rest small smooth bumps on the face.

    Returns:
      A validated `HeadModel` with a UV layout, fingerprint source "synthetic".

    Raises:
      ValueError: if a count is negative.
    """
    if num_shape < 0 or num_expression < 0:
        raise ValueError(
            f"num_shape and num_expression must be >= 0, got {num_shape} and {num_expression}"
        )
    return _build(int(num_shape), int(num_expression))


def identity_coefficients(seed: int, num_shape: int = NUM_SHAPE) -> np.ndarray:
    """Returns identity coefficients (num_shape,) float32, deterministic per seed.

    Each has mean 0 and standard deviation about 1: the "masculinity" and "age"
    components come from the identity's traits (`identity_traits`: bimodal by
    sex, uniform by age), the others are N(0, 1). The first k values do not
    depend on num_shape >= k.

    Args:
      seed: identity seed, a non-negative int.
      num_shape: number of coefficients.
    """
    coefficients = np.random.default_rng(seed).standard_normal(num_shape)
    traits = identity_traits(seed)
    for name, value in (("masculinity", traits.masculinity), ("age", traits.age_coefficient)):
        index = SHAPE_NAMES.index(name)
        if index < num_shape:
            coefficients[index] = value
    return coefficients.astype(np.float32)


EXPRESSION_PRESETS: dict[str, tuple[dict[str, float], float]] = {
    "neutral": ({}, 0.0),
    "smile": ({"smile": 1.0}, 0.0),
    "grin": ({"smile": 1.0, "lips_part": 0.8, "mouth_stretch": 0.3}, 0.06),
    "surprise": ({"brow_raise": 1.0, "lips_part": 0.4}, 0.3),
    "angry": ({"brow_furrow": 1.0, "frown": 0.6, "mouth_stretch": 0.3}, 0.0),
    "sad": ({"frown": 1.0, "brow_furrow": 0.4, "brow_raise": 0.4}, 0.0),
    "pucker": ({"pucker": 1.0}, 0.0),
    "talk": ({"pucker": 0.4, "lips_part": 0.6}, 0.15),
    "blink": ({"blink_left": 1.0, "blink_right": 1.0}, 0.0),
    "wink_left": ({"blink_left": 1.0, "smile": 0.4}, 0.0),
    "wink_right": ({"blink_right": 1.0, "smile": 0.4}, 0.0),
    "puff": ({"cheek_puff": 1.0}, 0.0),
    "jaw_open": ({"lips_part": 0.3}, 0.35),
}
"""Named expressions: (expression coefficients by name, jaw opening in radians about +x)."""


def expression_preset(
    name: str, num_expression: int = NUM_EXPRESSION
) -> tuple[np.ndarray, np.ndarray]:
    """Returns a named expression as (expression (E,) float32, jaw pose (3,) float32).

    The jaw pose is the axis-angle row for the jaw joint (`pose[2]`); positive
    rotation about +x opens the mouth. Components beyond NUM_EXPRESSION are 0.

    Args:
      name: a key of EXPRESSION_PRESETS.
      num_expression: length E of the expression vector.

    Raises:
      KeyError: for an unknown name (listing the known ones).
    """
    if name not in EXPRESSION_PRESETS:
        raise KeyError(f"unknown expression preset {name!r}; known: {sorted(EXPRESSION_PRESETS)}")
    weights, jaw = EXPRESSION_PRESETS[name]
    expression = np.zeros(num_expression, np.float32)
    for component, value in weights.items():
        index = EXPRESSION_NAMES.index(component)
        if index < num_expression:
            expression[index] = value
    return expression, np.array([jaw, 0.0, 0.0], np.float32)
