"""The procedural motion library: determinism, smoothness, ranges, blinks, head amplitudes."""

import numpy as np
import pytest

from uika_jax.synthetic.deform import EXPRESSION_NAMES
from uika_jax.synthetic.keyframes import ACCELERATION_LIMITS, MIN_JERK_PEAK, Timeline
from uika_jax.synthetic.motion import (
    MOTION_KINDS,
    NUM_EXPRESSION,
    motion_sequence,
    sample_sequence_kinds,
    usable_kinds,
)
from uika_jax.synthetic.motion_kinds import (
    EXPRESSION_MAX,
    EYE_PITCH_MAX,
    EYE_YAW_MAX,
    GLOBAL_ROLL_MAX,
    HEAD_PITCH_MAX,
    HEAD_ROLL_MAX,
    HEAD_YAW_MAX,
    JAW_OPEN_MAX,
    JAW_SIDEWAYS_MAX,
    TRANSLATION_MAX,
)

BLINKS = [EXPRESSION_NAMES.index("blink_left"), EXPRESSION_NAMES.index("blink_right")]
GLOBAL, NECK, JAW, LEFT_EYE, RIGHT_EYE = range(5)
PITCH, YAW, ROLL = range(3)
SEEDS = range(4)


def sequences(num_frames=250, fps=25.0, kinds=MOTION_KINDS):
    return [
        motion_sequence(kind, num_frames, seed, num_expression=NUM_EXPRESSION, fps=fps)
        for kind in kinds
        for seed in SEEDS
    ]


def test_minimum_jerk_profile_and_its_acceleration_limit():
    timeline = Timeline(["smile", "jaw.pitch"], start=0.0)
    timeline.move([1.0, 0.0], 0.0)
    shortest = np.sqrt(MIN_JERK_PEAK / ACCELERATION_LIMITS["expression"])
    assert timeline.end == pytest.approx(shortest)
    timeline.move([1.0, 0.2], 2.0)
    times = np.linspace(-0.1, shortest + 2.5, 20001)
    values = timeline.sample(times)
    u = np.clip(times / shortest, 0.0, 1.0)
    np.testing.assert_allclose(values[:, 0], 6 * u**5 - 15 * u**4 + 10 * u**3, atol=1e-12)
    v = np.clip((times - shortest) / 2.0, 0.0, 1.0)
    np.testing.assert_allclose(values[:, 1], 0.2 * (6 * v**5 - 15 * v**4 + 10 * v**3), atol=1e-12)
    step = times[1] - times[0]
    peak = np.abs(np.diff(values[:, 0], 2)).max() / step**2
    assert peak == pytest.approx(ACCELERATION_LIMITS["expression"], rel=2e-3)
    with pytest.raises(ValueError, match=r"unknown channel 'jaw\.twist'"):
        Timeline(["jaw.twist"], start=0.0)


def test_deterministic_shapes_prefix_and_seeds():
    for kind in MOTION_KINDS:
        a = motion_sequence(kind, 60, 7, num_expression=NUM_EXPRESSION)
        b = motion_sequence(kind, 60, 7, num_expression=NUM_EXPRESSION)
        longer = motion_sequence(kind, 140, 7, num_expression=NUM_EXPRESSION)
        other = motion_sequence(kind, 60, 8, num_expression=NUM_EXPRESSION)
        assert a.kind == kind and a.num_frames == 60 and a.fps == 25.0 and a.seed == 7
        assert a.expression.shape == (60, NUM_EXPRESSION) and a.expression.dtype == np.float32
        assert a.pose.shape == (60, 5, 3) and a.pose.dtype == np.float32
        assert a.translation.shape == (60, 3) and a.translation.dtype == np.float32
        assert a.parts == (kind,) or (kind == "mixed" and len(a.parts) >= 2)
        for name in ("expression", "pose", "translation"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            np.testing.assert_array_equal(getattr(a, name), getattr(longer, name)[:60])
        assert not np.array_equal(
            np.concatenate([a.expression, a.pose.reshape(60, -1)], 1),
            np.concatenate([other.expression, other.pose.reshape(60, -1)], 1),
        ), kind
    assert len({m.parts for m in sequences(10, kinds=["mixed"])}) > 1


@pytest.mark.parametrize("fps", [25.0, 60.0])
def test_second_differences_within_the_acceleration_limits(fps):
    expression_limit = np.full(NUM_EXPRESSION, ACCELERATION_LIMITS["expression"])
    expression_limit[BLINKS] = ACCELERATION_LIMITS["eyelids"]
    rows = ["head", "head", "jaw", "eyes", "eyes"]
    pose_limit = np.array([[ACCELERATION_LIMITS[r]] * 3 for r in rows])
    for m in sequences(int(10 * fps), fps):
        for values, limit in (
            (m.expression, expression_limit),
            (m.pose, pose_limit),
            (m.translation, ACCELERATION_LIMITS["translation"]),
        ):
            acceleration = np.abs(np.diff(values.astype(np.float64), 2, axis=0)) * fps**2
            assert np.all(acceleration <= limit * 1.001 + 0.05), (m.kind, m.seed)


def test_blinks_are_fast_but_continuous_and_close_the_eyes():
    for fps in (25.0, 30.0):
        for m in sequences(int(0.7 * fps), fps, kinds=["blinks"]):
            assert np.any(m.expression[:, BLINKS].min(axis=1) >= 0.999), (fps, m.seed)
    fine = motion_sequence("blinks", 60000, 1, num_expression=NUM_EXPRESSION, fps=1000.0)
    lids = fine.expression[:, BLINKS]
    assert np.abs(np.diff(lids, axis=0)).max() < 0.05, "a lid jumps within 1 ms"
    closures = np.count_nonzero(np.diff((lids.max(axis=1) >= 0.999).astype(int)) == 1)
    assert 60 / 3.0 <= closures <= 60 / 0.5, "not a blink or wink every 0.5-3 s"
    assert np.any(np.abs(lids[:, 0] - lids[:, 1]) >= 0.999), "no single-eye wink in 60 s"
    shut = np.flatnonzero(lids.min(axis=1) > 0.1)
    first_blink = shut[: np.argmax(np.diff(shut) > 1) + 1]
    assert 0.1 <= first_blink.size / 1000.0 <= 0.2, "a blink does not last about 150 ms"


def test_values_stay_within_the_ranges():
    for m in sequences():
        e, p, t = m.expression, m.pose, m.translation
        label = (m.kind, m.seed)
        assert e.min() >= 0.0, label
        assert np.all(e.max(axis=0) <= np.array([EXPRESSION_MAX[n] for n in EXPRESSION_NAMES]))
        head = p[:, GLOBAL] + p[:, NECK]
        assert np.all(np.abs(head).max(axis=0) <= [HEAD_PITCH_MAX, HEAD_YAW_MAX, HEAD_ROLL_MAX])
        assert np.all(p[:, GLOBAL] * p[:, NECK] >= 0.0), label
        assert np.abs(p[:, GLOBAL, ROLL]).max() <= GLOBAL_ROLL_MAX + 1e-6, label
        assert p[:, JAW, PITCH].min() >= 0.0 and p[:, JAW, PITCH].max() <= JAW_OPEN_MAX, label
        assert np.abs(p[:, JAW, YAW]).max() <= JAW_SIDEWAYS_MAX and not p[:, JAW, ROLL].any()
        np.testing.assert_array_equal(p[:, LEFT_EYE], p[:, RIGHT_EYE])
        assert np.abs(p[:, LEFT_EYE, PITCH]).max() <= EYE_PITCH_MAX, label
        assert np.abs(p[:, LEFT_EYE, YAW]).max() <= EYE_YAW_MAX and not p[:, LEFT_EYE, ROLL].any()
        assert np.abs(t).max() <= TRANSLATION_MAX, label
        assert np.abs(e).max() + np.abs(p).max() > 0.05, f"{label} does not move"


@pytest.mark.parametrize(
    ("kind", "axis", "maximum"),
    [
        ("head_turns", YAW, HEAD_YAW_MAX),
        ("nods", PITCH, HEAD_PITCH_MAX),
        ("tilts", ROLL, HEAD_ROLL_MAX),
    ],
)
def test_head_kinds_reach_their_amplitude(kind, axis, maximum):
    reached = []
    for m in sequences(100, kinds=[kind]):
        angle = m.pose[:, GLOBAL, axis] + m.pose[:, NECK, axis]
        reached.append(np.abs(angle).max() / maximum)
        others = np.delete(m.pose[:, [GLOBAL, NECK]], axis, axis=2)
        assert np.abs(others).max() < np.abs(angle).max(), m.seed
        assert not m.expression.any()
    assert min(reached) >= 0.7 - 1e-4 and max(reached) <= 1.0
    assert max(reached) - min(reached) > 0.05, "every sequence has the same amplitude"


def test_models_without_named_expressions():
    for kind in usable_kinds(named_expressions=False):
        named = motion_sequence(kind, 80, 3, num_expression=NUM_EXPRESSION)
        flame = motion_sequence(kind, 80, 3, num_expression=100, named_expressions=False)
        assert flame.expression.shape == (80, 100) and not flame.expression.any()
        np.testing.assert_array_equal(flame.pose, named.pose)
        np.testing.assert_array_equal(flame.translation, named.translation)
        assert "blinks" not in flame.parts and "brows" not in flame.parts
    assert set(MOTION_KINDS) - set(usable_kinds(False)) == {"blinks", "brows"}
    for kind in ("blinks", "brows"):
        with pytest.raises(ValueError, match="moves only named expressions"):
            motion_sequence(kind, 10, 0, num_expression=100, named_expressions=False)
    with pytest.raises(ValueError, match="named_expressions=False"):
        motion_sequence("talking", 10, 0, num_expression=100)


def test_bad_arguments():
    for kwargs, message in (
        ({"kind": "dancing"}, "unknown motion kind 'dancing'"),
        ({"num_frames": 0}, "num_frames must be >= 1"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"fps": 0.0}, "fps must be a positive number"),
        ({"num_expression": -2, "named_expressions": False}, "num_expression must be >= 0"),
    ):
        arguments = {"kind": "nods", "num_frames": 5, "seed": 0, "num_expression": 10} | kwargs
        with pytest.raises(ValueError, match=message):
            motion_sequence(**arguments)


def test_sample_sequence_kinds():
    one_round = sample_sequence_kinds(4, len(MOTION_KINDS))
    assert sorted(one_round) == sorted(MOTION_KINDS)
    assert sample_sequence_kinds(4, len(MOTION_KINDS)) == one_round
    assert sample_sequence_kinds(5, len(MOTION_KINDS)) != one_round
    many = sample_sequence_kinds(4, 3 * len(MOTION_KINDS) + 2)
    assert many[: len(MOTION_KINDS)] == one_round
    counts = [many.count(kind) for kind in MOTION_KINDS]
    assert max(counts) - min(counts) <= 1
    pose_only = sample_sequence_kinds(4, 30, named_expressions=False)
    assert set(pose_only) == set(usable_kinds(False))
    assert sample_sequence_kinds(0, 0) == ()
    with pytest.raises(ValueError, match="count must be a non-negative int"):
        sample_sequence_kinds(0, -1)
