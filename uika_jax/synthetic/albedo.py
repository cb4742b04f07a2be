"""Procedural albedo maps for the built-in synthetic head, one look per identity seed.

`synthetic_albedo(seed, resolution)` paints an R x R UV map (the convention of
`uika_jax.head.uv_raster`: texel (i, j) at u = (j + 0.5) / R, v = 1 - (i + 0.5) / R)
for the UV layout of `uika_jax.synthetic.head`. Every texel knows the point of
the template it shows (`surface_maps`), and the painting is a function of that
point: a skin tone with mottling, freckles and blush; eyebrows, lash lines and
eye shadow; lips; nostrils; sclera, iris and pupil on the eyeball charts; teeth
and a dark interior in the mouth cavity.

The identity's traits (`identity.identity_traits`: sex, age, skin tone, hair
colour and style) steer the look: women get thinner arched brows, smoother
skin and often make-up; men beard shadow, stubble or a beard; age adds
wrinkles, folds, eye bags, paler lips and grey hair (`face_paint`). Hair itself
is geometry (`uika_jax.synthetic.hair`); the albedo paints only the scalp under
it in the hair's colour, so gaps show hair, not skin (`hairstyle.scalp_coverage`),
and short hair on a bald or shaved head.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from uika_jax.head.uv_raster import uv_rasterize
from uika_jax.synthetic import mesh as mesh
from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.face_paint import age_marks, beard, makeup, mix, noise
from uika_jax.synthetic.hairstyle import HairStyle, hair_style, scalp_coverage
from uika_jax.synthetic.head import synthetic_head_model, synthetic_layout
from uika_jax.synthetic.identity import IdentityTraits, identity_traits

SKIN_TONES = np.array(
    [
        [0.97, 0.83, 0.75],
        [0.93, 0.77, 0.66],
        [0.85, 0.66, 0.52],
        [0.74, 0.55, 0.39],
        [0.6, 0.41, 0.28],
        [0.44, 0.29, 0.19],
        [0.3, 0.19, 0.13],
    ]
)
"""The skin tone ramp, lightest to darkest (`IdentityTraits.skin_tone` 0 to 1)."""
UNDERTONES = np.array([[1.03, 0.99, 0.94], [1.0, 1.0, 1.0], [1.0, 0.97, 0.99], [0.99, 1.0, 0.95]])
"""Multipliers of the skin tone: warm, neutral, pink, olive."""
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


def _brows(rng: np.random.Generator, female: bool, p: np.ndarray) -> np.ndarray:
    """Eyebrow coverage (R, R) in [0, 1]: two arcs over the eyes, thick inside, thin outside.

    Women's brows are thinner, higher and more arched; men's thicker, lower and flatter.
    """
    g = sculpt.BASE_PARAMS
    x = np.abs(p[..., 0])
    along = np.clip((x - 0.011) / 0.043, 0.0, 1.0)
    arch = rng.uniform(0.005, 0.009) if female else rng.uniform(0.001, 0.005)
    lift = 0.0015 if female else -0.0005
    centre = g["brow_y"] - 0.002 + lift + arch * np.sin(np.pi * np.minimum(along * 1.3, 1.0))
    width = rng.uniform(0.6, 0.95) if female else rng.uniform(1.0, 1.5)
    thickness = width * (0.0065 - 0.004 * along)
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
    sclera = mix(
        np.broadcast_to([0.93, 0.91, 0.88], (*polar.shape, 3)),
        [0.85, 0.55, 0.5],
        0.3 * sculpt.smoothstep(np.deg2rad(50.0), np.deg2rad(90.0), polar),
    )
    iris = np.clip(iris_colour * streaks[..., None], 0.0, 1.0)
    iris = mix(iris, [0.05, 0.04, 0.04], sculpt.smoothstep(iris_edge - 0.1, iris_edge, polar))
    colour = mix(iris, sclera, sculpt.smoothstep(iris_edge - 0.02, iris_edge + 0.02, polar))
    return mix(
        colour, [0.02, 0.02, 0.02], 1.0 - sculpt.smoothstep(pupil_edge - 0.02, pupil_edge, polar)
    )


def _cavity(maps: SurfaceMaps) -> np.ndarray:
    """Mouth interior colours (R, R, 3): inner lips, a band of teeth, a dark throat."""
    depth = maps.cavity_depth
    x = np.abs(maps.position[..., 0])
    inner = mix(
        np.broadcast_to([0.45, 0.16, 0.16], (*depth.shape, 3)),
        [0.08, 0.03, 0.03],
        sculpt.smoothstep(0.1, 0.5, depth),
    )
    teeth = sculpt.smoothstep(0.1, 0.16, depth) * (1.0 - sculpt.smoothstep(0.34, 0.42, depth))
    teeth = teeth * (1.0 - sculpt.smoothstep(0.014, 0.019, x))
    return mix(inner, [0.88, 0.85, 0.77], teeth)


def _skin(
    rng: np.random.Generator, traits: IdentityTraits, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(skin tone (3,), skin colour (R, R, 3)): mottling, a darker neck, blush, redder ears.

    Women's skin is smoother; older skin is more mottled and a little sallower.
    """
    tone = traits.skin_tone * (len(SKIN_TONES) - 1.0)
    low = int(min(tone, len(SKIN_TONES) - 2))
    skin = SKIN_TONES[low] + (tone - low) * (SKIN_TONES[low + 1] - SKIN_TONES[low])
    skin = skin * UNDERTONES[rng.integers(len(UNDERTONES))] * rng.uniform(0.96, 1.04, size=3)
    skin = np.clip(skin * (1.0 - 0.06 * traits.oldness * np.array([0.0, 0.3, 1.0])), 0.0, 1.0)
    colour = np.broadcast_to(skin, (*p.shape[:2], 3)).copy()
    rough = (0.6 if traits.is_female else 1.0) * (1.0 + 0.8 * traits.oldness)
    colour *= (1.0 + rough * (0.04 * noise(rng, p, 25.0) + 0.02 * noise(rng, p, 150.0)))[..., None]
    colour *= (1.0 - 0.08 * sculpt.smoothstep(-0.09, -0.13, p[..., 1]))[..., None]
    blush = sum(
        np.exp(-np.sum(((p - [s * 0.042, -0.012, 0.07]) / 0.016) ** 2, axis=-1)) for s in (1, -1)
    )
    colour = mix(colour, skin * [1.0, 0.72, 0.72], rng.uniform(0.1, 0.45) * blush)
    ears = np.exp(-(((np.abs(p[..., 0]) - 0.078) / 0.01) ** 2))
    return skin, mix(colour, skin * [0.98, 0.75, 0.72], 0.35 * ears)


def _face_features(
    rng: np.random.Generator,
    traits: IdentityTraits,
    p: np.ndarray,
    skin: np.ndarray,
    colour: np.ndarray,
) -> np.ndarray:
    """Paints freckles, age marks, facial hair, lips, make-up, nostrils, eyes and brows."""
    g = sculpt.BASE_PARAMS
    hair = traits.hair_colour
    if rng.random() < 0.3 * (1.0 - traits.skin_tone):
        face = sculpt.smoothstep(0.04, 0.07, p[..., 2]) * sculpt.smoothstep(0.06, 0.04, p[..., 1])
        spots = sculpt.smoothstep(0.55, 0.8, noise(rng, p, 400.0, terms=24))
        colour = mix(colour, skin * [0.7, 0.5, 0.38], rng.uniform(0.3, 0.7) * spots * face)
    colour = age_marks(rng, traits, p, skin, colour)
    colour = beard(rng, traits, p, colour)
    lips, mouth_line = _lips(p)
    redness = rng.uniform(0.85, 1.1) * (1.0 - 0.25 * traits.oldness)
    lip_colour = skin * (1.0 - (1.0 - np.array([0.8, 0.52, 0.52])) * redness)
    colour = mix(colour, lip_colour, 0.85 * lips)
    colour = makeup(rng, traits, p, colour, lips)
    colour = mix(colour, lip_colour * 0.35, mouth_line)
    nostril_size = np.array([0.0042, 0.0024])
    nostrils = sum(
        np.exp(
            -np.sum(((p[..., :2] - [s * 0.0068, g["nose_tip_y"] - 0.009]) / nostril_size) ** 2, -1)
        )
        for s in (1, -1)
    )
    colour = mix(colour, skin * 0.25, 0.9 * nostrils * sculpt.smoothstep(0.08, 0.095, p[..., 2]))
    lashes, shadow = _eye_surroundings(p)
    colour = mix(colour, skin * [0.72, 0.62, 0.62], shadow)
    colour = mix(colour, traits.base_hair_colour * 0.4, rng.uniform(0.75, 0.95) * lashes)
    brow_colour = hair * rng.uniform(0.5, 0.9) if rng.random() < 0.85 else hair * 0.4
    return mix(colour, brow_colour, rng.uniform(0.75, 0.95) * _brows(rng, traits.is_female, p))


def _scalp(
    rng: np.random.Generator, traits: IdentityTraits, style: HairStyle, p: np.ndarray, colour
) -> np.ndarray:
    """Paints the scalp: hair colour under the hair geometry, short hair on a bald head."""
    hair = traits.hair_colour
    strands = 1.0 + 0.12 * noise(rng, p * [1.0, 0.25, 1.0], 300.0, terms=24)
    painted = np.clip(hair * strands[..., None], 0.0, 1.0)
    coverage = scalp_coverage(style, p)
    if style.bald:
        stubble = sculpt.smoothstep(-0.4, 0.6, noise(rng, p, 900.0, terms=24))
        shaved = scalp_coverage(dataclasses.replace(style, name="buzz"), p)
        colour = mix(colour, hair * 0.7, (0.08 + 0.12 * (not traits.is_female)) * shaved * stubble)
        return mix(colour, painted, 0.85 * coverage)
    return mix(colour, painted * (0.85 if style.name == "buzz" else 0.6), coverage)


def synthetic_albedo(seed: int, resolution: int = 256) -> np.ndarray:
    """Paints the albedo UV map of one synthetic identity.

    Deterministic per seed (a private generator; no global random state is
    touched) and different across seeds: skin tone and undertone, sex and age
    cues, hair colour on the scalp, eyebrow shape, iris colour, lip colour,
    make-up, blush, freckles and facial hair vary.

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
    traits = identity_traits(seed)
    maps = surface_maps(int(resolution))
    p = maps.position

    skin, colour = _skin(rng, traits, p)
    colour = _face_features(rng, traits, p, skin, colour)
    colour = _scalp(rng, traits, hair_style(seed), p, colour)

    part = maps.part
    colour = np.where(
        (part == mesh.LEFT_EYE)[..., None] | (part == mesh.RIGHT_EYE)[..., None],
        _eyeball(rng, maps),
        colour,
    )
    colour = np.where((part == mesh.CAVITY)[..., None], _cavity(maps), colour)
    return np.clip(colour, 0.0, 1.0).astype(np.float32)
