"""Who a synthetic identity is: sex, age, colouring and hair style, drawn per identity seed.

`identity_traits(seed)` is the one place where an identity seed becomes a
person, so that its shape (`uika_jax.synthetic.head.identity_coefficients`: the
masculinity and age components), its albedo (`uika_jax.synthetic.albedo`: beard
shadow, make-up, wrinkles, grey hair) and its hair geometry
(`uika_jax.synthetic.hair`) agree. Deterministic per seed (a private generator
on its own stream; no global random state is touched).

Distributions: half the identities are women; ages lie in [MIN_AGE, MAX_AGE],
more young than old (`AGE_BETA`); skin tones uniform over the albedo's tone ramp (0 lightest,
1 darkest); hair colours depend on the skin tone (blond and red hair on light
skin), turn grey with age, and hair styles depend on sex and age (men bald more
often with age).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_AGE, MAX_AGE = 18.0, 80.0
"""Range of identity ages (years)."""
AGE_BETA = (1.4, 2.0)
"""Ages are MIN_AGE + (MAX_AGE - MIN_AGE) * Beta(a, b): mean about 43, more young than old."""

HAIR_STYLES = ("bald", "buzz", "short_crop", "bob", "long_straight", "curly_volume", "bun")
"""The hair shapes `uika_jax.synthetic.hair` builds (bald: no hair geometry)."""

_STYLE_WEIGHTS = {
    # Relative frequencies (bald, buzz, short_crop, bob, long_straight, curly_volume, bun).
    "female": (0.0, 0.03, 0.1, 0.25, 0.3, 0.14, 0.18),
    "male": (0.06, 0.2, 0.46, 0.04, 0.06, 0.18, 0.0),
}
MALE_BALDING_PER_YEAR = 0.009
"""Extra chance per year over 30 that a man is bald (taken from his other styles)."""

HAIR_COLOURS = {
    # Name: (linear-ish display RGB, weight on light skin, weight on dark skin).
    "black": ((0.05, 0.045, 0.04), 0.15, 0.75),
    "dark_brown": ((0.16, 0.1, 0.06), 0.3, 0.22),
    "brown": ((0.32, 0.2, 0.11), 0.22, 0.03),
    "light_brown": ((0.5, 0.36, 0.2), 0.12, 0.0),
    "blond": ((0.78, 0.64, 0.4), 0.14, 0.0),
    "red": ((0.55, 0.22, 0.09), 0.07, 0.0),
}
GREY_HAIR = np.array([0.78, 0.78, 0.76])
"""Colour of fully grey (white) hair."""


@dataclasses.dataclass(frozen=True)
class IdentityTraits:
    """The person behind an identity seed.

    Attributes:
      masculinity: -1 (female) to +1 (male) in the coefficient's units (women
        about -1, men about +1, with spread); the sign gives the sex.
      age: years in [MIN_AGE, MAX_AGE].
      skin_tone: 0 (lightest) to 1 (darkest) along the albedo's tone ramp.
      base_hair_colour: (3,) hair colour in [0, 1] before greying.
      greyness: 0 (none) to 1 (white) share of grey in the hair.
      hair_style: one of HAIR_STYLES.
    """

    masculinity: float
    age: float
    skin_tone: float
    base_hair_colour: np.ndarray
    greyness: float
    hair_style: str

    @property
    def is_female(self) -> bool:
        """Whether the identity reads as a woman (masculinity < 0)."""
        return self.masculinity < 0.0

    @property
    def hair_colour(self) -> np.ndarray:
        """(3,) mean hair colour: the base colour greyed by `greyness`."""
        return self.base_hair_colour + (GREY_HAIR - self.base_hair_colour) * self.greyness

    @property
    def age_coefficient(self) -> float:
        """The age standardised (mean 0, deviation 1 over identities): its shape coefficient."""
        a, b = AGE_BETA
        mean, std = a / (a + b), np.sqrt(a * b / (a + b + 1.0)) / (a + b)
        return float(((self.age - MIN_AGE) / (MAX_AGE - MIN_AGE) - mean) / std)

    @property
    def oldness(self) -> float:
        """0 up to age 30, rising to 1 at 75: how strongly age cues show."""
        return float(np.clip((self.age - 30.0) / 45.0, 0.0, 1.0))


def _style(rng: np.random.Generator, female: bool, age: float) -> str:
    weights = np.array(_STYLE_WEIGHTS["female" if female else "male"], np.float64)
    if not female:
        balding = min(MALE_BALDING_PER_YEAR * max(age - 30.0, 0.0), 0.4)
        weights = weights / weights.sum() * (1.0 - balding)
        weights[HAIR_STYLES.index("bald")] += balding
    return HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=weights / weights.sum())]


def _hair_colour(rng: np.random.Generator, skin_tone: float) -> np.ndarray:
    entries = list(HAIR_COLOURS.values())
    weights = np.array([(1.0 - skin_tone) * light + skin_tone * dark for _, light, dark in entries])
    colour = np.array(entries[rng.choice(len(entries), p=weights / weights.sum())][0])
    return np.clip(colour * rng.uniform(0.85, 1.15), 0.0, 1.0)


def identity_traits(seed: int) -> IdentityTraits:
    """Returns the traits of one identity, deterministic per seed.

    Args:
      seed: identity seed, a non-negative int (the one given to
        `identity_coefficients`, `synthetic_albedo` and `hair_mesh`).

    Raises:
      ValueError: if the seed is negative.
    """
    if seed < 0:
        raise ValueError(f"identity seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x1DE7])
    female = bool(rng.random() < 0.5)
    masculinity = (-1.0 if female else 1.0) * 0.9 + rng.normal(0.0, 0.35)
    masculinity = float(np.clip(masculinity, -1.8, 1.8))
    if (female and masculinity >= 0.0) or (not female and masculinity < 0.0):
        masculinity = -masculinity
    age = float(MIN_AGE + (MAX_AGE - MIN_AGE) * rng.beta(*AGE_BETA))
    skin_tone = float(rng.uniform(0.0, 1.0))
    base = _hair_colour(rng, skin_tone)
    greyness = float(np.clip((age - 42.0) / 30.0 + rng.normal(0.0, 0.15), 0.0, 1.0))
    return IdentityTraits(
        masculinity=masculinity,
        age=age,
        skin_tone=skin_tone,
        base_hair_colour=base,
        greyness=greyness,
        hair_style=_style(rng, female, age),
    )
