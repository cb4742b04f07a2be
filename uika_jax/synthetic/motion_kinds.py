"""The motion library's kinds: what each one moves, how fast and how far.

Each kind is a generator `(rng, duration, fps) -> [Timeline, ...]` (see
`keyframes`) that writes keyframes from a start up to a second before t = 0
(so a short clip is not always at rest on its first frame) until past
`duration`; it draws every random number in the order it writes, so a longer
duration only appends keyframes. The ranges below bound every kind; they were
read off renders of the built-in head (beyond them its mesh folds: lips over
themselves, lids past the eyeball, mouth corners tearing, the head leaving the
face framing). Head rotations are split between the global and the neck joint
by a per-sequence share; the global part of a roll stays small, since rolling
about the base of the neck swings the head sideways out of the framing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from uika_jax.synthetic.deform import EXPRESSION_NAMES
from uika_jax.synthetic.keyframes import AXES, Timeline

EXPRESSION_MAX = {
    "smile": 1.5,
    "brow_raise": 1.5,
    "brow_furrow": 1.5,
    "pucker": 1.5,
    "blink_left": 1.0,
    "blink_right": 1.0,
    "lips_part": 1.5,
    "frown": 1.5,
    "cheek_puff": 2.0,
    "mouth_stretch": 1.0,
}
"""Largest coefficient of each named expression (all are >= 0); 1 closes an eye fully.

Read off renders of the built-in head: beyond these the lips fold over
themselves (smile), the lids bulge past the eyeball (blinks) or the mouth
corners tear (mouth_stretch).
"""

HEAD_YAW_MAX = float(np.deg2rad(45.0))
"""Largest head yaw (global + neck), radians."""
HEAD_PITCH_MAX = float(np.deg2rad(25.0))
"""Largest head pitch (global + neck), radians, up or down."""
HEAD_ROLL_MAX = float(np.deg2rad(20.0))
"""Largest head roll (global + neck), radians."""
GLOBAL_ROLL_MAX = float(np.deg2rad(10.0))
"""Largest roll of the global joint alone, radians (keeps the head in frame)."""
JAW_OPEN_MAX = 0.35
"""Largest jaw opening (jaw pitch), radians; the jaw never closes past 0."""
JAW_SIDEWAYS_MAX = 0.1
"""Largest sideways jaw rotation (jaw yaw), radians."""
EYE_YAW_MAX = 0.35
"""Largest eye yaw, radians."""
EYE_PITCH_MAX = 0.25
"""Largest eye pitch, radians, up or down."""
TRANSLATION_MAX = 0.005
"""Largest translation along each axis, metres."""

_LEAD_IN = 1.0
"""Kinds start their keyframes up to this many seconds before t = 0."""


def _lead_in(rng: np.random.Generator) -> float:
    return -rng.uniform(0.0, _LEAD_IN)


_VISEMES = {
    # (jaw.pitch, lips_part, pucker, mouth_stretch, smile)
    "closed": (0.0, 0.0, 0.1, 0.0, 0.0),
    "fv": (0.02, 0.15, 0.0, 0.1, 0.0),
    "tdn": (0.03, 0.3, 0.0, 0.2, 0.0),
    "aa": (0.13, 0.7, 0.0, 0.1, 0.0),
    "ee": (0.05, 0.5, 0.0, 0.5, 0.2),
    "oo": (0.06, 0.3, 0.9, 0.0, 0.0),
    "oh": (0.1, 0.5, 0.5, 0.0, 0.0),
    "eh": (0.08, 0.5, 0.0, 0.3, 0.1),
}
_CONSONANTS, _VOWELS = ("closed", "fv", "tdn"), ("aa", "ee", "oo", "oh", "eh")


def _talking(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Speech: phrases of 3-12 syllables (consonant then vowel viseme, 3-7 a second).

    Jaw 0 to 0.16 rad; lips_part to 0.84, pucker to 1.08, mouth_stretch to 0.6,
    smile to 0.24 (viseme targets times a per-phrase loudness 0.6-1.2); pauses
    of 0.2-0.8 s with the mouth closed.
    """
    mouth = Timeline(("jaw.pitch", "lips_part", "pucker", "mouth_stretch", "smile"), _lead_in(rng))
    while mouth.end < duration:
        mouth.move(0.0, rng.uniform(0.1, 0.2))
        mouth.hold(rng.uniform(0.2, 0.8))
        loudness = rng.uniform(0.6, 1.2)
        for _ in range(rng.integers(3, 13)):
            consonant = np.array(_VISEMES[rng.choice(_CONSONANTS)])
            vowel = np.array(_VISEMES[rng.choice(_VOWELS)])
            mouth.move(consonant, rng.uniform(0.06, 0.12))
            mouth.move(vowel * loudness, rng.uniform(0.08, 0.18))
    return [mouth]


def _smiles(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Smiles: closed, open and laughing, onset 0.25-0.6 s, held 0.5-2 s, released 0.4-0.9 s.

    Closed: smile 0.5-1.0. Open: smile 0.7-1.0, lips_part 0.4-0.9, mouth_stretch
    0.1-0.4, jaw 0.04-0.12 rad. Laugh: an open smile whose jaw bounces 3-6 times
    between 0.05 and 0.15 rad. Neutral for 0.3-1.5 s between smiles.
    """
    face = Timeline(("smile", "lips_part", "mouth_stretch", "jaw.pitch"), _lead_in(rng))
    while face.end < duration:
        face.hold(rng.uniform(0.3, 1.5))
        style = rng.choice(["closed", "open", "laugh"], p=[0.45, 0.35, 0.2])
        if style == "closed":
            face.move([rng.uniform(0.5, 1.0), 0.0, 0.0, 0.0], rng.uniform(0.25, 0.6))
            face.hold(rng.uniform(0.5, 2.0))
        else:
            smile = [rng.uniform(0.7, 1.0), rng.uniform(0.4, 0.9), rng.uniform(0.1, 0.4)]
            face.move([*smile, rng.uniform(0.04, 0.12)], rng.uniform(0.25, 0.6))
            if style == "laugh":
                for _ in range(rng.integers(3, 7)):
                    face.move([*smile, 0.15], rng.uniform(0.08, 0.12))
                    face.move([*smile, 0.05], rng.uniform(0.08, 0.12))
            face.hold(rng.uniform(0.5, 2.0))
        face.move(0.0, rng.uniform(0.4, 0.9))
    return [face]


def _blinks(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Blinks and winks every 0.4-2.5 s; the first is a blink of both eyes closing at 0.1-0.6 s.

    A blink closes both lids (to 1) in 50-80 ms, stays closed up to 30 ms and
    opens in 90-150 ms (about 150-250 ms in all), and 15% of blinks come twice;
    a wink (20% of later events, either eye) closes one lid in 100-150 ms, holds
    0.15-0.4 s and opens in 150-250 ms. Every closure is timed to fall on a frame,
    so the sampled lids reach 1.
    """
    lids = Timeline(("blink_left", "blink_right"), -_LEAD_IN)
    closure = rng.uniform(0.1, 0.6)
    first = True
    while lids.end < duration:
        style = "blink" if first else rng.choice(["blink", "left", "right"], p=[0.8, 0.1, 0.1])
        first = False
        closed = {"blink": [1.0, 1.0], "left": [1.0, 0.0], "right": [0.0, 1.0]}[style]
        wink = style != "blink"
        for _ in range(1 if wink or rng.random() > 0.15 else 2):
            closing = rng.uniform(0.1, 0.15) if wink else rng.uniform(0.05, 0.08)
            closure = np.ceil(max(closure, lids.end + closing) * fps) / fps
            lids.hold(closure - closing - lids.end)
            lids.move(closed, closing)
            lids.hold(rng.uniform(0.15, 0.4) if wink else rng.uniform(0.0, 0.03))
            lids.move(0.0, rng.uniform(0.15, 0.25) if wink else rng.uniform(0.09, 0.15))
            closure = lids.end + 0.1
        closure = lids.end + rng.uniform(0.4, 2.5)
    return [lids]


def _brows(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Brows: raises and furrows (0.5-1.2), flashes and worried brows.

    A flash raises the brows to 0.6-1.0 for 0.1-0.3 s; worried brows raise and
    furrow at 0.4-0.7 each; onsets 0.15-0.4 s, holds 0.3-1.5 s, releases 0.3-0.7 s.
    """
    brows = Timeline(("brow_raise", "brow_furrow"), _lead_in(rng))
    while brows.end < duration:
        brows.hold(rng.uniform(0.3, 1.5))
        style = rng.choice(["raise", "furrow", "flash", "worry"])
        if style == "flash":
            brows.move([rng.uniform(0.6, 1.0), 0.0], rng.uniform(0.12, 0.2))
            brows.hold(rng.uniform(0.1, 0.3))
        else:
            strength = rng.uniform(0.5, 1.2)
            target = {"raise": [strength, 0.0], "furrow": [0.0, strength]}.get(
                style, rng.uniform(0.4, 0.7, 2)
            )
            brows.move(target, rng.uniform(0.15, 0.4))
            brows.hold(rng.uniform(0.3, 1.5))
        brows.move(0.0, rng.uniform(0.3, 0.7))
    return [brows]


def _jaw(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Jaw: opening and closing, sideways shifts and chewing.

    Opening: to 0.1-0.3 rad with lips_part 0.2-0.6, held 0.2-1 s. Sideways:
    0.03-0.08 rad open, yaw to +-0.05-0.1 rad, sometimes to both sides. Chewing:
    3-6 cycles opening 0.05-0.15 rad with a sideways wobble of 0.02-0.06 rad.
    """
    jaw = Timeline(("jaw.pitch", "jaw.yaw", "lips_part"), _lead_in(rng))
    while jaw.end < duration:
        jaw.hold(rng.uniform(0.2, 1.0))
        style = rng.choice(["open", "sideways", "chew"])
        if style == "open":
            jaw.move([rng.uniform(0.1, 0.3), 0.0, rng.uniform(0.2, 0.6)], rng.uniform(0.2, 0.5))
            jaw.hold(rng.uniform(0.2, 1.0))
        elif style == "sideways":
            opening, side = rng.uniform(0.03, 0.08), rng.choice([-1.0, 1.0])
            for _ in range(rng.integers(1, 3)):
                jaw.move([opening, side * rng.uniform(0.05, 0.1), 0.2], rng.uniform(0.25, 0.5))
                jaw.hold(rng.uniform(0.2, 0.8))
                side = -side
        else:
            wobble = rng.choice([-1.0, 1.0]) * rng.uniform(0.02, 0.06)
            for _ in range(rng.integers(3, 7)):
                jaw.move([rng.uniform(0.05, 0.15), wobble, 0.1], rng.uniform(0.2, 0.3))
                jaw.move([0.01, 0.0, 0.0], rng.uniform(0.2, 0.3))
        jaw.move(0.0, rng.uniform(0.2, 0.5))
    return [jaw]


_HEAD_CHANNELS = tuple(f"{joint}.{axis}" for joint in ("global", "neck") for axis in AXES)


@dataclasses.dataclass(frozen=True)
class _HeadStyle:
    """What a head kind does.

    Attributes:
      axis: the main axis (0 pitch, 1 yaw, 2 roll).
      maximum: largest |angle| about it, radians.
      accompaniment: largest |angle| about each axis besides the main one.
      gesture: amplitude range of repeated small oscillations (nods, shakes), or None.
      min_neck_share: smallest share of the rotation the neck joint takes.
    """

    axis: int
    maximum: float
    accompaniment: tuple[float, float, float]
    gesture: tuple[float, float] | None
    min_neck_share: float


_HEAD_STYLES = {
    "head_turns": _HeadStyle(1, HEAD_YAW_MAX, (0.08, 0.0, 0.05), (0.06, 0.15), 0.0),
    "nods": _HeadStyle(0, HEAD_PITCH_MAX, (0.0, 0.14, 0.05), (0.08, 0.2), 0.0),
    "tilts": _HeadStyle(
        2, HEAD_ROLL_MAX, (0.08, 0.14, 0.0), None, 1.0 - GLOBAL_ROLL_MAX / HEAD_ROLL_MAX
    ),
}


def _sway(rng: np.random.Generator, duration: float) -> Timeline:
    """Slow drifts of the translation within +-TRANSLATION_MAX per axis (1-3 s each)."""
    body = Timeline(("translation.x", "translation.y", "translation.z"), _lead_in(rng))
    while body.end < duration:
        body.move(rng.uniform(-1.0, 1.0, 3) * TRANSLATION_MAX, rng.uniform(1.0, 3.0))
        body.hold(rng.uniform(0.0, 1.0))
    return body


def _head(
    style: _HeadStyle, rng: np.random.Generator, duration: float, fps: float
) -> list[Timeline]:
    """Head rotations about one main axis, with translation sway (see `_HEAD_STYLES`).

    The sequence's amplitude A is 0.7-1.0 of the style's maximum; the first move
    goes to +-A, later ones to a value within +-A or back to 0, over 0.4-1.2 s,
    held 0.2-1.2 s, sometimes followed by a gesture (2-4 oscillations about the
    held angle). The other axes take random angles within the accompaniment.
    The neck takes the same share of every axis: all of it, the least the style
    allows, or a share in between (the global joint takes the rest).
    """
    rng, sway_rng = rng.spawn(2)
    share = rng.choice([1.0, style.min_neck_share, rng.uniform(style.min_neck_share, 1.0)])
    head = Timeline(_HEAD_CHANNELS, _lead_in(rng))

    def move(angles: np.ndarray, duration: float) -> None:
        head.move(np.concatenate([(1.0 - share) * angles, share * angles]), duration)

    amplitude = style.maximum * rng.uniform(0.7, 1.0)
    main = amplitude * rng.choice([-1.0, 1.0])
    while head.end < duration:
        angles = rng.uniform(-1.0, 1.0, 3) * np.asarray(style.accompaniment)
        angles[style.axis] = main
        move(angles, rng.uniform(0.4, 1.2))
        head.hold(rng.uniform(0.2, 1.2))
        if style.gesture is not None and rng.random() < 0.4:
            size = rng.uniform(*style.gesture)
            centre = np.clip(main, size - style.maximum, style.maximum - size)
            for _ in range(rng.integers(2, 5)):
                for sign in (1.0, -1.0):
                    angles[style.axis] = centre + sign * size
                    move(angles, rng.uniform(0.15, 0.3))
            angles[style.axis] = centre
            move(angles, rng.uniform(0.2, 0.3))
        main = 0.0 if rng.random() < 0.3 else rng.uniform(-amplitude, amplitude)
    return [head, _sway(sway_rng, duration)]


def _gaze(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Gaze shifts of both eyes together.

    Fixations of 0.2-1.2 s joined by saccades (as fast as the eye limit allows:
    40-90 ms) or, a fifth of the time, smooth pursuits of 0.5-1.5 s; targets
    within +-EYE_YAW_MAX and +-EYE_PITCH_MAX, a quarter of them straight ahead.
    """
    channels = [f"{eye}.{axis}" for eye in ("left_eye", "right_eye") for axis in ("pitch", "yaw")]
    eyes = Timeline(channels, _lead_in(rng))
    while eyes.end < duration:
        eyes.hold(rng.uniform(0.2, 1.2))
        target = rng.uniform(-1.0, 1.0, 2) * [EYE_PITCH_MAX, EYE_YAW_MAX]
        if rng.random() < 0.25:
            target = np.zeros(2)
        eyes.move(np.tile(target, 2), rng.uniform(0.5, 1.5) if rng.random() < 0.2 else 0.0)
    return [eyes]


_EXAGGERATED = {
    "scream": {"jaw.pitch": 0.35, "lips_part": 1.5, "mouth_stretch": 0.8, "brow_raise": 1.5},
    "rage": {
        "brow_furrow": 1.5,
        "frown": 1.5,
        "mouth_stretch": 0.8,
        "lips_part": 0.6,
        "jaw.pitch": 0.06,
        "blink_left": 0.3,
        "blink_right": 0.3,
    },
    "puff": {"cheek_puff": 2.0, "pucker": 0.6},
    "kiss": {"pucker": 1.5, "brow_raise": 0.5},
    "grin": {"smile": 1.5, "lips_part": 1.2, "mouth_stretch": 0.6, "jaw.pitch": 0.1},
    "surprise": {"brow_raise": 1.5, "jaw.pitch": 0.3, "lips_part": 0.8},
    "sorrow": {"frown": 1.5, "brow_raise": 0.8, "brow_furrow": 0.8},
    "smirk_wink": {"smile": 1.0, "blink_left": 1.0, "jaw.yaw": 0.1, "brow_raise": 0.6},
    "sneer": {
        "frown": 1.2,
        "brow_furrow": 1.0,
        "jaw.yaw": 0.1,
        "jaw.pitch": 0.05,
        "blink_left": 0.4,
    },
}
"""Exaggerated expressions at full strength; the asymmetric ones are mirrored half the time."""

_FACE_CHANNELS = (*EXPRESSION_NAMES, "jaw.pitch", "jaw.yaw")


def _exaggerated(rng: np.random.Generator, duration: float, fps: float) -> list[Timeline]:
    """Exaggerated expressions at 0.75-1.0 of the strength in `_EXAGGERATED`.

    A scream with the jaw at 0.35 rad, rage, puffed cheeks, a kiss, a wide grin,
    surprise, sorrow, a smirk with a wink, a one-sided sneer; onset 0.2-0.5 s,
    held 0.4-1.5 s, then back to neutral or, a third of the time, on to the next.
    """
    face = Timeline(_FACE_CHANNELS, _lead_in(rng))
    names = sorted(_EXAGGERATED)
    while face.end < duration:
        face.hold(rng.uniform(0.2, 0.8))
        weights = dict(_EXAGGERATED[names[rng.integers(len(names))]])
        if rng.random() < 0.5:
            weights["jaw.yaw"] = -weights.get("jaw.yaw", 0.0)
            weights["blink_left"], weights["blink_right"] = (
                weights.get("blink_right", 0.0),
                weights.get("blink_left", 0.0),
            )
        strength = rng.uniform(0.75, 1.0)
        face.move([strength * weights.get(c, 0.0) for c in _FACE_CHANNELS], rng.uniform(0.2, 0.5))
        face.hold(rng.uniform(0.4, 1.5))
        if rng.random() > 1.0 / 3.0:
            face.move(0.0, rng.uniform(0.3, 0.7))
    return [face]


GENERATORS: dict[str, Callable[[np.random.Generator, float, float], list[Timeline]]] = {
    "talking": _talking,
    "smiles": _smiles,
    "blinks": _blinks,
    "brows": _brows,
    "jaw": _jaw,
    **{kind: functools.partial(_head, style) for kind, style in _HEAD_STYLES.items()},
    "gaze": _gaze,
    "exaggerated": _exaggerated,
}
EXPRESSION_ONLY_KINDS = ("blinks", "brows")
"""Kinds that move nothing but named expressions."""


def mixed_parts(rng: np.random.Generator) -> list[str]:
    """The kinds a "mixed" sequence combines; their channels never overlap.

    A face kind (talking twice as often as smiles, jaw or exaggerated), a head
    kind, blinks (unless the face kind is "exaggerated", which moves the lids and
    brows itself), brows 40% and gaze 60% of the time.
    """
    face = rng.choice(["talking", "talking", "smiles", "jaw", "exaggerated"])
    parts = [str(face), str(rng.choice(list(_HEAD_STYLES)))]
    if face != "exaggerated":
        parts.append("blinks")
        if rng.random() < 0.4:
            parts.append("brows")
    if rng.random() < 0.6:
        parts.append("gaze")
    return parts
