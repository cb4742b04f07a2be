"""Keyframed FLAME-parameter channels with minimum-jerk interpolation (the motion library's core).

A channel is one scalar of the FLAME driving parameters, named by a string: a
named expression of the synthetic head ("smile", see `EXPRESSION_NAMES`), a pose
component "<joint>.<axis>" (joint in `JOINTS`, axis in `AXES`: "jaw.pitch") or a
translation axis ("translation.x"). A `Timeline` holds keyframes (time in
seconds, target values) of channels that move together; sampling interpolates
between consecutive keys with the minimum-jerk profile
s(u) = 10 u^3 - 15 u^4 + 6 u^5, so position, velocity and acceleration are
continuous and values never overshoot their keys. Every move lasts at least
as long as its channels' `ACCELERATION_LIMITS` allow (a minimum-jerk move of
size d over T seconds peaks at an acceleration of 10 / sqrt(3) d / T^2), so the
sampled second differences times fps^2 stay within the limits at any rate.

Axes: pitch, yaw, roll are the axis-angle's x, y, z (y up, the face looking
along +z): positive pitch nods the head down, opens the jaw and lowers the
eyes; positive yaw turns the face towards the subject's left (+x).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from uika_jax.synthetic.deform import EXPRESSION_NAMES

JOINTS = ("global", "neck", "jaw", "left_eye", "right_eye")
"""The FLAME pose rows, in order."""
AXES = ("pitch", "yaw", "roll")
"""Axis-angle components x, y, z of a pose row, in order."""
TRANSLATION_AXES = ("x", "y", "z")
"""Components of the translation, in order."""

ACCELERATION_LIMITS = {
    "expression": 400.0,
    "eyelids": 2500.0,
    "jaw": 150.0,
    "head": 40.0,
    "eyes": 600.0,
    "translation": 1.0,
}
"""Largest |second time derivative| of a channel (coefficients/s^2, rad/s^2, m/s^2).

"eyelids" covers blink_left and blink_right (a blink closes in about 50 ms),
"expression" the other named expressions, "head" the global and neck rows,
"jaw" the jaw row, "eyes" the two eye rows (saccades), "translation" the
translation.
"""

MIN_JERK_PEAK = 10.0 / np.sqrt(3.0)
"""Peak |s''(u)| of the minimum-jerk profile on [0, 1]."""

_JOINT_GROUPS = {
    "global": "head",
    "neck": "head",
    "jaw": "jaw",
    "left_eye": "eyes",
    "right_eye": "eyes",
}


def acceleration_limit(channel: str) -> float:
    """The `ACCELERATION_LIMITS` entry that bounds a channel.

    Raises:
      ValueError: for a name that is no channel.
    """
    if channel in ("blink_left", "blink_right"):
        return ACCELERATION_LIMITS["eyelids"]
    if channel in EXPRESSION_NAMES:
        return ACCELERATION_LIMITS["expression"]
    group, _, axis = channel.partition(".")
    if group == "translation" and axis in TRANSLATION_AXES:
        return ACCELERATION_LIMITS["translation"]
    if group in _JOINT_GROUPS and axis in AXES:
        return ACCELERATION_LIMITS[_JOINT_GROUPS[group]]
    raise ValueError(
        f"unknown channel {channel!r}: expected a name of {EXPRESSION_NAMES}, "
        f"'<joint>.<axis>' with joint in {JOINTS} and axis in {AXES}, or 'translation.<x|y|z>'"
    )


class Timeline:
    """Keyframes of channels that move together, starting at rest (all zero).

    Attributes:
      channels: the channel names, one per value column.
    """

    def __init__(self, channels: Sequence[str], start: float) -> None:
        """Starts the channels at zero at time `start` (seconds)."""
        self.channels = tuple(channels)
        self._limits = np.array([acceleration_limit(c) for c in self.channels])
        self._times = [float(start)]
        self._values = [np.zeros(len(self.channels))]

    @property
    def end(self) -> float:
        """Time of the last keyframe, seconds."""
        return self._times[-1]

    @property
    def current(self) -> np.ndarray:
        """Values (C,) at the last keyframe."""
        return self._values[-1]

    def shortest(self, target) -> float:
        """The shortest move to `target` that keeps every channel within its acceleration limit."""
        delta = np.abs(np.asarray(target, np.float64) - self.current)
        return float(np.sqrt(MIN_JERK_PEAK * delta / self._limits).max(initial=0.0))

    def move(self, target, duration: float) -> None:
        """Adds a keyframe `target` (a scalar or (C,)) after `duration` seconds.

        The move is lengthened to `shortest(target)` if it would be faster; a move
        of no duration to the current values adds nothing.
        """
        target = np.broadcast_to(np.asarray(target, np.float64), self.current.shape)
        duration = max(float(duration), self.shortest(target))
        if duration <= 0.0:
            return
        self._times.append(self.end + duration)
        self._values.append(target.copy())

    def hold(self, duration: float) -> None:
        """Keeps the current values for `duration` seconds."""
        self.move(self.current, duration)

    def sample(self, times: np.ndarray) -> np.ndarray:
        """Values (T, C) at `times` (T,), constant before the first and after the last key."""
        keys, values = np.asarray(self._times), np.stack(self._values)
        if keys.size == 1:
            return np.broadcast_to(values[0], (times.size, values.shape[1]))
        index = np.clip(np.searchsorted(keys, times, side="right") - 1, 0, keys.size - 2)
        u = np.clip((times - keys[index]) / (keys[index + 1] - keys[index]), 0.0, 1.0)
        s = u**3 * (10.0 - 15.0 * u + 6.0 * u * u)
        return values[index] + (values[index + 1] - values[index]) * s[:, None]


def sample_parameters(
    timelines: Sequence[Timeline], times: np.ndarray, num_expression: int, named: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples timelines into FLAME-format parameter arrays (channels that repeat add up).

    Args:
      timelines: the timelines.
      times: (F,) sample times, seconds.
      num_expression: E; named expressions go to their index in EXPRESSION_NAMES,
        which must be below E.
      named: write the named expressions; False leaves the expression zero.

    Returns:
      (expression (F, E), pose (F, 5, 3), translation (F, 3)), float32.
    """
    frames = times.size
    expression = np.zeros((frames, num_expression))
    pose = np.zeros((frames, len(JOINTS), len(AXES)))
    translation = np.zeros((frames, len(TRANSLATION_AXES)))
    for timeline in timelines:
        values = timeline.sample(times)
        for column, channel in enumerate(timeline.channels):
            if channel in EXPRESSION_NAMES:
                if named:
                    expression[:, EXPRESSION_NAMES.index(channel)] += values[:, column]
                continue
            group, axis = channel.split(".")
            if group == "translation":
                translation[:, TRANSLATION_AXES.index(axis)] += values[:, column]
            else:
                pose[:, JOINTS.index(group), AXES.index(axis)] += values[:, column]
    return expression.astype(np.float32), pose.astype(np.float32), translation.astype(np.float32)
