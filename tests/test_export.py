"""`uika export`: splat files against gsplat's exporter, the animatable package driven alone.

The PLY and the compressed PLY are compared byte for byte with gsplat 1.5.3's
`export_splats` (torch, CPU) on the same splats. The animatable package is driven
by `numpy_drive`, a NumPy implementation of the formulas in the package's
README.txt written here (SVD polar factor, float64), and must reproduce
`uika_jax.models.avatar.drive` for frames with jaw, neck, eye and expression.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from avatar_fixtures import builtin_head, head_config, random_avatar
from conftest import require_oracle
from fake_flame import make_fake_flame_arrays, write_flame_npz

from uika_jax.head.anchors import anchors_at
from uika_jax.head.io import load_head_model
from uika_jax.head.lbs import FlameParams
from uika_jax.models.avatar import drive
from uika_jax.tools.animatable import PACKAGE_NAME, README_NAME
from uika_jax.tools.avatar_file import write_avatar
from uika_jax.tools.cli import main

SH_C0 = 0.28209479177387814


@pytest.fixture
def avatar_path(tmp_path):
    head, anchors = builtin_head()
    path = tmp_path / "avatar.npz"
    write_avatar(path, random_avatar(head, anchors, seed=3))
    return path


# --------------------------------------------------------------------------- NumPy driver


def _rodrigues(rotvec: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(rotvec)
    if angle < 1e-12:
        return np.eye(3)
    x, y, z = rotvec / angle
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _quaternion(rotation: np.ndarray) -> np.ndarray:
    """wxyz of a rotation matrix (Shepperd: the largest of |w|, |x|, |y|, |z| first)."""
    m = rotation
    trace = np.trace(m)
    candidates = [trace, m[0, 0], m[1, 1], m[2, 2]]
    i = int(np.argmax(candidates))
    if i == 0:
        w = np.sqrt(1 + trace) / 2
        q = [
            w,
            (m[2, 1] - m[1, 2]) / (4 * w),
            (m[0, 2] - m[2, 0]) / (4 * w),
            (m[1, 0] - m[0, 1]) / (4 * w),
        ]
    else:
        a, b, c = (i - 1, i % 3, (i + 1) % 3)
        big = np.sqrt(1 + m[a, a] - m[b, b] - m[c, c]) / 2
        q = np.zeros(4)
        q[0] = (m[c, b] - m[b, c]) / (4 * big)
        q[1 + a] = big
        q[1 + b] = (m[b, a] + m[a, b]) / (4 * big)
        q[1 + c] = (m[c, a] + m[a, c]) / (4 * big)
    return np.asarray(q)


def _hamilton(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, v1 = a[..., :1], a[..., 1:]
    w2, v2 = b[..., :1], b[..., 1:]
    w = w1 * w2 - np.sum(v1 * v2, -1, keepdims=True)
    return np.concatenate([w, w1 * v2 + w2 * v1 + np.cross(v1, v2)], -1)


def numpy_drive(package, beta, psi, pose, translation):
    """README.txt's formulas on the package's arrays alone: (means (K, 3), quats (K, 4))."""
    p = {
        name: np.asarray(package[name], np.float64)
        for name in package.files
        if name not in ("format", "fingerprint", "joint_names", "rotation_convention")
    }
    parents = package["parents"]
    s, e = len(beta), len(psi)
    joints = (
        p["joints_template"]
        + p["joint_shapedirs"][..., :s] @ beta
        + p["joint_exprdirs"][..., :e] @ psi
    )
    rotations = [_rodrigues(r) for r in pose]
    world = []
    for j, parent in enumerate(parents):
        local = np.eye(4)
        local[:3, :3] = rotations[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0)
        world.append(local if parent < 0 else world[parent] @ local)
    skinning = np.stack(
        [
            np.concatenate([g[:3, :3], (g[:3, 3] - g[:3, :3] @ joints[j])[:, None]], 1)
            for j, g in enumerate(world)
        ]
    )
    feature = np.concatenate([(r - np.eye(3)).ravel() for r in rotations[1:]])
    points = (
        p["canonical_means"]
        + p["shapedirs"][..., :s] @ beta
        + p["exprdirs"][..., :e] @ psi
        + p["posedirs"] @ feature
    )
    blended = np.einsum("kj,jab->kab", p["lbs_weights"], skinning)
    means = np.einsum("kab,kb->ka", blended[:, :, :3], points) + blended[:, :, 3] + translation
    u, _, vt = np.linalg.svd(blended[:, :, :3])
    quats = _hamilton(np.stack([_quaternion(r) for r in u @ vt]), p["quats"])
    return means, quats


def _motion(head, frames: int, seed: int) -> FlameParams:
    """Frames with global pose, neck, jaw, eyes, expression and translation."""
    rng = np.random.default_rng(seed)
    pose = rng.normal(scale=0.15, size=(frames, head.num_joints, 3))
    pose[:, 2, 0] = rng.uniform(0.05, 0.35, frames)  # jaw opening
    return FlameParams(
        shape=rng.normal(size=(frames, head.num_shape)).astype(np.float32),
        expression=rng.normal(size=(frames, head.num_expression)).astype(np.float32),
        pose=pose.astype(np.float32),
        translation=rng.normal(scale=0.02, size=(frames, 3)).astype(np.float32),
    )


def _assert_quats_close(got, want, atol):
    sign = np.where(np.sum(got * want, -1, keepdims=True) < 0, -1.0, 1.0)
    np.testing.assert_allclose(got * sign, want, atol=atol)


# --------------------------------------------------------------------------- splat files


def _gsplat_bytes(avatar, fmt: str) -> bytes:
    torch = require_oracle("torch")
    exporter = require_oracle("gsplat.exporter")
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731
    sh0 = (t(avatar.colors) - 0.5) / SH_C0
    k = avatar.num_gaussians
    return exporter.export_splats(
        t(avatar.means),
        t(avatar.log_scales),
        t(avatar.quats),
        t(avatar.opacity_logits),
        sh0[:, None],
        torch.zeros(k, 0, 3),
        format=fmt,
    )


@pytest.mark.oracle
@pytest.mark.parametrize("fmt", ["ply", "ply_compressed"])
def test_splat_file_is_gsplats_byte_for_byte(avatar_path, tmp_path, fmt):
    from uika_jax.tools.avatar_file import read_avatar

    out = tmp_path / f"out.{fmt}"
    assert main(["export", str(avatar_path), "--ply", str(out), "--format", fmt]) == 0
    want = _gsplat_bytes(read_avatar(avatar_path), fmt)
    assert out.read_bytes() == want


@pytest.mark.oracle
def test_splat_format_matches_gsplat_up_to_exp_rounding(avatar_path, tmp_path):
    """Order and centres exact; scales within 2 ulp (torch's float32 exp); uint8 codes +-1."""
    from uika_jax.tools.avatar_file import read_avatar

    out = tmp_path / "out.splat"
    assert main(["export", str(avatar_path), "--ply", str(out), "--format", "splat"]) == 0
    record = np.dtype(
        [("mean", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)]
    )
    ours = np.frombuffer(out.read_bytes(), record)
    want = np.frombuffer(_gsplat_bytes(read_avatar(avatar_path), "splat"), record)
    np.testing.assert_array_equal(ours["mean"], want["mean"])
    np.testing.assert_array_max_ulp(ours["scale"], want["scale"], maxulp=2)
    for name in ("rgba", "rot"):
        diff = np.abs(ours[name].astype(int) - want[name].astype(int))
        assert diff.max() <= 1 and np.mean(diff == 0) > 0.999


def _read_ply(path) -> np.ndarray:
    data = path.read_bytes()
    header, body = data.split(b"end_header\n", 1)
    names = [
        line.split()[-1].decode() for line in header.splitlines() if line.startswith(b"property")
    ]
    return np.frombuffer(body, np.dtype([(n, "<f4") for n in names]))


def test_ply_fields_follow_the_3dgs_conventions(avatar_path, tmp_path):
    from uika_jax.tools.avatar_file import read_avatar

    out = tmp_path / "out.ply"
    assert main(["export", str(avatar_path), "--ply", str(out)]) == 0
    avatar, rows = read_avatar(avatar_path), _read_ply(out)
    assert rows.shape == (avatar.num_gaussians,)
    np.testing.assert_array_equal(np.stack([rows[a] for a in "xyz"], 1), avatar.means)
    rgb = np.stack([rows[f"f_dc_{i}"] for i in range(3)], 1) * SH_C0 + 0.5
    np.testing.assert_allclose(rgb, avatar.colors, atol=1e-6)
    np.testing.assert_array_equal(rows["opacity"], avatar.opacity_logits)
    np.testing.assert_array_equal(
        np.stack([rows[f"scale_{i}"] for i in range(3)], 1), avatar.log_scales
    )
    np.testing.assert_array_equal(np.stack([rows[f"rot_{i}"] for i in range(4)], 1), avatar.quats)


# --------------------------------------------------------------------------- animatable


def _fake_flame(directory) -> tuple:
    """A small fake FLAME file (400 vertices), its model and 500 anchors on it."""
    path = write_flame_npz(
        directory / "generic_model.npz", make_fake_flame_arrays(400, 700, seed=1)
    )
    head = load_head_model(path)
    rng = np.random.default_rng(0)
    bary = rng.dirichlet(np.ones(3), 500).astype(np.float32)
    return path, head, anchors_at(head, rng.integers(0, 700, 500), bary)


@pytest.mark.parametrize("model", ["builtin", "flame"])
def test_animatable_package_alone_reproduces_drive(tmp_path, capsys, model):
    if model == "builtin":
        head, anchors = builtin_head()
        avatar = random_avatar(head, anchors, seed=5)
    else:
        path, head, anchors = _fake_flame(tmp_path)
        avatar = random_avatar(head, anchors, seed=5, config=head_config(str(path)))
    write_avatar(tmp_path / "avatar.npz", avatar)
    assert (
        main(["export", str(tmp_path / "avatar.npz"), "--animatable", str(tmp_path / "pkg")]) == 0
    )
    printed = capsys.readouterr().out
    readme = (tmp_path / "pkg" / README_NAME).read_text()
    flame = model == "flame"
    assert ("FLAME-derived data" in printed) == flame
    assert ("FLAME model licence" in readme) == flame
    package = np.load(tmp_path / "pkg" / PACKAGE_NAME, allow_pickle=False)
    motion = _motion(head, frames=3, seed=7)
    drive_jit = jax.jit(drive, static_argnames="use_shape")
    # `uika drive`'s beta = 0 (use_shape=False), then a random identity beta: one program.
    for beta in (np.zeros_like(motion.shape), motion.shape):
        motion = dataclasses.replace(motion, shape=beta)
        posed = drive_jit(head, anchors, avatar.canonical(), jax_tree_batch(motion), use_shape=True)
        for f in range(3):
            means, quats = numpy_drive(
                package,
                np.asarray(motion.shape[f], np.float64),
                np.asarray(motion.expression[f], np.float64),
                np.asarray(motion.pose[f], np.float64),
                np.asarray(motion.translation[f], np.float64),
            )
            np.testing.assert_allclose(np.asarray(posed.means[0, f]), means, atol=1e-6)
            _assert_quats_close(np.asarray(posed.quats[0, f]), quats, atol=5e-6)


def jax_tree_batch(params: FlameParams) -> FlameParams:
    """Adds the leading B = 1 axis `drive` takes."""
    return dataclasses.replace(
        params,
        **{f.name: np.asarray(getattr(params, f.name))[None] for f in dataclasses.fields(params)},
    )


# --------------------------------------------------------------------------- refusals


def test_export_refuses_another_head_model(tmp_path, capsys):
    path, head, anchors = _fake_flame(tmp_path)
    write_avatar(
        tmp_path / "avatar.npz", random_avatar(head, anchors, config=head_config(str(path)))
    )
    status = main(
        [
            "export",
            str(tmp_path / "avatar.npz"),
            "--ply",
            str(tmp_path / "o.ply"),
            "--head-model",
            "builtin",
        ]
    )
    assert status == 1
    error = capsys.readouterr().err
    assert "avatar.npz" in error and "head model" in error
    assert not (tmp_path / "o.ply").exists()


def test_export_needs_an_output(avatar_path, capsys):
    assert main(["export", str(avatar_path)]) == 2
    assert "--ply" in capsys.readouterr().err


def test_posed_ply_is_the_driven_frame(tmp_path):
    """--frame K of a sequence file: the PLY's centres and rotations are NumPy-driven frame K."""
    head, anchors = builtin_head()
    avatar = random_avatar(head, anchors, seed=11)
    write_avatar(tmp_path / "avatar.npz", avatar)
    motion = _motion(head, frames=4, seed=2)
    np.savez(
        tmp_path / "sequence.npz",
        shape=motion.shape[0],
        expression=motion.expression,
        pose=motion.pose,
        translation=motion.translation,
    )
    out, pkg = tmp_path / "posed.ply", tmp_path / "pkg"
    args = ["export", str(tmp_path / "avatar.npz"), "--ply", str(out), "--animatable", str(pkg)]
    assert main([*args, "--frame", "2", "--motion", str(tmp_path / "sequence.npz")]) == 0
    rows = _read_ply(out)
    package = np.load(pkg / PACKAGE_NAME, allow_pickle=False)
    means, quats = numpy_drive(
        package,
        np.zeros(0),
        motion.expression[2].astype(np.float64),
        motion.pose[2].astype(np.float64),
        motion.translation[2].astype(np.float64),
    )
    np.testing.assert_allclose(np.stack([rows[a] for a in "xyz"], 1), means, atol=1e-6)
    _assert_quats_close(np.stack([rows[f"rot_{i}"] for i in range(4)], 1), quats, atol=5e-6)
    np.testing.assert_array_equal(rows["opacity"], avatar.opacity_logits)


def test_frame_outside_the_motion_is_refused(avatar_path, tmp_path, capsys):
    out = tmp_path / "o.ply"
    args = [
        "export",
        str(avatar_path),
        "--ply",
        str(out),
        "--motion",
        "demo:talking",
        "--frames",
        "3",
    ]
    assert main([*args, "--frame", "3"]) == 1
    assert "--frame 3" in capsys.readouterr().err and not out.exists()
    assert main(args) == 2
