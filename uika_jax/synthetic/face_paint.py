"""Painting on the synthetic head's albedo: noise and blending, and the marks of sex and age.

Every function paints in template space: `p` is an (R, R, 3) map of the template
point each albedo texel shows (`albedo.surface_maps`), so a mark stays on its
part of the face whatever the identity's shape. Used by
`uika_jax.synthetic.albedo`:

* `beard`: clean-shaven shadow, stubble, a full beard, a moustache or a goatee;
* `makeup`: lipstick, eyeliner, eye shadow and blush;
* `age_marks`: forehead and frown lines, crow's feet, nasolabial and marionette
  folds, eye bags, neck lines and age spots, their strength growing with age.

Landmarks are those of the base sculpt (`sculpt.BASE_PARAMS`); x is mirrored
so that both sides get each mark.
"""

from __future__ import annotations

import numpy as np

from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.identity import IdentityTraits

_G = sculpt.BASE_PARAMS

LIPSTICKS = np.array(
    [
        [0.62, 0.08, 0.12],  # red
        [0.8, 0.36, 0.45],  # pink
        [0.45, 0.1, 0.2],  # berry
        [0.85, 0.38, 0.3],  # coral
        [0.6, 0.36, 0.32],  # nude
    ]
)
EYESHADOWS = np.array(
    [
        [0.35, 0.24, 0.18],  # brown
        [0.35, 0.35, 0.38],  # grey
        [0.4, 0.24, 0.38],  # plum
        [0.62, 0.5, 0.3],  # gold
        [0.3, 0.36, 0.46],  # blue-grey
    ]
)


def noise(rng: np.random.Generator, points: np.ndarray, frequency: float, terms: int = 12):
    """Smooth random field in [-1, 1]-ish: a sum of random plane waves (points in metres)."""
    directions = rng.normal(size=(terms, points.shape[-1]))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    scales = frequency * rng.uniform(0.6, 1.4, size=terms)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=terms)
    waves = np.sin(points @ (directions * scales[:, None]).T * 2.0 * np.pi + phases)
    return waves.sum(axis=-1) / np.sqrt(terms / 2.0)


def mix(base: np.ndarray, colour, amount: np.ndarray) -> np.ndarray:
    """Blends towards `colour` ((3,) or per texel) by `amount` (R, R) in [0, 1]."""
    amount = np.clip(amount, 0.0, 1.0)[..., None]
    return base * (1.0 - amount) + np.asarray(colour) * amount


def _line(distance: np.ndarray, width: float) -> np.ndarray:
    """A soft line profile: 1 on the line, falling off over `width` metres."""
    return np.exp(-((distance / width) ** 2))


def _segment_distance(q: np.ndarray, a, b) -> tuple[np.ndarray, np.ndarray]:
    """(distance of 2D points q (..., 2) to the segment a-b, position 0..1 along it)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    t = np.clip(((q - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(q - (a + t[..., None] * (b - a)), axis=-1), t


def _front(p: np.ndarray, z0: float = 0.03, z1: float = 0.055) -> np.ndarray:
    """1 on the front of the face (z beyond z1), 0 behind z0."""
    return sculpt.smoothstep(z0, z1, p[..., 2])


def beard_area(p: np.ndarray) -> np.ndarray:
    """Where a beard grows (R, R): jaw, chin, upper lip and under the chin, up to the cheeks."""
    x, y = np.abs(p[..., 0]), p[..., 1]
    cheek_line = _G["mouth_y"] + 0.02 + 0.035 * sculpt.smoothstep(0.025, 0.07, x)
    below = sculpt.smoothstep(0.004, -0.004, y - cheek_line)
    above_neck = sculpt.smoothstep(-0.135, -0.115, y)
    forward = sculpt.smoothstep(-0.035, -0.01, p[..., 2])
    nose = np.exp(-((x / 0.02) ** 2 + ((y - _G["nose_tip_y"]) / 0.008) ** 2))
    return below * above_neck * forward * (1.0 - nose)


def beard(
    rng: np.random.Generator, traits: IdentityTraits, p: np.ndarray, colour: np.ndarray
) -> np.ndarray:
    """Paints facial hair of a man (none for a woman) over `colour`."""
    if traits.is_female:
        return colour
    hair = traits.hair_colour
    area = beard_area(p)
    x, y = np.abs(p[..., 0]), p[..., 1]
    kind = rng.choice(
        ["shaven", "stubble", "full", "moustache", "goatee"], p=[0.3, 0.33, 0.2, 0.08, 0.09]
    )
    dots = sculpt.smoothstep(-0.3, 0.7, noise(rng, p, 900.0, terms=24))
    colour = mix(colour, hair * 0.7, rng.uniform(0.06, 0.16) * area * dots)
    if kind == "stubble":
        return mix(colour, hair * 0.6, rng.uniform(0.3, 0.55) * area * dots)
    strands = 1.0 + 0.25 * noise(rng, p * [1.0, 0.35, 1.0], 500.0, terms=24)
    full = np.clip(hair * 0.85 * strands[..., None], 0.0, 1.0)
    lip = _G["mouth_y"]
    moustache = (
        sculpt.smoothstep(lip + 0.003, lip + 0.006, y)
        * sculpt.smoothstep(_G["nose_tip_y"] - 0.004, _G["nose_tip_y"] - 0.008, y)
        * sculpt.smoothstep(0.03, 0.024, x)
    )
    chin = sculpt.smoothstep(0.022, 0.016, x) * sculpt.smoothstep(lip - 0.006, lip - 0.01, y)
    patch = {
        "shaven": np.zeros_like(area),
        "full": area,
        "moustache": moustache,
        "goatee": np.maximum(moustache, chin * area),
    }[kind]
    return mix(colour, full, rng.uniform(0.75, 0.95) * patch * (0.6 + 0.4 * dots))


def makeup(
    rng: np.random.Generator,
    traits: IdentityTraits,
    p: np.ndarray,
    colour: np.ndarray,
    lips: np.ndarray,
) -> np.ndarray:
    """Paints make-up on some women (lipstick, eyeliner, eye shadow, blush) over `colour`."""
    if not traits.is_female or rng.random() < 0.35:
        return colour
    if rng.random() < 0.8:
        lipstick = LIPSTICKS[rng.integers(len(LIPSTICKS))] * rng.uniform(0.85, 1.1)
        colour = mix(colour, lipstick, rng.uniform(0.55, 0.9) * lips)
    x, front = np.abs(p[..., 0]), _front(p, 0.045, 0.06)
    rel = np.stack([x - _G["eye_x"], p[..., 1] - _G["eye_y"]], axis=-1)
    opening = sculpt.eye_opening(rel[..., 0], rel[..., 1], _G)
    upper = sculpt.smoothstep(-0.002, 0.001, rel[..., 1])
    if rng.random() < 0.7:
        lid = sculpt.smoothstep(0.0, 0.001, opening) * sculpt.smoothstep(0.009, 0.004, opening)
        shadow = EYESHADOWS[rng.integers(len(EYESHADOWS))]
        colour = mix(colour, shadow, rng.uniform(0.35, 0.65) * lid * upper * front)
    if rng.random() < 0.6:
        liner = _line(opening - sculpt.OPENING_EDGE - 0.0008, 0.0009) * upper
        wing = _line(rel[..., 1] - 0.35 * (rel[..., 0] - 0.011), 0.0008)
        wing = (
            wing
            * sculpt.smoothstep(0.01, 0.012, rel[..., 0])
            * sculpt.smoothstep(0.02, 0.016, rel[..., 0])
        )
        colour = mix(colour, [0.04, 0.03, 0.03], 0.85 * np.maximum(liner, wing) * front)
    cheeks = sum(
        np.exp(-np.sum(((p - [s * 0.043, -0.008, 0.065]) / [0.016, 0.011, 0.02]) ** 2, axis=-1))
        for s in (1, -1)
    )
    return mix(colour, [0.85, 0.42, 0.42], rng.uniform(0.1, 0.3) * cheeks)


def age_marks(
    rng: np.random.Generator,
    traits: IdentityTraits,
    p: np.ndarray,
    skin: np.ndarray,
    colour: np.ndarray,
) -> np.ndarray:
    """Paints wrinkles, folds, eye bags and age spots, stronger with age, over `colour`."""
    old = traits.oldness
    x, y = np.abs(p[..., 0]), p[..., 1]
    crease = skin * [0.62, 0.52, 0.5]
    front = _front(p)
    brow = _G["brow_y"]
    forehead = np.zeros_like(x)
    for k in range(3 + int(rng.integers(0, 2))):
        level = brow + 0.014 + 0.0075 * k + 0.0015 * np.sin(48.0 * x + rng.uniform(0, 6.3))
        forehead = np.maximum(forehead, _line(y - level, 0.0007))
    forehead *= sculpt.smoothstep(0.045, 0.03, x) * front
    frown = _line(
        _segment_distance(np.stack([x, y], -1), [0.005, brow - 0.004], [0.004, brow + 0.008])[0],
        0.0006,
    )
    eye_x, eye_y = _G["eye_x"], _G["eye_y"]
    crows = np.zeros_like(x)
    for angle in (-0.45, 0.0, 0.45):
        start = np.array([eye_x + 0.015, eye_y])
        end = start + 0.011 * np.array([np.cos(angle), np.sin(angle)])
        distance, _ = _segment_distance(np.stack([x, y], -1), start, end)
        crows = np.maximum(crows, _line(distance, 0.0006))
    crows *= sculpt.smoothstep(0.0, 0.03, p[..., 2])
    fold_top = [0.017, _G["nose_tip_y"] - 0.001]
    fold_bottom = [0.034, _G["mouth_y"] - 0.012]
    fold, along = _segment_distance(np.stack([x, y], -1), fold_top, fold_bottom)
    bend = 0.003 * np.sin(np.pi * along)
    fold = _line(fold - bend, 0.0012) * front
    marionette, _ = _segment_distance(
        np.stack([x, y], -1),
        [_G["mouth_w"] + 0.001, _G["mouth_y"] - 0.002],
        [0.029, _G["mouth_y"] - 0.022],
    )
    marionette = _line(marionette, 0.001) * front
    bags = np.zeros_like(x)
    for s in (1.0, -1.0):
        rel = (p[..., :2] - [s * eye_x, eye_y - 0.0115]) / [0.012, 0.0042]
        bags = np.maximum(bags, np.exp(-np.sum(rel**2, axis=-1)))
    bags *= sculpt.smoothstep(0.03, 0.05, p[..., 2])
    neck = sum(_line(y + level, 0.0009) for level in (0.1, 0.112, 0.125)) * sculpt.smoothstep(
        -0.06, -0.02, p[..., 2]
    )
    colour = mix(colour, skin * [0.78, 0.68, 0.74], (0.15 + 0.4 * old) * bags)
    colour = mix(colour, crease, (0.1 + 0.35 * old) * fold)
    for mark, strength in (
        (forehead, 0.45),
        (frown, 0.35),
        (crows, 0.5),
        (marionette, 0.4),
        (neck, 0.3),
    ):
        colour = mix(colour, crease, strength * old * mark)
    if old > 0.4 and traits.skin_tone < 0.5:
        spots = sculpt.smoothstep(1.2, 1.6, noise(rng, p, 120.0, terms=20))
        colour = mix(colour, skin * [0.75, 0.6, 0.48], (old - 0.4) * spots * front)
    return colour
