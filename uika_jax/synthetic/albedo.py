"""Procedural albedo maps for the built-in synthetic head, one look per identity seed.

`synthetic_albedo(seed, resolution)` paints an R x R UV map (the convention of
`uika_jax.head.uv_raster`: texel (i, j) at u = (j + 0.5) / R, v = 1 - (i + 0.5) / R)
for the UV layout of `uika_jax.synthetic.head`. Every texel knows the point of
the template it shows (`surface_maps`), and the painting is a function of that
point: a skin tone with mottling, freckles and blush; hair on the crown and the
back with a hairline; eyebrows, lash lines and eye shadow; lips; nostrils;
sclera, iris and pupil on the eyeball charts; teeth and a dark interior in the
mouth cavity. Colours, sizes and optional traits (freckles, stubble, a
receding hairline) are drawn per seed, so the map tells where on the face a
pixel lies while identities look different.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from uika_jax.head.uv_raster import uv_rasterize
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.head import synthetic_head_model, synthetic_layout

SKIN_TONES = np.array(
    [
        [0.95, 0.80, 0.70],
        [0.86, 0.66, 0.53],
        [0.72, 0.51, 0.37],
        [0.55, 0.37, 0.26],
        [0.38, 0.25, 0.18],
    ]
)
HAIR_COLOURS = np.array(
    [
        [0.06, 0.05, 0.04],
        [0.18, 0.11, 0.06],
        [0.35, 0.22, 0.12],
        [0.62, 0.48, 0.28],
        [0.50, 0.22, 0.10],
        [0.55, 0.55, 0.55],
    ]
)
IRIS_COLOURS = np.array(
    [
        [0.22, 0.12, 0.06],
        [0.38, 0.22, 0.10],
        [0.42, 0.36, 0.18],
        [0.28, 0.40, 0.24],
        [0.27, 0.42, 0.58],
        [0.42, 0.47, 0.50],
    ]
)


@dataclasses.dataclass(frozen=True)
class SurfaceMaps:
    """What each texel of the synthetic UV layout shows (R x R maps).

    Attributes:
      position: (R, R, 3) template point (metres); texels next to a chart copy a
        neighbour inside it, others far from every chart are 0.
      part: (R, R) int, synthetic_mesh.SKIN / LEFT_EYE / RIGHT_EYE / CAVITY, -1 far outside.
      eye_polar: (R, R) angle from the pupil on the eyeball charts (radians).
      eye_azimuth: (R, R) angle around the pupil axis on the eyeball charts.
      cavity_depth: (R, R) 0 at the lips rising to 1 at the back of the mouth cavity.
    """

    position: np.ndarray
    part: np.ndarray
    eye_polar: np.ndarray
    eye_azimuth: np.ndarray
    cavity_depth: np.ndarray


def _dilate(values: list[np.ndarray], covered: np.ndarray, steps: int) -> list[np.ndarray]:
    """Copies values into uncovered texels from covered 4-neighbours, `steps` times."""
    values = [v.copy() for v in values]
    covered = covered.copy()
    for _ in range(steps):
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            source = np.roll(covered, shift, axis=axis)
            take = source & ~covered
            for v in values:
                v[take] = np.roll(v, shift, axis=axis)[take]
            covered = covered | take
    return values


@functools.lru_cache(maxsize=4)
def surface_maps(resolution: int) -> SurfaceMaps:
    """Rasterizes the synthetic UV layout into per-texel surface attributes (cached, read-only).

    Args:
      resolution: side R of the UV map.
    """
    layout, vertices = synthetic_layout()
    raster = uv_rasterize(synthetic_head_model(), resolution)
    face = np.maximum(np.asarray(raster.face_id), 0)
    covered = np.asarray(raster.mask)
    bary = np.asarray(raster.barycentrics, np.float64)[..., None]
    corners = layout.faces[face]

    def interpolate(per_vertex: np.ndarray) -> np.ndarray:
        return (bary * per_vertex[corners].reshape(*corners.shape, -1)).sum(axis=2)

    position = interpolate(vertices)
    offsets = interpolate(layout.eye_offsets)
    offsets /= np.maximum(np.linalg.norm(offsets, axis=-1, keepdims=True), 1e-12)
    polar = np.arccos(np.clip(offsets[..., 2], -1.0, 1.0))
    azimuth = np.arctan2(offsets[..., 1], offsets[..., 0])
    depth = interpolate(layout.cavity_depth)[..., 0]
    part = np.where(covered, layout.part[corners[..., 0]], -1).astype(np.int64)
    maps = _dilate([position, part, polar, azimuth, depth], covered, steps=3)
    for array in maps:
        array.flags.writeable = False
    return SurfaceMaps(*maps)


def _noise(rng: np.random.Generator, points: np.ndarray, frequency: float, terms: int = 12):
    """Smooth random field in [-1, 1]-ish: a sum of random plane waves (points in metres)."""
    directions = rng.normal(size=(terms, points.shape[-1]))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    scales = frequency * rng.uniform(0.6, 1.4, size=terms)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=terms)
    waves = np.sin(points @ (directions * scales[:, None]).T * 2.0 * np.pi + phases)
    return waves.sum(axis=-1) / np.sqrt(terms / 2.0)


def _mix(base: np.ndarray, colour, amount: np.ndarray) -> np.ndarray:
    """Blends towards `colour` ((3,) or per texel) by `amount` (R, R) in [0, 1]."""
    amount = np.clip(amount, 0.0, 1.0)[..., None]
    return base * (1.0 - amount) + np.asarray(colour) * amount


def _hairline(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Hair coverage (R, R) in [0, 1] of the scalp: crown and back, above a hairline."""
    azimuth = np.abs(np.arctan2(p[..., 0], p[..., 2] - sculpt.RAY_ORIGIN[2]))
    front = rng.uniform(0.068, 0.085) if rng.random() > 0.1 else rng.uniform(0.1, 0.115)
    recession = rng.uniform(0.0, 0.015)
    knots = np.deg2rad([0, 30, 55, 80, 110, 150, 180])
    heights = [
        front,
        front - 0.004 + recession,
        0.05,
        0.03,
        0.005,
        -0.05,
        rng.uniform(-0.08, -0.06),
    ]
    line = np.interp(azimuth, knots, heights)
    edge = line + 0.004 * _noise(rng, p, 60.0)
    ear_y = sculpt.BASE_PARAMS["ear_y"]
    ears = np.exp(
        -((np.abs(p[..., 0]) - 0.075) ** 2 / 0.008**2 + (p[..., 1] - ear_y) ** 2 / 0.025**2)
    )
    return sculpt.smoothstep(-0.003, 0.003, p[..., 1] - edge) * (1.0 - ears)


def _brows(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Eyebrow coverage (R, R) in [0, 1]: two arcs over the eyes, thick inside, thin outside."""
    g = sculpt.BASE_PARAMS
    x = np.abs(p[..., 0])
    along = np.clip((x - 0.011) / 0.043, 0.0, 1.0)
    arch = rng.uniform(0.003, 0.007)
    centre = g["brow_y"] - 0.002 + arch * np.sin(np.pi * np.minimum(along * 1.3, 1.0))
    thickness = rng.uniform(0.8, 1.4) * (0.0065 - 0.004 * along)
    across = 1.0 - sculpt.smoothstep(0.35, 0.5, np.abs(p[..., 1] - centre) / thickness)
    span = sculpt.smoothstep(0.009, 0.013, x) * (1.0 - sculpt.smoothstep(0.05, 0.056, x))
    return across * span * sculpt.smoothstep(0.045, 0.06, p[..., 2])


def _eye_surroundings(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lash lines, shadow) (R, R) in [0, 1] around the eye openings."""
    g = sculpt.BASE_PARAMS
    lashes = np.zeros(p.shape[:2])
    shadow = np.zeros(p.shape[:2])
    for eye in sculpt.eye_centres(g):
        rel = p - eye
        opening = sculpt.eye_opening(np.sign(eye[0]) * rel[..., 0], rel[..., 1], g)
        near = sculpt.smoothstep(-0.03, -0.01, rel[..., 2])
        upper = sculpt.smoothstep(-0.003, 0.0, rel[..., 1])
        outside = sculpt.smoothstep(sculpt.OPENING_EDGE - 0.0006, sculpt.OPENING_EDGE, opening)
        rim = np.exp(-(((opening - sculpt.OPENING_EDGE) / 0.0009) ** 2)) * outside
        closed = np.exp(-(((rel[..., 1] + 0.001) / 0.0007) ** 2)) * (1.0 - outside)
        lashes = np.maximum(lashes, (rim * (0.35 + 0.65 * upper) + closed) * near)
        crease = np.exp(-(((opening - 0.0045) / 0.0012) ** 2)) * upper * near
        socket = np.exp(-np.sum((rel[..., :2] / [0.02, 0.013]) ** 2, axis=-1)) * near
        shadow = np.maximum(shadow, np.maximum(0.5 * crease, 0.45 * socket))
    return lashes, shadow


def _lips(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lip coverage, mouth line) (R, R) in [0, 1]."""
    g = sculpt.BASE_PARAMS
    x, y = p[..., 0], p[..., 1]
    front = sculpt.smoothstep(0.06, 0.075, p[..., 2])
    upper = (x / (0.95 * g["mouth_w"])) ** 2 + (
        (y - g["mouth_y"] - 0.5 * g["lip_r"]) / (1.15 * g["lip_r"])
    ) ** 2
    lower = (x / (0.88 * g["mouth_w"])) ** 2 + (
        (y - g["mouth_y"] + 0.8 * g["lip_r"]) / (1.2 * g["lip_r"])
    ) ** 2
    lips = (1.0 - sculpt.smoothstep(0.7, 1.0, np.minimum(upper, lower))) * front
    line = np.exp(-(((y - g["mouth_y"]) / 0.0012) ** 2)) * (
        1.0 - sculpt.smoothstep(0.8, 1.0, np.abs(x) / g["mouth_w"])
    )
    return lips, line * front


def _eyeball(rng: np.random.Generator, maps: SurfaceMaps) -> np.ndarray:
    """Sclera, iris (radial streaks, dark rim) and pupil colours (R, R, 3)."""
    polar, azimuth = maps.eye_polar, maps.eye_azimuth
    iris_colour = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.85, 1.15)
    iris_edge = np.deg2rad(rng.uniform(25.0, 29.0))
    pupil_edge = np.deg2rad(rng.uniform(8.0, 12.0))
    streaks = 1.0 + 0.2 * np.sin(azimuth * 23.0 + 3.0 * np.sin(azimuth * 7.0)) * (polar / iris_edge)
    sclera = _mix(
        np.broadcast_to([0.93, 0.91, 0.88], (*polar.shape, 3)),
        [0.85, 0.55, 0.5],
        0.3 * sculpt.smoothstep(np.deg2rad(50.0), np.deg2rad(90.0), polar),
    )
    iris = np.clip(iris_colour * streaks[..., None], 0.0, 1.0)
    iris = _mix(iris, [0.05, 0.04, 0.04], sculpt.smoothstep(iris_edge - 0.1, iris_edge, polar))
    colour = _mix(iris, sclera, sculpt.smoothstep(iris_edge - 0.02, iris_edge + 0.02, polar))
    return _mix(
        colour, [0.02, 0.02, 0.02], 1.0 - sculpt.smoothstep(pupil_edge - 0.02, pupil_edge, polar)
    )


def _cavity(maps: SurfaceMaps) -> np.ndarray:
    """Mouth interior colours (R, R, 3): inner lips, a band of teeth, a dark throat."""
    depth = maps.cavity_depth
    x = np.abs(maps.position[..., 0])
    inner = _mix(
        np.broadcast_to([0.45, 0.16, 0.16], (*depth.shape, 3)),
        [0.08, 0.03, 0.03],
        sculpt.smoothstep(0.1, 0.5, depth),
    )
    teeth = sculpt.smoothstep(0.1, 0.16, depth) * (1.0 - sculpt.smoothstep(0.34, 0.42, depth))
    teeth = teeth * (1.0 - sculpt.smoothstep(0.014, 0.019, x))
    return _mix(inner, [0.88, 0.85, 0.77], teeth)


def _skin(rng: np.random.Generator, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(skin tone (3,), skin colour (R, R, 3)): mottling, a darker neck, blush, redder ears."""
    tone = rng.uniform(0.0, len(SKIN_TONES) - 1.0)
    low = int(min(tone, len(SKIN_TONES) - 2))
    skin = SKIN_TONES[low] + (tone - low) * (SKIN_TONES[low + 1] - SKIN_TONES[low])
    skin = np.clip(skin * rng.uniform(0.95, 1.05, size=3), 0.0, 1.0)
    colour = np.broadcast_to(skin, (*p.shape[:2], 3)).copy()
    colour *= (1.0 + 0.05 * _noise(rng, p, 25.0) + 0.025 * _noise(rng, p, 150.0))[..., None]
    colour *= (1.0 - 0.08 * sculpt.smoothstep(-0.09, -0.13, p[..., 1]))[..., None]
    blush = sum(
        np.exp(-np.sum(((p - [s * 0.042, -0.012, 0.07]) / 0.016) ** 2, axis=-1)) for s in (1, -1)
    )
    colour = _mix(colour, skin * [1.0, 0.72, 0.72], rng.uniform(0.1, 0.5) * blush)
    ears = np.exp(-(((np.abs(p[..., 0]) - 0.078) / 0.01) ** 2))
    return skin, _mix(colour, skin * [0.98, 0.75, 0.72], 0.35 * ears)


def _face_features(
    rng: np.random.Generator, p: np.ndarray, skin: np.ndarray, hair: np.ndarray, colour: np.ndarray
) -> np.ndarray:
    """Paints freckles, stubble, lips, nostrils, eye shadow, lash lines and brows over `colour`."""
    g = sculpt.BASE_PARAMS
    if rng.random() < 0.35:
        face = sculpt.smoothstep(0.04, 0.07, p[..., 2]) * sculpt.smoothstep(0.06, 0.04, p[..., 1])
        spots = sculpt.smoothstep(0.55, 0.8, _noise(rng, p, 400.0, terms=24))
        colour = _mix(colour, skin * [0.7, 0.5, 0.38], rng.uniform(0.3, 0.7) * spots * face)
    if rng.random() < 0.2:
        beard = sculpt.smoothstep(0.02, -0.005, p[..., 1] - g["mouth_y"])
        beard = beard * sculpt.smoothstep(-0.125, -0.105, p[..., 1])
        beard = beard * sculpt.smoothstep(0.0, 0.03, p[..., 2])
        stubble = sculpt.smoothstep(-0.2, 0.6, _noise(rng, p, 500.0, terms=24))
        colour = _mix(colour, hair, rng.uniform(0.25, 0.55) * beard * stubble)
    lips, mouth_line = _lips(p)
    lip_colour = skin * [0.8, 0.52, 0.52] * rng.uniform(0.85, 1.1)
    colour = _mix(colour, lip_colour, 0.85 * lips)
    colour = _mix(colour, lip_colour * 0.35, mouth_line)
    nostril_size = np.array([0.0042, 0.0024])
    nostrils = sum(
        np.exp(
            -np.sum(((p[..., :2] - [s * 0.0068, g["nose_tip_y"] - 0.009]) / nostril_size) ** 2, -1)
        )
        for s in (1, -1)
    )
    colour = _mix(colour, skin * 0.25, 0.9 * nostrils * sculpt.smoothstep(0.08, 0.095, p[..., 2]))
    lashes, shadow = _eye_surroundings(p)
    colour = _mix(colour, skin * [0.72, 0.62, 0.62], shadow)
    colour = _mix(colour, hair * 0.4, rng.uniform(0.75, 0.95) * lashes)
    brow_colour = hair * rng.uniform(0.5, 0.9) if rng.random() < 0.85 else hair * 0.4
    return _mix(colour, brow_colour, rng.uniform(0.75, 0.95) * _brows(rng, p))


def synthetic_albedo(seed: int, resolution: int = 256) -> np.ndarray:
    """Paints the albedo UV map of one synthetic identity.

    Deterministic per seed (a private generator; no global random state is
    touched) and different across seeds: skin tone, hair colour and hairline,
    eyebrow shape, iris colour, lip colour, blush, freckles and stubble vary.

    Args:
      seed: identity seed, a non-negative int (e.g. the one given to
        `identity_coefficients`).
      resolution: side R of the map.

    Returns:
      (R, R, 3) float32 in [0, 1], in the layout of `synthetic_head_model()`.

    Raises:
      ValueError: if resolution < 16.
    """
    if resolution < 16:
        raise ValueError(f"synthetic_albedo: resolution must be >= 16, got {resolution}")
    rng = np.random.default_rng([seed, 0xA1BED0])
    maps = surface_maps(int(resolution))
    p = maps.position

    skin, colour = _skin(rng, p)
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.8, 1.2)
    colour = _face_features(rng, p, skin, hair, colour)
    strands = 1.0 + 0.12 * _noise(rng, p * [1.0, 0.25, 1.0], 300.0, terms=24)
    colour = _mix(colour, np.clip(hair * strands[..., None], 0.0, 1.0), _hairline(rng, p))

    part = maps.part
    colour = np.where(
        (part == mesh.LEFT_EYE)[..., None] | (part == mesh.RIGHT_EYE)[..., None],
        _eyeball(rng, maps),
        colour,
    )
    colour = np.where((part == mesh.CAVITY)[..., None], _cavity(maps), colour)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)
