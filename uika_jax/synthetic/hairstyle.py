"""Hair styles of the synthetic identities: proportions, hairline and strand colours.

`hair_style(seed)` draws one identity's `HairStyle` (its kind from
`identity.identity_traits`: bald, buzz, short crop, bob, long straight, curly
volume or bun) with per-seed proportions: hairline (a receding one for older
men), thickness over the crown, sides and back, a quiff, a parting, a fringe,
curls, a bun, where curtains of longer hair end and how they flare and curl in.
The geometry (`uika_jax.synthetic.hair`) and the albedo's painted scalp
(`scalp_coverage`) both read it, so the hair colour painted on the scalp lies
exactly under the hair's geometry.

Directions are azimuth (about +y from the face, +x = the subject's left, radians)
and elevation (radians) of rays from `sculpt.RAY_ORIGIN`; heights are template
y in metres.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uika_jax.synthetic import sculpt as sculpt
from uika_jax.synthetic.identity import GREY_HAIR, HAIR_STYLES, identity_traits

_DEG = np.pi / 180.0
HAIRLINE_AZIMUTHS = np.deg2rad([0, 30, 55, 68, 74, 80, 84, 102, 114, 135, 155, 180])
"""Azimuths of the hairline's knots: forehead, temples, sideburn, above and behind the ear,
nape."""
ABOVE_EARS = 0.042
"""Height of the hairline over the ears (above every identity's ear)."""
BUN_RADIUS = 0.3
"""Angular radius of a bun, seen from the ray origin (radians)."""
RELEASE_ELEVATIONS = (np.deg2rad([0, 50, 75, 120, 180]), np.deg2rad([-60, 27, 22, 14, 6]))
"""(azimuth, elevation) knots of where longer hair leaves the scalp (the front hangs from the
hairline as a fringe)."""


@dataclasses.dataclass(frozen=True)
class HairStyle:
    """One identity's hair style (lengths and heights in metres, angles in radians).

    Attributes:
      name: one of `identity.HAIR_STYLES`.
      colour: (3,) hair colour before greying.
      greyness: share of grey strands (0 to 1).
      hairline_front: height of the hairline on the forehead's midline.
      temple_recession: how much higher the hairline lies over the temples.
      sideburn: height where the sideburns end.
      nape: height of the hairline on the nape.
      bald_crown: for a bald head, the height above which no hair is painted (a
        fringe of short hair below it); -inf for none at all.
      top: hair thickness on the crown.
      sides: thickness over the temples and above the ears.
      back: thickness on the back of the head.
      quiff: extra thickness over the front of the crown.
      taper: distance over which a strand that ends at the hairline thins to nothing.
      parting: azimuth of a parting, or None.
      curls: amplitude of curl bumps as a share of the thickness.
      bun_height: height of a bun on the back of the head (0: none).
      bun_elevation: elevation of the bun's centre (azimuth pi, the back).
      fringe_clearance: a fringe ends this far above the eyes' centres (None: no fringe).
      side_bottom: height where curtains of long hair end beside the head (None: no curtain).
      back_bottom: height where they end at the back.
      flare: outward spread of a curtain per metre it hangs.
      curl_in: how far a curtain's tips curl back towards the head.
      seed: seed of the style's random fields (curls, strand colours).
    """

    name: str
    colour: np.ndarray
    greyness: float
    hairline_front: float
    temple_recession: float
    sideburn: float
    nape: float
    bald_crown: float
    top: float
    sides: float
    back: float
    quiff: float
    taper: float
    parting: float | None
    curls: float
    bun_height: float
    bun_elevation: float
    fringe_clearance: float | None
    side_bottom: float | None
    back_bottom: float | None
    flare: float
    curl_in: float
    seed: int

    @property
    def bald(self) -> bool:
        """Whether the style has no hair geometry."""
        return self.name == "bald"

    def thickness(self, azimuth: np.ndarray, elevation: np.ndarray) -> np.ndarray:
        """Hair thickness above the scalp by direction."""
        back = sculpt.smoothstep(100 * _DEG, 160 * _DEG, np.abs(azimuth))
        low = self.sides + (self.back - self.sides) * back
        height = low + (self.top - low) * sculpt.smoothstep(10 * _DEG, 65 * _DEG, elevation)
        front = np.exp(-0.5 * (azimuth / 0.5) ** 2) * np.exp(
            -0.5 * ((elevation - 45 * _DEG) / (15 * _DEG)) ** 2
        )
        height = height + self.quiff * front
        if self.parting is not None:
            gap = np.exp(-0.5 * ((azimuth - self.parting) / 0.035) ** 2)
            on_top = sculpt.smoothstep(30 * _DEG, 45 * _DEG, elevation) * sculpt.smoothstep(
                80 * _DEG, 70 * _DEG, elevation
            )
            height = height * (1.0 - 0.6 * gap * on_top)
        direction = ray_direction(azimuth, elevation)
        if self.curls:
            height = height * (1.0 + self.curls * _curl_field(self.seed, direction))
        if self.bun_height:
            centre = ray_direction(np.pi, self.bun_elevation)
            angle = np.arccos(np.clip(direction @ centre, -1.0, 1.0))
            dome = np.maximum(1.0 - (angle / BUN_RADIUS) ** 2, 0.0) ** 0.6
            height = height + self.bun_height * dome
        return height

    def release_elevation(self, azimuth: np.ndarray) -> np.ndarray:
        """Elevation where curtains of longer hair leave the scalp."""
        return np.interp(np.abs(azimuth), *RELEASE_ELEVATIONS)

    def curtain_bottom(
        self, azimuth: np.ndarray, fringe_bottom: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(height where each strand's curtain ends, weight 0..1 of having a curtain)."""
        a = np.abs(azimuth)
        weight = np.zeros_like(a)
        bottom = np.full_like(a, fringe_bottom)
        if self.fringe_clearance is not None:
            weight = sculpt.smoothstep(52 * _DEG, 38 * _DEG, a)
        if self.side_bottom is not None:
            side = sculpt.smoothstep(55 * _DEG, 75 * _DEG, a)
            level = np.interp(a, [75 * _DEG, np.pi], [self.side_bottom, self.back_bottom])
            bottom = np.where(side > 0.0, level, bottom)
            weight = np.maximum(weight, side)
        return bottom, weight

    def curtain_sway(self, azimuth: np.ndarray, hang: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Outward offset of a curtain's points, `hang` metres below where it leaves the scalp."""
        tips = sculpt.smoothstep(length - 0.03, length, hang) * (length > 0.03)
        sway = self.flare * hang - self.curl_in * tips
        if self.curls:
            bumps = _curl_field(self.seed + 1, ray_direction(azimuth, -hang / 0.1))
            sway = sway + 0.4 * self.curls * self.sides * bumps * sculpt.smoothstep(0, 0.02, hang)
        return sway


def ray_direction(azimuth, elevation) -> np.ndarray:
    """Unit vectors (..., 3) for azimuth about +y (0 = +z, pi/2 = +x) and elevation."""
    azimuth, elevation = np.broadcast_arrays(azimuth, elevation)
    return np.stack(
        [
            np.cos(elevation) * np.sin(azimuth),
            np.sin(elevation),
            np.cos(elevation) * np.cos(azimuth),
        ],
        axis=-1,
    )


def _curl_field(seed: int, direction: np.ndarray, waves: int = 14) -> np.ndarray:
    """Bumpy field in (-1, 1) over unit directions: random plane waves, ~2.5 cm apart."""
    rng = np.random.default_rng([seed, 0xC081])
    axes = rng.normal(size=(waves, 3))
    axes *= rng.uniform(20.0, 32.0, size=(waves, 1)) / np.linalg.norm(axes, axis=1, keepdims=True)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=waves)
    return np.tanh(np.sin(direction @ axes.T + phases).sum(axis=-1) / np.sqrt(0.5 * waves))


def hairline_height(style: HairStyle, azimuth: np.ndarray) -> np.ndarray:
    """Template height of the hairline at each azimuth (around the ears it passes above them)."""
    front = style.hairline_front
    heights = [
        front,
        front - 0.004 + style.temple_recession,
        0.05 + 0.5 * style.temple_recession,
        0.036,
        style.sideburn,
        style.sideburn,
        ABOVE_EARS,
        ABOVE_EARS,
        0.0,
        -0.045,
        style.nape + 0.006,
        style.nape,
    ]
    return np.interp(np.abs(azimuth), HAIRLINE_AZIMUTHS, heights)


def scalp_coverage(style: HairStyle, points: np.ndarray) -> np.ndarray:
    """Share (...) of template points on the scalp under hair (soft-edged, 0 elsewhere).

    For hair with geometry this is the region the hair grows from; for a bald
    style, a fringe of short hair below `bald_crown` (none if that is -inf).

    Args:
      style: the identity's hair style.
      points: (..., 3) template points.
    """
    rel = points - sculpt.RAY_ORIGIN
    azimuth = np.arctan2(rel[..., 0], rel[..., 2])
    edge = hairline_height(style, azimuth)
    coverage = sculpt.smoothstep(-0.003, 0.003, points[..., 1] - edge)
    if style.bald:
        coverage = coverage * sculpt.smoothstep(0.006, -0.006, points[..., 1] - style.bald_crown)
    ear_y = sculpt.BASE_PARAMS["ear_y"]
    ears = np.exp(
        -(
            (np.abs(points[..., 0]) - 0.075) ** 2 / 0.009**2
            + (points[..., 1] - ear_y) ** 2 / 0.03**2
        )
    )
    return coverage * (1.0 - ears)


def strand_colours(style: HairStyle, columns: int, rows: int) -> np.ndarray:
    """Per-vertex hair colours (1 + columns * rows, 3): the crown, then strand by strand.

    Strands of longer hair differ in brightness and, with greyness, in how grey
    they are; colour varies slowly along them, and long hair lightens towards
    its tips. Short hair and curls vary from vertex to vertex instead.
    """
    rng = np.random.default_rng([style.seed, 0xC0105])
    long_hair = style.side_bottom is not None
    brightness = 1.0 + (0.1 if long_hair else 0.04) * rng.standard_normal(columns)
    brightness = 0.5 * brightness + 0.25 * (np.roll(brightness, 1) + np.roll(brightness, -1))
    grey = np.clip(style.greyness * (1.0 + 0.3 * rng.standard_normal(columns)), 0.0, 1.0)
    along = np.linspace(0.0, 1.0, rows)
    waves = 1.0 + 0.06 * np.sin(
        2.0 * np.pi * (along[None, :] * 3.0 + rng.uniform(size=(columns, 1)))
    )
    tips = 1.0 + 0.25 * along[None, :] ** 2 * long_hair
    base = style.colour + (GREY_HAIR - style.colour) * grey[:, None]
    colours = base[:, None, :] * (brightness[:, None] * waves * tips)[..., None]
    if style.curls or not long_hair:
        colours = colours * (1.0 + 0.08 * rng.standard_normal((columns, rows, 1)))
    crown = colours[:, 0].mean(axis=0)
    return np.clip(np.concatenate([crown[None], colours.reshape(-1, 3)]), 0.0, 1.0)


_CURTAINS = {
    # style: (side bottom range, back offset range, flare range, curl-in range)
    "bob": ((-0.1, -0.055), (-0.01, 0.02), (0.12, 0.3), (0.004, 0.012)),
    "long_straight": ((-0.3, -0.17), (-0.04, 0.0), (0.04, 0.12), (0.0, 0.004)),
    "curly_volume": ((-0.08, -0.02), (-0.02, 0.0), (0.08, 0.2), (0.008, 0.02)),
}
_THICKNESS = {
    # style: (top, sides, back) ranges
    "buzz": ((0.0015, 0.0035), (0.001, 0.0025), (0.001, 0.003)),
    "short_crop": ((0.008, 0.018), (0.0035, 0.007), (0.0045, 0.009)),
    "bob": ((0.01, 0.017), (0.009, 0.014), (0.01, 0.015)),
    "long_straight": ((0.007, 0.012), (0.006, 0.01), (0.007, 0.011)),
    "curly_volume": ((0.025, 0.04), (0.02, 0.032), (0.022, 0.035)),
    "bun": ((0.004, 0.007), (0.003, 0.005), (0.004, 0.006)),
    "bald": ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
}


def hair_style(seed: int, style: str | None = None) -> HairStyle:
    """Draws one identity's hair style, deterministic per seed.

    Args:
      seed: identity seed, a non-negative int.
      style: a name from `identity.HAIR_STYLES` instead of the identity's own
        (the other proportions are still drawn from the seed).

    Raises:
      ValueError: for an unknown style name.
    """
    traits = identity_traits(seed)
    name = traits.hair_style if style is None else style
    if name not in HAIR_STYLES:
        raise ValueError(f"unknown hair style {name!r}; known: {HAIR_STYLES}")
    rng = np.random.default_rng([seed, 0x4A12])
    male = not traits.is_female
    recession = rng.uniform(0.0, 0.03) * traits.oldness * male
    top, sides, back = (rng.uniform(*r) for r in _THICKNESS[name])
    side_bottom = back_bottom = None
    flare = curl_in = 0.0
    if name in _CURTAINS:
        bottom, back_offset, flare_range, curl_range = _CURTAINS[name]
        side_bottom = rng.uniform(*bottom)
        back_bottom = side_bottom + rng.uniform(*back_offset)
        flare, curl_in = rng.uniform(*flare_range), rng.uniform(*curl_range)
    fringe = name in ("bob", "long_straight") and rng.random() < 0.45
    parted = name in ("bob", "long_straight", "short_crop") and rng.random() < 0.6
    return HairStyle(
        name=name,
        colour=traits.base_hair_colour,
        greyness=traits.greyness,
        hairline_front=rng.uniform(0.07, 0.084) + recession * 0.6,
        temple_recession=recession,
        sideburn=rng.uniform(-0.008, 0.012) if male else rng.uniform(0.018, 0.028),
        nape=rng.uniform(-0.08, -0.06),
        bald_crown=rng.uniform(0.02, 0.05) if traits.oldness > 0.3 else -np.inf,
        top=top,
        sides=sides,
        back=back,
        quiff=rng.uniform(0.0, 0.008) if name == "short_crop" else 0.0,
        taper={"buzz": 0.004, "bun": 0.006}.get(name, 0.012),
        parting=rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.3) if parted else None,
        curls=rng.uniform(0.1, 0.18) if name == "curly_volume" else 0.0,
        bun_height=rng.uniform(0.03, 0.045) if name == "bun" else 0.0,
        bun_elevation=rng.uniform(15.0, 50.0) * _DEG,
        fringe_clearance=rng.uniform(0.022, 0.03) if fringe else None,
        side_bottom=side_bottom,
        back_bottom=back_bottom,
        flare=flare,
        curl_in=curl_in,
        seed=int(seed),
    )
