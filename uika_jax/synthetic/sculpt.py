"""The sculpted surface of the built-in synthetic head: a signed distance field.

The head is a smooth union of ellipsoids and capsules (cranium, face, jaw,
chin, cheeks, brow ridge, nose, lips, ears, neck) with two eye sockets carved
out and eyelids laid over the eyeballs (`lid_radius`), all driven by a flat
dictionary of named parameters in metres (`BASE_PARAMS`). `project_rays` finds
where rays from inside the head leave the surface; `ray_derivative` gives, to
first order, how far those exit points move along their rays when parameters
change, which is how the identity blendshapes of `uika_jax.synthetic.head` are
made: the same rays, a different sculpt. Over the eyes the skin instead moves
with its eye (`eye_skin_motion`), blending into the rays' motion around them
(`eye_follow_weight`).

Coordinates follow FLAME: metres, y up, the face looking along +z, x towards
the subject's left.
"""

from __future__ import annotations

import numpy as np

BASE_PARAMS: dict[str, float] = {
    # Cranium ellipsoid: centre (0, cranium_y, cranium_z), radii (w, h, d).
    "cranium_w": 0.0735,
    "cranium_h": 0.101,
    "cranium_d": 0.097,
    "cranium_y": 0.024,
    "cranium_z": -0.009,
    # Mid-face mass (maxilla and cheeks).
    "face_w": 0.060,
    "face_h": 0.068,
    "face_d": 0.066,
    "face_y": -0.022,
    "face_z": 0.024,
    # Lower jaw (mandible) and chin.
    "jaw_w": 0.052,
    "jaw_h": 0.034,
    "jaw_d": 0.060,
    "jaw_y": -0.068,
    "jaw_z": 0.020,
    "chin_w": 0.017,
    "chin_y": -0.088,
    "chin_z": 0.071,
    # Cheek fat pads and cheekbones.
    "cheek_x": 0.036,
    "cheek_y": -0.02,
    "cheek_z": 0.06,
    "cheek_r": 0.021,
    "cheekbone_x": 0.047,
    "cheekbone_y": 0.000,
    # Brow ridge and forehead.
    "brow_y": 0.036,
    "brow_z": 0.068,
    "brow_w": 0.05,
    # Nose: a bridge from the root to the tip, wings (alae) beside the tip.
    "nose_root_y": 0.020,
    "nose_root_z": 0.086,
    "nose_tip_y": -0.021,
    "nose_tip_z": 0.116,
    "nose_r": 0.0095,
    "bridge_r": 0.0055,
    "ala_x": 0.0115,
    "ala_r": 0.007,
    # Lips: the mouth line at mouth_y, corners at +-mouth_w.
    "mouth_y": -0.050,
    "mouth_w": 0.024,
    "lip_z": 0.0835,
    "lip_r": 0.0068,
    # Ears.
    "ear_y": 0.002,
    "ear_z": -0.012,
    "ear_h": 0.030,
    "ear_out": 0.012,
    # Eyes: eyeball centres at (+-eye_x, eye_y, eye_z), radius eye_r.
    "eye_x": 0.0315,
    "eye_y": 0.018,
    "eye_z": 0.062,
    "eye_r": 0.0122,
    "eye_open_w": 0.0125,
    "eye_open_h": 0.0047,
    # Neck: an elliptic cylinder centred at z = neck_z.
    "neck_w": 0.053,
    "neck_d": 0.051,
    "neck_z": -0.020,
}

LID_THICKNESS = 0.0012
"""How far the eyelids stand off the eyeball (metres)."""
LID_FLOOR = 0.0006
"""How deep inside the eyeball the skin lies within the eye opening."""
LID_RAMP = 0.0015
"""Half-width of the ramp between lid and floor, in `eye_opening` units (metres)."""
OPENING_EDGE = -0.0004
"""The `eye_opening` value where the lids meet the eyeball (the visible eye's rim)."""
EYE_FOLLOW = (0.002, 0.014)
"""Distances beyond eye_r from an eye centre over which the skin's motion under a parameter
change goes from following its eye (lids and socket, `eye_skin_motion`) to following its
ray (`ray_derivative`)."""

RAY_ORIGIN = np.array([0.0, 0.0, -0.02])
"""Every ray of the skin starts here, on the neck's axis inside the head."""


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step: 0 at edge0, 1 at edge1 (either order), smooth in between."""
    t = np.clip((np.asarray(x) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (union) with blend radius k."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1.0 - h) + a * h - k * h * (1.0 - h)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth maximum (subtraction of -b) with blend radius k."""
    return -_smin(-a, -b, k)


def _ellipsoid(p: np.ndarray, centre, radii) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (exact on its surface)."""
    radii = np.asarray(radii, np.float64)
    q = (p - np.asarray(centre, np.float64)) / radii
    k0 = np.sqrt(np.einsum("...i,...i->...", q, q))
    k1 = np.sqrt(np.einsum("...i,...i->...", q / radii, q / radii))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def _capsule(p: np.ndarray, a, b, ra: float, rb: float) -> np.ndarray:
    """Approximate signed distance to a capsule whose radius tapers from ra at a to rb at b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ba = b - a
    t = np.clip(((p - a) @ ba) / (ba @ ba), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ba), axis=-1) - (ra + (rb - ra) * t)


def _mirror(p: np.ndarray) -> np.ndarray:
    """Folds x onto x >= 0, so left-right symmetric parts are written once."""
    return np.concatenate([np.abs(p[..., :1]), p[..., 1:]], axis=-1)


def eye_centres(params: dict[str, float]) -> np.ndarray:
    """Returns the eyeball centres (2, 3): subject's left (+x) first, as FLAME orders the eyes."""
    x, y, z = params["eye_x"], params["eye_y"], params["eye_z"]
    return np.array([[x, y, z], [-x, y, z]])


def eye_opening(rel_x: np.ndarray, rel_y: np.ndarray, params: dict[str, float]) -> np.ndarray:
    """Approximate 2D signed distance (negative inside) to an eye's opening between the lids.

    Args:
      rel_x: x of points relative to the eyeball centre, mirrored to the +x eye.
      rel_y: y of points relative to the eyeball centre.
      params: sculpt parameters (eye_open_w, eye_open_h).
    """
    dx, dy = rel_x - 0.001, rel_y - 0.0005
    height = params["eye_open_h"] * np.where(dy > 0, 1.0, 0.75)
    q = np.sqrt((dx / params["eye_open_w"]) ** 2 + (dy / height) ** 2)
    return (q - 1.0) * params["eye_open_h"]


def head_sdf(points: np.ndarray, params: dict[str, float]) -> np.ndarray:
    """Signed distance (approximate, negative inside) of points (..., 3) to the skin surface."""
    p = np.asarray(points, np.float64)
    m = _mirror(p)
    g = params
    d = _ellipsoid(
        p, (0, g["cranium_y"], g["cranium_z"]), (g["cranium_w"], g["cranium_h"], g["cranium_d"])
    )
    face = _ellipsoid(p, (0, g["face_y"], g["face_z"]), (g["face_w"], g["face_h"], g["face_d"]))
    d = _smin(d, face, 0.025)
    jaw = _ellipsoid(p, (0, g["jaw_y"], g["jaw_z"]), (g["jaw_w"], g["jaw_h"], g["jaw_d"]))
    d = _smin(d, jaw, 0.025)
    chin = _ellipsoid(
        p, (0, g["chin_y"], g["chin_z"]), (g["chin_w"], 0.8 * g["chin_w"], 0.9 * g["chin_w"])
    )
    d = _smin(d, chin, 0.015)
    cheek = _ellipsoid(
        m,
        (g["cheek_x"], g["cheek_y"], g["cheek_z"]),
        (g["cheek_r"], 0.85 * g["cheek_r"], g["cheek_r"]),
    )
    d = _smin(d, cheek, 0.02)
    cheekbone = _ellipsoid(m, (g["cheekbone_x"], g["cheekbone_y"], 0.046), (0.018, 0.011, 0.018))
    d = _smin(d, cheekbone, 0.015)
    brow = _ellipsoid(p, (0, g["brow_y"], g["brow_z"]), (g["brow_w"], 0.016, 0.02))
    d = _smin(d, brow, 0.02)
    d = _smin(d, _nose(p, m, g), 0.008)
    lip_w = g["mouth_w"]
    upper = _ellipsoid(
        p, (0, g["mouth_y"] + 0.6 * g["lip_r"], g["lip_z"]), (lip_w, g["lip_r"], 1.4 * g["lip_r"])
    )
    lower = _ellipsoid(
        p,
        (0, g["mouth_y"] - 0.75 * g["lip_r"], g["lip_z"] - 0.0015),
        (0.9 * lip_w, 1.1 * g["lip_r"], 1.4 * g["lip_r"]),
    )
    d = _smin(d, np.minimum(upper, lower), 0.008)
    ear = _ellipsoid(
        m,
        (g["cranium_w"] - 0.006 + 0.5 * g["ear_out"], g["ear_y"], g["ear_z"]),
        (0.5 * g["ear_out"] + 0.004, 0.5 * g["ear_h"], 0.017),
    )
    d = _smin(d, ear, 0.006)
    neck_q = np.stack([p[..., 0] / g["neck_w"], (p[..., 2] - g["neck_z"]) / g["neck_d"]], axis=-1)
    neck = (np.linalg.norm(neck_q, axis=-1) - 1.0) * min(g["neck_w"], g["neck_d"])
    neck = np.where(p[..., 1] > -0.02, np.maximum(neck, p[..., 1] + 0.02), neck)
    d = _smin(d, neck, 0.018)
    return _eyes(d, m, g)


def _nose(p: np.ndarray, m: np.ndarray, g: dict[str, float]) -> np.ndarray:
    """The nose: bridge, tip, columella, wings and a core joining them to the face."""
    bridge = _capsule(
        p,
        (0, g["nose_root_y"], g["nose_root_z"]),
        (0, g["nose_tip_y"] + 0.004, g["nose_tip_z"] - 0.006),
        g["bridge_r"],
        0.8 * g["nose_r"],
    )
    tip = _ellipsoid(
        p,
        (0, g["nose_tip_y"], g["nose_tip_z"] - g["nose_r"]),
        (g["nose_r"], 0.9 * g["nose_r"], g["nose_r"]),
    )
    columella = _capsule(
        p,
        (0, g["nose_tip_y"] - 0.2 * g["nose_r"], g["nose_tip_z"] - g["nose_r"]),
        (0, g["nose_tip_y"] - 0.012, g["nose_tip_z"] - 0.024),
        0.6 * g["nose_r"],
        0.7 * g["nose_r"],
    )
    ala = _ellipsoid(
        m,
        (g["ala_x"], g["nose_tip_y"] - 0.004, g["nose_tip_z"] - 0.017),
        (g["ala_r"], 0.85 * g["ala_r"], g["ala_r"]),
    )
    core = _ellipsoid(
        p,
        (0, 0.5 * (g["nose_root_y"] + g["nose_tip_y"]) - 0.004, g["nose_root_z"] - 0.006),
        (0.011, 0.028, 0.02),
    )
    nose = _smin(_smin(_smin(bridge, tip, 0.008), columella, 0.006), ala, 0.005)
    return _smin(nose, core, 0.006)


def lid_radius(opening: np.ndarray, eye_r: float) -> np.ndarray:
    """Distance of the skin from the eyeball centre over the eye, by `eye_opening` value.

    The lids stand LID_THICKNESS off the eyeball; across the opening's rim the
    skin ramps down to a floor just inside the eyeball, so the eyeball shows
    inside the rim. The smooth ramp lets linearly interpolated triangles cross
    the eyeball along the intended contour (`OPENING_EDGE`).
    """
    ramp = smoothstep(-LID_RAMP, LID_RAMP, opening)
    return eye_r - LID_FLOOR + (LID_THICKNESS + LID_FLOOR) * ramp


def _eyes(d: np.ndarray, m: np.ndarray, g: dict[str, float]) -> np.ndarray:
    """Carves the eye sockets and lays eyelids over the eyeballs, open along an almond."""
    centre = np.array([g["eye_x"], g["eye_y"], g["eye_z"]])
    rel = m - centre
    socket = _ellipsoid(rel, (0.0, 0.0, 0.014), (0.017, 0.012, 0.02))
    d = _smax(d, -socket, 0.004)
    radius = lid_radius(eye_opening(rel[..., 0], rel[..., 1], g), g["eye_r"])
    return _smin(d, np.linalg.norm(rel, axis=-1) - radius, 0.005)


def eye_follow_weight(points: np.ndarray, params: dict[str, float]) -> np.ndarray:
    """Share (N,) of a skin point's motion that follows its eye: 1 on the lids, 0 past EYE_FOLLOW.

    Args:
      points: skin points (N, 3).
      params: sculpt parameters (eye centre and radius).
    """
    centre = np.array([params["eye_x"], params["eye_y"], params["eye_z"]])
    distance = np.linalg.norm(_mirror(points) - centre, axis=-1) - params["eye_r"]
    return 1.0 - smoothstep(EYE_FOLLOW[0], EYE_FOLLOW[1], distance)


def eye_skin_motion(
    points: np.ndarray, params: dict[str, float], delta: dict[str, float]
) -> np.ndarray:
    """First-order motion (N, 3) of skin points over an eye when the parameters move by `delta`.

    Everything about an eye (socket, lids, opening) is laid out relative to its
    centre, so the skin there moves with it: each point keeps its direction from
    its eye centre (the one on its side of the face), follows the centre's
    translation, and changes its distance from it as the lid's radius in that
    direction changes (`lid_radius`: the opening's size and place). A linear
    combination of such motions keeps the lids where they belong on the eyeball,
    which motion along fixed rays cannot (it misses sideways moves of the eye).

    Args:
      points: skin points (N, 3) near an eye.
      params: sculpt parameters at which to differentiate.
      delta: parameter changes (a subset of the names in `params`).

    Returns:
      Displacements (N, 3) (central differences).
    """
    rel = _mirror(points) - np.array([params["eye_x"], params["eye_y"], params["eye_z"]])
    direction = rel / np.maximum(np.linalg.norm(rel, axis=-1, keepdims=True), 1e-12)
    motion = np.zeros_like(rel)
    for sign in (1.0, -1.0):
        moved = {k: v + sign * delta.get(k, 0.0) for k, v in params.items()}
        centre = np.array([moved["eye_x"], moved["eye_y"], moved["eye_z"]])
        radius = lid_radius(eye_opening(rel[:, 0], rel[:, 1], moved), moved["eye_r"])
        motion += 0.5 * sign * (centre + radius[:, None] * direction)
    motion[:, 0] *= np.where(points[:, 0] < 0.0, -1.0, 1.0)
    return motion


def project_rays(
    directions: np.ndarray, params: dict[str, float], max_distance: float = 0.35
) -> np.ndarray:
    """Returns the distance along each ray from `RAY_ORIGIN` to where it first leaves the skin.

    Args:
      directions: unit ray directions (N, 3).
      params: sculpt parameters.
      max_distance: how far to search; a ray that never leaves is an error.

    Raises:
      RuntimeError: if a ray does not leave the surface within max_distance.
    """
    steps = np.arange(0.02, max_distance, 0.003)
    samples = RAY_ORIGIN + steps[:, None, None] * directions[None]
    outside = head_sdf(samples, params) > 0.0
    if not outside.any(axis=0).all():
        raise RuntimeError("synthetic head: a ray never leaves the sculpted surface")
    first = outside.argmax(axis=0)
    lo, hi = steps[np.maximum(first - 1, 0)], steps[first]
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        out = head_sdf(RAY_ORIGIN + mid[:, None] * directions, params) > 0.0
        hi, lo = np.where(out, mid, hi), np.where(out, lo, mid)
    return 0.5 * (lo + hi)


def ray_derivative(
    points: np.ndarray, directions: np.ndarray, params: dict[str, float], delta: dict[str, float]
) -> np.ndarray:
    """First-order motion of ray exit points (N, 3) when the parameters move by `delta`.

    A surface point p on a ray with direction d moves along d by
    -(df/ds) / (grad f . d) for a parameter change s -> s + delta (central
    differences), with the denominator kept away from grazing rays.

    Args:
      points: exit points on the surface (N, 3).
      directions: their unit ray directions (N, 3).
      params: sculpt parameters at which to differentiate.
      delta: parameter changes (a subset of the names in `params`).

    Returns:
      Displacements (N, 3).
    """
    plus = {k: v + delta.get(k, 0.0) for k, v in params.items()}
    minus = {k: v - delta.get(k, 0.0) for k, v in params.items()}
    df = 0.5 * (head_sdf(points, plus) - head_sdf(points, minus))
    h = 1e-4
    grad = np.stack(
        [
            (head_sdf(points + h * e, params) - head_sdf(points - h * e, params)) / (2 * h)
            for e in np.eye(3)
        ],
        axis=-1,
    )
    along = np.einsum("nc,nc->n", grad, directions)
    floor = 0.3 * np.linalg.norm(grad, axis=-1)
    return (-df / np.maximum(along, floor))[:, None] * directions
