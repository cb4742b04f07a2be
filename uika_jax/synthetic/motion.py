"""Procedural motion library: per-frame FLAME-format parameters for synthetic sequences.

Every identity of the synthetic dataset is animated by a few motion sequences
shared by all its camera views. `motion_sequence(kind, num_frames, seed,
num_expression=...)` returns one as a `Motion`: expression (F, E), pose
(F, 5, 3) axis-angle rows global, neck, jaw, left eye, right eye, and
translation (F, 3), float32; `sample_sequence_kinds` draws a varied set of
kinds for an identity.

Kinds (`motion_kinds` has each one's content and the ranges that bound all):
talking (visemes at 3-7 syllables a second), smiles (closed, open, laughs),
blinks (about 150-250 ms, and single-eye winks), brows (raise, furrow),
jaw (open and close, sideways, chewing), head_turns (yaw up to 45 degrees,
head shakes), nods (pitch up to 25 degrees, nodding), tilts (roll up to 20
degrees), gaze (both eyes together), exaggerated (a scream, rage, puffed
cheeks, a one-sided sneer, ...) and mixed (a face kind, a head kind, blinks,
sometimes brows and gaze at once). Motion is keyframed in seconds and
interpolated with minimum-jerk profiles under per-channel acceleration limits
(`keyframes`), so it is smooth at any frame rate; a sequence is deterministic
by (seed, kind, fps), and a shorter one is the prefix of a longer one.

Expressions: the kinds drive the built-in synthetic head's named components
(`EXPRESSION_NAMES`), which exist only in a vector of exactly `NUM_EXPRESSION`
components; a real FLAME model's expression components are unnamed PCA
directions. With `named_expressions=False` (any model, any E) the expression
stays zero and the pose and translation move exactly as they do with names:
the pose-only kinds (head turns, nods, tilts, gaze) are complete, the mouth
kinds keep their jaw motion, and the kinds that move only named expressions
(blinks, brows) are refused.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from uika_jax.synthetic.deform import EXPRESSION_NAMES
from uika_jax.synthetic.head import NUM_EXPRESSION
from uika_jax.synthetic.keyframes import sample_parameters
from uika_jax.synthetic.motion_kinds import EXPRESSION_ONLY_KINDS, GENERATORS, mixed_parts

MOTION_KINDS = (*GENERATORS, "mixed")
"""Every kind `motion_sequence` makes."""


@dataclasses.dataclass(frozen=True)
class Motion:
    """One motion sequence: per-frame FLAME-format driving parameters.

    Attributes:
      kind: the kind (an entry of MOTION_KINDS).
      parts: the kinds it is made of (just `kind`, except for "mixed").
      seed: the seed it was made from.
      fps: frames per second.
      expression: (F, E) float32 expression coefficients.
      pose: (F, 5, 3) float32 axis-angle rows global, neck, jaw, left eye, right eye.
      translation: (F, 3) float32, metres.
    """

    kind: str
    parts: tuple[str, ...]
    seed: int
    fps: float
    expression: np.ndarray
    pose: np.ndarray
    translation: np.ndarray

    @property
    def num_frames(self) -> int:
        """The number of frames F."""
        return self.pose.shape[0]


def _non_negative_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _kind_rng(kind: str, seed: int) -> np.random.Generator:
    """The generator of one (kind, seed): stable across Python runs and versions of MOTION_KINDS."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode())])


def usable_kinds(named_expressions: bool = True) -> tuple[str, ...]:
    """The kinds `motion_sequence` makes with or without named expressions."""
    if named_expressions:
        return MOTION_KINDS
    return tuple(kind for kind in MOTION_KINDS if kind not in EXPRESSION_ONLY_KINDS)


def motion_sequence(
    kind: str,
    num_frames: int,
    seed: int,
    *,
    num_expression: int,
    fps: float = 25.0,
    named_expressions: bool = True,
) -> Motion:
    """Makes one motion sequence of a kind (see the module docstring for how).

    Kinds and their ranges (radians, coefficients; `motion_kinds.EXPRESSION_MAX`
    and the *_MAX constants there bound every kind): "talking", "smiles",
    "blinks", "brows", "jaw", "exaggerated" (see each generator's docstring in
    `motion_kinds`);
    "head_turns" (yaw to +-0.7-1.0 HEAD_YAW_MAX, head shakes), "nods" (pitch to
    +-0.7-1.0 HEAD_PITCH_MAX, nodding), "tilts" (roll to +-0.7-1.0 HEAD_ROLL_MAX),
    each with small rotations about the other axes and a translation sway;
    "gaze" (both eyes); "mixed" (a face kind, a head kind, blinks, sometimes
    brows and gaze together: `Motion.parts` names them).

    Args:
      kind: an entry of MOTION_KINDS.
      num_frames: F >= 1; a sequence is the first F frames of any longer one.
      seed: a non-negative int; with the kind and fps it fixes the sequence.
      num_expression: E, the length of the expression vectors. With named
        expressions it must be NUM_EXPRESSION (the synthetic head's, whose first
        components are EXPRESSION_NAMES).
      fps: frames per second (> 0); motion speeds are in seconds, so a higher
        rate samples the same motion more densely.
      named_expressions: drive the synthetic head's named expressions; False
        for a model whose expressions have no names (a real FLAME model): the
        expression stays zero and the pose and translation are the same as with
        names.

    Returns:
      The `Motion`.

    Raises:
      ValueError: for an unknown kind, F < 1, a negative seed, fps <= 0, a
        num_expression other than NUM_EXPRESSION with named expressions, or a
        kind that moves only named expressions ("blinks", "brows") without them.
    """
    if kind not in MOTION_KINDS:
        raise ValueError(f"unknown motion kind {kind!r}; known: {', '.join(MOTION_KINDS)}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int | np.integer):
        raise ValueError(f"num_frames must be an int, got {num_frames!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    seed = _non_negative_int(seed, "seed")
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if num_expression < 0:
        raise ValueError(f"num_expression must be >= 0, got {num_expression}")
    if named_expressions and num_expression != NUM_EXPRESSION:
        raise ValueError(
            f"motion kind {kind!r} drives the synthetic head's named expressions "
            f"{EXPRESSION_NAMES}, which need num_expression={NUM_EXPRESSION}, got "
            f"{num_expression}: a model with another count (a FLAME model's "
            "components are unnamed) takes named_expressions=False, which keeps the "
            "expression at zero and moves the pose only"
        )
    if kind not in usable_kinds(named_expressions):
        raise ValueError(
            f"motion kind {kind!r} moves only named expressions, so without them "
            f"(named_expressions=False) it would stand still; use one of "
            f"{', '.join(usable_kinds(False))}"
        )
    rng = _kind_rng(kind, seed)
    parts = mixed_parts(rng) if kind == "mixed" else [kind]
    duration = num_frames / fps
    timelines = [
        timeline
        for part, part_rng in zip(parts, rng.spawn(len(parts)), strict=True)
        for timeline in GENERATORS[part](part_rng, duration, fps)
    ]
    expression, pose, translation = sample_parameters(
        timelines, np.arange(num_frames) / fps, num_expression, named_expressions
    )
    return Motion(
        kind=kind,
        parts=tuple(p for p in parts if p in usable_kinds(named_expressions)),
        seed=seed,
        fps=float(fps),
        expression=expression,
        pose=pose,
        translation=translation,
    )


def sample_sequence_kinds(
    seed: int, count: int, *, named_expressions: bool = True
) -> tuple[str, ...]:
    """Draws `count` sequence kinds for one identity, as varied as possible.

    The kinds come in rounds, each a random permutation of every usable kind
    (`usable_kinds`), so any `count` consecutive draws repeat a kind only once
    every kind has been drawn.

    Args:
      seed: a non-negative int (e.g. the identity's seed).
      count: number of kinds (>= 0).
      named_expressions: as in `motion_sequence`; False leaves out the kinds
        that move only named expressions.

    Returns:
      A tuple of `count` entries of MOTION_KINDS.

    Raises:
      ValueError: for a negative seed or count.
    """
    seed = _non_negative_int(seed, "seed")
    count = _non_negative_int(count, "count")
    kinds = usable_kinds(named_expressions)
    rng = np.random.default_rng([seed, zlib.crc32(b"sequence kinds")])
    rounds = -(-count // len(kinds))
    drawn = [kinds[i] for _ in range(rounds) for i in rng.permutation(len(kinds))]
    return tuple(drawn[:count])
