"""`uika drive` and the `--motion` option: frames against `render(drive(...))`, motions, errors.

The avatar is random-but-plausible Gaussians on the built-in head's anchors (map size
48): each sits on its anchor with a millimetre offset, 4 mm across, opaque, its colour a
gradient over the head plus per-Gaussian noise (so that any motion changes pixels).
The reference frames come from the library's functions called directly, jitted as one
plain program (the rasterizer sizing its own capacity, one frame a call) with the
camera built here from `framing_camera`, not from the tool's code.
"""

from __future__ import annotations

import dataclasses
import logging
import types

import jax
import numpy as np
import pytest
from data_fixtures import NUM_EXPRESSION as DATASET_EXPRESSION
from data_fixtures import write_tiny_dataset
from PIL import Image
from test_vhap_import import write_export, write_model

from uika_jax.data.format import SEQUENCE_FILE
from uika_jax.head.anchors import make_anchors
from uika_jax.head.io import load_head_model
from uika_jax.models.avatar import drive, render
from uika_jax.render.camera import framing_camera
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.tools import drive as drive_tool
from uika_jax.tools.avatar_file import avatar_from_gaussians, read_avatar, write_avatar
from uika_jax.tools.cli import main as uika
from uika_jax.tools.motion_option import load_motion
from uika_jax.video import read_video_frames

SIZE, FPS, FRAMES = 64, 2.0, 6
CAPACITY = 8192
"""Intersection slots of the test avatar's config: about twice what its frames need."""
BACKGROUND = (1.0, 1.0, 1.0)
RUN = ["--size", str(SIZE), "--fps", str(FPS), "--chunk", "4"]
"""Options every run shares (one compilation of the tool's render for the whole file)."""


@pytest.fixture(scope="module")
def head():
    return synthetic_head_model()


@pytest.fixture(scope="module")
def avatar_path(tmp_path_factory, head):
    anchors = make_anchors(head, 48)
    rng = np.random.default_rng(0)
    k = anchors.num_anchors
    positions = np.asarray(anchors.positions, np.float64)
    offsets = 0.001 * rng.normal(size=(k, 3))
    quats = rng.normal(size=(k, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    gradient = 0.5 + 4.0 * (positions - positions.mean(0))
    colors = np.clip(gradient + 0.25 * rng.uniform(-1, 1, (k, 3)), 0.02, 0.98)
    gaussians = types.SimpleNamespace(
        means=(positions + offsets)[None],
        offsets=offsets[None],
        quats=quats[None],
        log_scales=np.full((1, k, 3), np.log(0.002)),
        opacity_logits=np.full((1, k), 3.0),
        colors=colors[None],
    )
    # A fixed capacity (the tool then calibrates nothing): every run shares one compilation.
    render_settings = {"background": list(BACKGROUND), "capacity": CAPACITY}
    config = {"head": {"model_path": None}, "render": render_settings}
    path = tmp_path_factory.mktemp("avatar") / "avatar.npz"
    write_avatar(path, avatar_from_gaussians(gaussians, 0, anchors, str(head.fingerprint), config))
    return path


@jax.jit
def reference_frame(head, anchors, gaussians, params, viewmat, K):
    """One frame through the library directly: (1, 1) params and cameras."""
    posed = drive(head, anchors, gaussians, params)
    return render(posed, viewmat, K, SIZE, SIZE, background=BACKGROUND).images[0, 0]


def reference_camera(head, translation, yaw_deg=0.0):
    vertices = np.asarray(head.v_template, np.float64)
    centre = (vertices.min(0) + vertices.max(0)) / 2 + translation.mean(0)
    viewmat, K = framing_camera(centre, np.ptp(vertices[:, 1]), SIZE, yaw_deg)
    return viewmat[None, None], K[None, None]


def reference_frames(head, avatar_path, params, frames, yaw_per_frame=0.0):
    avatar = read_avatar(avatar_path)
    out = []
    for f in frames:
        one = jax.tree.map(lambda x, f=f: np.asarray(x)[f][None, None], params)
        viewmat, K = reference_camera(head, params.translation, yaw_per_frame * f)
        image = reference_frame(head, avatar.anchors, avatar.canonical(), one, viewmat, K)
        out.append(np.round(np.clip(np.asarray(image), 0, 1) * 255).astype(np.uint8))
    return out


def read_pngs(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def mean_abs(a, b):
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.fixture(scope="module")
def jaw_run(tmp_path_factory, avatar_path):
    out = tmp_path_factory.mktemp("jaw")
    argv = ["drive", str(avatar_path), "--motion", "demo:jaw", "--frames", str(FRAMES), *RUN]
    status = uika([*argv, "--out", str(out / "jaw.mp4"), "--frames-dir", str(out / "frames")])
    return status, out


def test_frames_equal_render_of_drive_and_the_video_holds_them(jaw_run, head, avatar_path):
    status, out = jaw_run
    assert status == 0
    pngs = read_pngs(out / "frames")
    assert len(pngs) == FRAMES and pngs[0].shape == (SIZE, SIZE, 3)
    motion = load_motion("demo:jaw", head, frames=FRAMES, fps=FPS)
    # Frame 1 has the jaw open (0.21 rad), frame 3 is neutral, frame 5 is in the padded
    # last chunk (frames 4-5 of a chunk of 4).
    assert motion.pose[1, 2, 0] > 0.15 and not np.any(motion.pose[3])
    for f, expected in zip(
        (1, 3, 5), reference_frames(head, avatar_path, motion, (1, 3, 5)), strict=True
    ):
        assert np.abs(pngs[f].astype(int) - expected).max() <= 1, f
    video = read_video_frames(out / "jaw.mp4")
    assert len(video) == FRAMES
    for frame, png in zip(video, pngs, strict=True):
        assert mean_abs(frame, png) < 4.0


def test_frames_follow_the_motion(jaw_run):
    pngs = read_pngs(jaw_run[1] / "frames")
    open_jaw, neutral = pngs[1].astype(int), pngs[3].astype(int)
    changed = np.abs(open_jaw - neutral).max(-1) > 24
    rows = np.flatnonzero(changed.any(1))
    assert changed.sum() > 20
    # The jaw moves the lower face: the changed pixels lie below the head's middle.
    assert rows.mean() > SIZE / 2


def test_orbit_turns_the_camera(tmp_path, head, avatar_path):
    argv = ["drive", str(avatar_path), "--motion", "demo:talking", "--frames", "4", *RUN]
    assert uika([*argv, "--orbit", "120", "--frames-dir", str(tmp_path)]) == 0
    pngs = read_pngs(tmp_path)
    motion = load_motion("demo:talking", head, frames=4, fps=FPS)
    expected = reference_frames(head, avatar_path, motion, (0, 3), yaw_per_frame=30.0)
    assert np.abs(pngs[0].astype(int) - expected[0]).max() <= 1
    assert np.abs(pngs[3].astype(int) - expected[1]).max() <= 1
    assert mean_abs(pngs[0], pngs[3]) > 5.0


def with_render_settings(avatar_path, folder, **settings):
    """A copy of the avatar whose config's `render` section has `settings`."""
    avatar = read_avatar(avatar_path)
    config = {**avatar.config, "render": {**avatar.config["render"], **settings}}
    path = folder / "avatar_copy.npz"
    write_avatar(path, dataclasses.replace(avatar, config=config))
    return path


def test_an_overflowing_chunk_is_calibrated_and_rendered_again(tmp_path, head, avatar_path):
    # 1024 slots hold about a third of a frame's intersections here: the chunk overflows.
    small = with_render_settings(avatar_path, tmp_path, capacity=1024)
    params = load_motion("demo:jaw", head, frames=2, fps=FPS)
    report = []
    frames = drive_tool.drive_frames(
        read_avatar(small), head, params, size=SIZE, chunk=4, background=BACKGROUND, report=report
    )
    expected = reference_frames(head, avatar_path, params, (0, 1))
    for frame, reference in zip(frames, expected, strict=True):
        assert np.abs(frame.astype(int) - reference).max() <= 1
    assert report[0].rerendered_chunks == 1 and report[0].overflow_frames == 0
    assert report[0].capacity > 1024


def test_a_remaining_overflow_is_reported_with_status_1(tmp_path, monkeypatch, avatar_path, capsys):
    small = with_render_settings(avatar_path, tmp_path, capacity=1024)
    calibrate = drive_tool.calibrate_capacity
    monkeypatch.setattr(
        drive_tool,
        "calibrate_capacity",
        lambda *a, **k: dataclasses.replace(calibrate(*a, **k), capacity=1024),
    )
    argv = ["drive", str(small), "--motion", "demo:jaw", "--frames", "2", *RUN]
    assert uika([*argv, "--frames-dir", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert "frames 0-1: rasterizer overflow" in err
    assert "2 frames were rendered with a rasterizer overflow" in err
    assert len(read_pngs(tmp_path / "f")) == 2


def test_dataset_sequence_motion(tmp_path, head, avatar_path):
    index = write_tiny_dataset(tmp_path / "data")
    sequence = tmp_path / "data" / "a" / "talk"
    stored = np.load(sequence / SEQUENCE_FILE)
    for spec in (sequence, sequence / SEQUENCE_FILE):
        motion = load_motion(str(spec), head)
        frames = index.subjects[0].sequences[0].num_frames
        assert motion.expression.shape == (frames, head.num_expression)
        np.testing.assert_array_equal(
            motion.expression[:, :DATASET_EXPRESSION], stored["expression"]
        )
        assert not np.any(motion.expression[:, DATASET_EXPRESSION:])
        np.testing.assert_array_equal(motion.pose, stored["pose"])
        np.testing.assert_array_equal(motion.translation, stored["translation"])
        assert motion.shape.shape == (frames, head.num_shape)
    assert load_motion(str(sequence), head, frames=2).pose.shape == (2, 5, 3)
    argv = ["drive", str(avatar_path), "--motion", str(sequence), *RUN]
    assert uika([*argv, "--frames-dir", str(tmp_path / "f")]) == 0
    assert len(read_pngs(tmp_path / "f")) == frames


def test_vhap_export_motion(tmp_path, head, caplog):
    model_path, obj = write_model(tmp_path)
    src = tmp_path / "export"
    for sub in ("images", "fg_masks", "flame_param"):
        (src / sub).mkdir(parents=True)
    flame = load_head_model(model_path, obj)
    tracked = write_export(src, flame)
    with caplog.at_level(logging.WARNING):
        motion = load_motion(str(src), head)
    assert "the last 90 are dropped" in caplog.text
    assert motion.expression.shape == (len(tracked), head.num_expression)
    for f, p in enumerate(tracked):
        np.testing.assert_allclose(motion.expression[f], p["expr"][0, : head.num_expression])
        rows = [
            p["rotation"][0],
            p["neck_pose"][0],
            p["jaw_pose"][0],
            *p["eyes_pose"].reshape(2, 3),
        ]
        np.testing.assert_allclose(motion.pose[f], np.stack(rows), rtol=1e-6)
        np.testing.assert_allclose(motion.translation[f], p["translation"][0], rtol=1e-6)


def test_bad_inputs_are_refused_naming_them(tmp_path, avatar_path, capsys):
    base = ["drive", "--out", str(tmp_path / "v.mp4"), *RUN]
    assert uika([*base, str(tmp_path / "none.npz"), "--motion", "demo:jaw"]) == 2
    assert "none.npz: no such avatar file" in capsys.readouterr().err

    avatar = read_avatar(avatar_path)
    other = tmp_path / "other_head.npz"
    write_avatar(other, dataclasses.replace(avatar, fingerprint="flame2023:x:0123"))
    assert uika([*base, str(other), "--motion", "demo:jaw"]) == 2
    err = capsys.readouterr().err
    assert "other_head.npz was made with head model 'flame2023:x:0123'" in err

    assert uika([*base, str(avatar_path), "--motion", "demo:moonwalk"]) == 2
    err = capsys.readouterr().err
    assert "demo:moonwalk: unknown" in err and "demo:talking" in err

    assert uika([*base, str(avatar_path), "--motion", str(tmp_path)]) == 2
    assert "holds neither sequence.npz" in capsys.readouterr().err

    assert uika([*base, str(avatar_path), "--motion", "demo:jaw", "--background", "1,2"]) == 2
    assert "--background '1,2'" in capsys.readouterr().err

    assert uika(["drive", str(avatar_path), "--motion", "demo:jaw"]) == 2
    assert "--frames-dir" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_demo_motions_on_a_head_without_named_expressions(tmp_path):
    flame = load_head_model(*write_model(tmp_path))
    talking = load_motion("demo:talking", flame, frames=6, fps=FPS)
    assert talking.expression.shape == (6, flame.num_expression)
    assert not np.any(talking.expression) and np.ptp(talking.pose[:, 2, 0]) > 0.01
    with pytest.raises(ValueError, match="demo:blinks: moves only named expressions") as error:
        load_motion("demo:blinks", flame)
    assert "demo:talking" in str(error.value) and "demo:brows" not in str(error.value)
