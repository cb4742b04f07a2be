"""`uika import-vhap`: a tiny export in VHAP's layout, written here, imported and checked.

The fixture is a 2-camera, 3-timestep export of a fake FLAME-format model (the
official file layout with random blendshapes, tests/fake_flame.py) whose mesh is
a UV-mapped ellipsoid, so its UV maps mean something. The frames are the tracked
mesh's silhouette in each source camera, drawn by PIL (an independent
rasterizer), and the files are written the way VHAP writes them (OpenGL
camera-to-world matrices, shuffled frame entries, intrinsics at the top level or
per frame, per-timestep parameter files with leading axes of 1, a static offset
with VHAP's 120 teeth rows).
"""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from fake_flame import make_fake_flame_arrays, write_flame_npz
from PIL import Image, ImageDraw

from uika_jax.data.checks import check_dataset
from uika_jax.data.format import HeadModelInfo, frame_path, load_index
from uika_jax.data.reader import read_mask, read_sequence, read_uv
from uika_jax.data.vhap import (
    TEETH_VERTICES,
    VhapExportError,
    fit_coefficients,
    opengl_c2w_to_opencv_w2c,
    read_export,
    sequence_parameters,
)
from uika_jax.head.io import load_head_model
from uika_jax.head.lbs import flame_forward
from uika_jax.render.camera import HEAD_FRACTION, look_at
from uika_jax.tools.cli import main as uika

RINGS, SEGMENTS = 8, 12
SIZE = 32
TIMESTEPS = (0, 1, 2)
CAMERAS = (  # camera_id, yaw (deg), (w, h), (fl_x, fl_y, cx, cy)
    ("220700191", -25.0, (64, 48), (110.0, 112.0, 33.0, 23.0)),
    ("221501007", 30.0, (64, 48), (100.0, 100.0, 30.5, 25.5)),
)
TARGET = np.array([0.0, 0.01, 0.0])
FORWARD = jax.jit(flame_forward)


def ellipsoid_head():
    """A lat-long ellipsoid: vertices (V, 3), faces (F, 3), texture coordinates, UV faces.

    The UV seam is at the back (-z); the face (+z) sits at u = 0.5.
    """
    theta = np.pi * np.arange(1, RINGS) / RINGS
    phi = np.pi + 2 * np.pi * np.arange(SEGMENTS) / SEGMENTS
    ring = np.stack(
        [
            np.outer(np.sin(theta), np.sin(phi)),
            np.outer(np.cos(theta), np.ones(SEGMENTS)),
            np.outer(np.sin(theta), np.cos(phi)),
        ],
        -1,
    ).reshape(-1, 3)
    vertices = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * [0.08, 0.11, 0.095]

    def vertex(i, j):
        if i in (0, RINGS):
            return 0 if i == 0 else len(vertices) - 1
        return 1 + (i - 1) * SEGMENTS + j % SEGMENTS

    def texcoord(i, j):
        return i * (SEGMENTS + 1) + j

    faces, uv_faces = [], []
    for i in range(RINGS):
        for j in range(SEGMENTS):
            quad = [(i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1)]
            for tri in ((0, 1, 2), (0, 2, 3)):
                corners = [quad[k] for k in tri]
                if len({vertex(*c) for c in corners}) == 3:
                    faces.append([vertex(*c) for c in corners])
                    uv_faces.append([texcoord(*c) for c in corners])
    faces = np.array(faces)
    normal = np.cross(*(vertices[faces[:, 1:]] - vertices[faces[:, :1]]).transpose(1, 0, 2))
    if np.sum(normal * vertices[faces].mean(1)) < 0:
        faces, uv_faces = faces[:, ::-1], np.array(uv_faces)[:, ::-1]
    i, j = np.meshgrid(np.arange(RINGS + 1), np.arange(SEGMENTS + 1), indexing="ij")
    texcoords = np.stack([j / SEGMENTS, 1 - i / RINGS], -1).reshape(-1, 2)
    return vertices.astype(np.float32), faces, texcoords, np.asarray(uv_faces)


def write_model(folder):
    vertices, faces, texcoords, uv_faces = ellipsoid_head()
    arrays = make_fake_flame_arrays(len(vertices), len(faces), seed=3)
    arrays["v_template"], arrays["f"] = vertices, faces.astype(np.uint32)
    arrays["J"] = (arrays["J_regressor"] @ vertices).astype(np.float32)
    model_path = write_flame_npz(folder / "flame2023.npz", arrays)
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in texcoords]
    lines += [
        "f " + " ".join(f"{a + 1}/{t + 1}" for a, t in zip(f, tf, strict=True))
        for f, tf in zip(faces, uv_faces, strict=True)
    ]
    (folder / "head_template.obj").write_text("\n".join(lines) + "\n")
    return model_path, folder / "head_template.obj"


def opengl_c2w(eye, target):
    """OpenGL camera-to-world, built directly: x right, y up, looking along -z."""
    z = (eye - target) / np.linalg.norm(eye - target)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    c2w[:3, 3] = eye
    return c2w


def camera_eye(yaw):
    yaw = np.deg2rad(yaw)
    return TARGET + np.array([np.sin(yaw), 0.05, np.cos(yaw)])


def tracked_params(num_vertices, rng):
    """Per-timestep parameters as VHAP's write_flame_param stores them (leading axes of 1)."""
    shape = 0.05 * rng.normal(size=300)
    offset = 1e-3 * rng.normal(size=(1, num_vertices + TEETH_VERTICES, 3))
    return [
        {
            "rotation": 0.05 * rng.normal(size=(1, 3)),
            "neck_pose": 0.05 * rng.normal(size=(1, 3)),
            "jaw_pose": 0.05 * rng.normal(size=(1, 3)),
            "eyes_pose": 0.05 * rng.normal(size=(1, 6)),
            "translation": 0.005 * rng.normal(size=(1, 3)),
            "shape": shape,
            "expr": 0.05 * rng.normal(size=(1, 100)),
            "static_offset": offset,
        }
        for _ in TIMESTEPS
    ]


def silhouette(vertices, faces, viewmat, K, width, height, supersample=8):
    """The mesh's coverage (uint8) drawn triangle by triangle with PIL, supersampled.

    An independent rasterizer: PIL puts pixel centres at integers and truncates,
    which at 8x supersampling biases edges by 1/16 pixel at most.
    """
    cam = vertices @ viewmat[:3, :3].T + viewmat[:3, 3]
    pixels = (cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2]) * supersample - 0.5
    mask = Image.new("L", (width * supersample, height * supersample))
    draw = ImageDraw.Draw(mask)
    for face in faces:
        draw.polygon([tuple(p) for p in pixels[face]], fill=255)
    blocks = np.asarray(mask, np.float32).reshape(height, supersample, width, supersample)
    return np.round(blocks.mean((1, 3))).astype(np.uint8)


def write_export(src, model):
    """Draws the tracked mesh's silhouette in each camera and writes VHAP's files."""
    params = tracked_params(model.num_vertices, np.random.default_rng(7))
    frames = []
    for t, p in zip(TIMESTEPS, params, strict=True):
        np.savez(src / "flame_param" / f"{t:05d}.npz", **p)
        vertices, _ = FORWARD(
            model,
            p["shape"],
            p["expr"][0],
            np.concatenate(
                [p["rotation"], p["neck_pose"], p["jaw_pose"], p["eyes_pose"].reshape(2, 3)]
            ),
            p["translation"][0],
            p["static_offset"][0, : model.num_vertices],
        )
        for c, (camera_id, yaw, (w, h), (fx, fy, cx, cy)) in enumerate(CAMERAS):
            eye = camera_eye(yaw)
            K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
            mask = silhouette(np.asarray(vertices), model.faces, look_at(eye, TARGET), K, w, h)
            name = f"{t:05d}_{c:02d}.png"
            image = np.where(mask[..., None] > 0, [200, 150, 120], 255).astype(np.uint8)
            Image.fromarray(image).save(src / "images" / name)
            Image.fromarray(mask).save(src / "fg_masks" / name)
            frame = {
                "timestep_index": t,
                "timestep_index_original": t,
                "timestep_id": f"frame_{t:05d}",
                "camera_index": c,
                "camera_id": camera_id,
                "transform_matrix": opengl_c2w(eye, TARGET).tolist(),
                "file_path": f"images/{name}",
                "fg_mask_path": f"fg_masks/{name}",
                "flame_param_path": f"flame_param/{t:05d}.npz",
            }
            if c == 1:  # camera 0 takes the top-level intrinsics
                frame.update(fl_x=fx, fl_y=fy, cx=cx, cy=cy, w=w, h=h)
            frames.append(frame)
    (fx, fy, cx, cy), (w, h) = CAMERAS[0][3], CAMERAS[0][2]
    transforms = {
        "frames": frames[::-1],
        "fl_x": fx,
        "fl_y": fy,
        "cx": cx,
        "cy": cy,
        "w": w,
        "h": h,
        "timestep_indices": list(TIMESTEPS),
        "camera_indices": [0, 1],
    }
    (src / "transforms.json").write_text(json.dumps(transforms))
    return params


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vhap")
    model_path, obj = write_model(folder)
    model = load_head_model(model_path, obj)
    src = folder / "Subject 306.EMO-1"
    for sub in ("images", "fg_masks", "flame_param"):
        (src / sub).mkdir(parents=True)
    params = write_export(src, model)
    args = ["--head-model", str(model_path), "--uv", str(obj), "--size", str(SIZE)]
    return {"src": src, "model": model, "params": params, "args": args, "folder": folder}


def import_vhap(export, out, *options):
    return uika(["import-vhap", str(export["src"]), "--out", str(out), *export["args"], *options])


@pytest.fixture(scope="module")
def imported(export):
    out = export["folder"] / "dataset"
    assert import_vhap(export, out, "--teeth", "drop") == 0
    return out


def test_teeth_rows_are_refused_without_the_option(export, capsys):
    out = export["folder"] / "refused"
    assert import_vhap(export, out) == 2
    message = capsys.readouterr().err
    assert "flame_param/00000.npz: 'static_offset' has " in message
    assert f"{export['model'].num_vertices} vertices + 120 teeth" in message
    assert "--teeth drop" in message
    assert not out.exists()


def test_import_checks_clean_and_maps_cameras_and_parameters(export, imported):
    model = export["model"]
    report = check_dataset(imported, fingerprint=str(model.fingerprint))
    assert report.ok and report.num_frames == 6, report.summary()
    index = load_index(imported)
    (subject,) = index.subjects
    assert (subject.id, subject.split, index.image_size) == ("Subject_306.EMO-1", "train", SIZE)
    (entry,) = subject.sequences
    assert entry.cameras == tuple(c[0] for c in CAMERAS) and entry.num_frames == 3
    seq = read_sequence(imported, index, subject.id, entry)

    for c, (_, yaw, _, _) in enumerate(CAMERAS):
        c2w = opengl_c2w(camera_eye(yaw), TARGET)
        np.testing.assert_allclose(seq.viewmats[c], look_at(camera_eye(yaw), TARGET), atol=1e-6)
        back = np.linalg.inv(seq.viewmats[c].astype(np.float64)) @ np.diag([1.0, -1, -1, 1])
        np.testing.assert_allclose(back, c2w, atol=1e-6)
        np.testing.assert_allclose(opengl_c2w_to_opencv_w2c(c2w), seq.viewmats[c], atol=1e-6)

    span = []
    for f, p in enumerate(export["params"]):
        np.testing.assert_array_equal(
            seq.pose[f],
            np.concatenate(
                [
                    p["rotation"],
                    p["neck_pose"],
                    p["jaw_pose"],
                    p["eyes_pose"][:, :3],
                    p["eyes_pose"][:, 3:],
                ]
            ).astype(np.float32),
        )
        np.testing.assert_array_equal(seq.translation[f], p["translation"][0].astype(np.float32))
        np.testing.assert_array_equal(seq.expression[f], p["expr"][0].astype(np.float32))
        vertices, _ = FORWARD(
            model, seq.shape, seq.expression[f], seq.pose[f], seq.translation[f], seq.static_offset
        )
        for c in range(len(CAMERAS)):
            cam = np.asarray(vertices) @ seq.viewmats[c, :3, :3].T + seq.viewmats[c, :3, 3]
            assert cam[:, 2].min() > 0.8
            pixels = (
                cam[:, :2] / cam[:, 2:] @ seq.intrinsics[c, :2, :2].T + seq.intrinsics[c, :2, 2]
            )
            centre = 0.5 * (pixels.min(0) + pixels.max(0))
            assert np.abs(centre - SIZE / 2).max() < 0.05 * SIZE, (f, c, centre)
            span.append(np.ptp(pixels, 0).max() / SIZE)
    np.testing.assert_array_equal(seq.shape, export["params"][0]["shape"].astype(np.float32))
    np.testing.assert_array_equal(
        seq.static_offset,
        export["params"][0]["static_offset"][0, : model.num_vertices].astype(np.float32),
    )
    assert abs(max(span) - HEAD_FRACTION) < 0.02 and min(span) > 0.6, span


def test_masks_and_uv_maps_line_up_with_the_new_cameras(export, imported):
    index = load_index(imported)
    (subject,) = index.subjects
    (entry,) = subject.sequences
    seq = read_sequence(imported, index, subject.id, entry)
    model = export["model"]
    front = 1 + (RINGS // 2 - 1) * SEGMENTS + SEGMENTS // 2
    for f in range(3):
        vertices, _ = FORWARD(
            model, seq.shape, seq.expression[f], seq.pose[f], seq.translation[f], seq.static_offset
        )
        for c, camera in enumerate(entry.cameras):

            def path(kind, ext, camera=camera, f=f):
                return frame_path(imported, subject.id, entry.id, camera, f, kind, ext)

            mask = read_mask(path("mask", "png"), SIZE) > 127
            uv, valid = read_uv(path("uv", "npz"), SIZE)
            iou = (mask & valid).sum() / (mask | valid).sum()
            shift = np.argwhere(mask).mean(0) - np.argwhere(valid).mean(0)
            assert iou > 0.95 and np.abs(shift).max() < 0.25, (f, c, iou, shift)
            cam = np.asarray(vertices[front]) @ seq.viewmats[c, :3, :3].T + seq.viewmats[c, :3, 3]
            x, y = cam[:2] / cam[2] * np.diag(seq.intrinsics[c])[:2] + seq.intrinsics[c, :2, 2]
            assert valid[int(y), int(x)]
            np.testing.assert_allclose(uv[int(y), int(x)], [0.5, 0.5], atol=0.06)


def test_second_import_skips_and_more_subjects_are_added(export, imported, capsys):
    image = frame_path(imported, "Subject_306.EMO-1", "vhap", CAMERAS[0][0], 1, "image", "png")
    before = image.stat().st_mtime_ns
    assert import_vhap(export, imported, "--teeth", "drop") == 0
    assert "already imported" in capsys.readouterr().out
    assert image.stat().st_mtime_ns == before

    assert import_vhap(export, imported, "--teeth", "drop", "--size", "48") == 2
    assert "image_size is 32, this import's 48" in capsys.readouterr().err

    options = ("--teeth", "drop", "--subject", "other", "--split", "hash:0/0/100")
    assert import_vhap(export, imported, *options) == 0
    index = load_index(imported)
    assert [(s.id, s.split) for s in index.subjects] == [
        ("Subject_306.EMO-1", "train"),
        ("other", "test"),
    ]
    assert check_dataset(imported, decode_frames=False).ok
    assert image.stat().st_mtime_ns == before

    interrupted = imported / "other" / "vhap"
    (interrupted / "sequence.npz").unlink()
    (interrupted / CAMERAS[1][0] / "uv" / "000002.npz").unlink()
    assert import_vhap(export, imported, *options) == 0
    assert "2 cameras x 3 frames" in capsys.readouterr().out
    assert check_dataset(imported).ok


def test_coefficient_counts_are_fitted_only_when_asked(tmp_path):
    values = np.arange(4.0)
    with pytest.raises(
        VhapExportError,
        match=r"x.npz: 'expr' has 4 coefficients, the head "
        r"model has 6; pass --coefficients pad",
    ):
        fit_coefficients(values, 6, "strict", "expr", tmp_path / "x.npz")
    np.testing.assert_array_equal(
        fit_coefficients(values, 6, "pad", "expr", "x"), [0, 1, 2, 3, 0, 0]
    )
    with pytest.raises(VhapExportError, match="--coefficients fit"):
        fit_coefficients(values, 3, "pad", "expr", "x")
    np.testing.assert_array_equal(fit_coefficients(values, 3, "fit", "expr", "x"), [0, 1, 2])


def _moved_camera(src):
    data = json.loads((src / "transforms.json").read_text())
    data["frames"][0]["transform_matrix"][0][3] += 0.01
    (src / "transforms.json").write_text(json.dumps(data))
    return "pose, intrinsics or size differ"


def _escaping_path(src):
    data = json.loads((src / "transforms.json").read_text())
    data["frames"][2]["file_path"] = "../../secret.png"
    (src / "transforms.json").write_text(json.dumps(data))
    return "transforms.json: frames[2]: 'file_path' '../../secret.png' leaves the export folder"


def _missing_mask(src):
    (src / "fg_masks" / "00001_01.png").unlink()
    return "fg_masks/00001_01.png: listed in"


def _dynamic_offset(src):
    path = src / "flame_param" / "00002.npz"
    np.savez(path, **dict(np.load(path)), dynamic_offset=np.ones((1, 5, 3)))
    return "00002.npz: holds a non-zero 'dynamic_offset'"


@pytest.mark.parametrize("corrupt", [_moved_camera, _escaping_path, _missing_mask, _dynamic_offset])
def test_bad_exports_are_refused_naming_the_file(export, tmp_path, corrupt):
    src = tmp_path / "src"
    shutil.copytree(export["src"], src)
    text = corrupt(src)
    model = export["model"]
    head = HeadModelInfo("x", model.num_vertices, model.num_shape, model.num_expression)
    with pytest.raises((VhapExportError, FileNotFoundError), match=re.escape(text)):
        sequence_parameters(read_export(src), head, teeth="drop")
