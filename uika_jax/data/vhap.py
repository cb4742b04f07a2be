"""Reading a VHAP export (NeRF-style) and converting it to the dataset format's conventions.

VHAP (github.com/ShenhanQian/VHAP) tracks FLAME on a video or a multi-view
capture and exports, in one folder:

    transforms.json            frames, cameras, paths (transforms_{train,val,test}.json
                               split the same frames by timestep and camera)
    images/00000_00.png        frame of timestep 0, camera 0
    fg_masks/00000_00.png      its foreground mask
    flame_param/00000.npz      the FLAME parameters of timestep 0

Every frame entry holds `timestep_index`, `camera_index` (optionally `camera_id`),
`transform_matrix` (a 4x4 camera-to-world matrix in the OpenGL convention: x
right, y up, the camera looking along -z), intrinsics `fl_x`, `fl_y`, `cx`, `cy`,
`w`, `h` (per frame or at the top level) and the relative paths `file_path`,
`fg_mask_path`, `flame_param_path`. A parameter file holds `rotation` (3),
`neck_pose` (3), `jaw_pose` (3), `eyes_pose` (6: left eye, right eye), `translation`
(3), `shape` (S), `expr` (E), each possibly with a leading axis of 1, and an
optional `static_offset` (V, 3). Monocular exports place the camera 1 m in front
of the origin and move the head by `rotation` and `translation`.

FLAME 2023 as VHAP uses it appends 120 teeth vertices to the model's 5023
(`TEETH_VERTICES`), so a `static_offset` of 5143 rows belongs to a model with
teeth; `fit_static_offset` drops those rows only when asked, after checking the
count. Shape and expression counts that differ from the head model's are refused
unless the caller says how to fit them (`COEFFICIENT_POLICIES`). Everything read
here is untrusted: paths stay inside the export folder, arrays are size-checked
before they are read, and every error names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from uika_jax.data.format import DatasetFormatError, HeadModelInfo, check_id, read_json
from uika_jax.data.reader import camera_problem
from uika_jax.safe_files import read_npz

TEETH_VERTICES = 120
"""Vertices VHAP's FLAME appends for the teeth (`add_teeth`): 5023 + 120 = 5143."""

TRANSFORMS_FILE = "transforms.json"
SPLIT_TRANSFORMS = ("transforms_train.json", "transforms_val.json", "transforms_test.json")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
COUNT_KEYS = ("w", "h", "timestep_index", "camera_index")
PATH_KEYS = {"image": "file_path", "mask": "fg_mask_path", "flame_param": "flame_param_path"}
POSE_KEYS = {"rotation": 3, "neck_pose": 3, "jaw_pose": 3, "eyes_pose": 6, "translation": 3}
COEFFICIENT_POLICIES = ("strict", "pad", "fit")
"""How shape / expression counts other than the model's are handled: refused, zero-padded
(exact: VHAP's missing components are zero), or padded and truncated (lossy)."""
TEETH_POLICIES = ("refuse", "drop")
MAX_PARAM_ELEMENTS = 1 << 22
"""Largest array read from a parameter file (elements)."""
CAMERA_TOLERANCE = 1e-5
"""Largest difference between two frames' matrices or intrinsics of one camera."""

OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
"""Flips the camera frame's y and z axes: OpenGL (y up, looking along -z) <-> OpenCV."""


class VhapExportError(ValueError):
    """A VHAP export that cannot be imported; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class VhapCamera:
    """One camera of an export, in the dataset format's convention.

    Attributes:
      index: VHAP's `camera_index`.
      id: the camera id for the dataset (VHAP's `camera_id` when usable, else camNN).
      viewmat: (4, 4) OpenCV world-to-camera.
      K: (3, 3) intrinsics in source pixels.
      width: source image width.
      height: source image height.
    """

    index: int
    id: str
    viewmat: np.ndarray
    K: np.ndarray
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class VhapExport:
    """A parsed export: cameras by `camera_index`, timesteps sorted, every frame's files.

    Attributes:
      root: the export folder.
      transforms: the transforms file(s) read.
      cameras: sorted by index.
      timesteps: sorted `timestep_index` values; frame f of the dataset is timesteps[f].
      files: (timestep, camera index) -> {"image": path, "mask": path}.
      flame_params: timestep -> its parameter file.
    """

    root: Path
    transforms: tuple[str, ...]
    cameras: tuple[VhapCamera, ...]
    timesteps: tuple[int, ...]
    files: Mapping[tuple[int, int], Mapping[str, Path]]
    flame_params: Mapping[int, Path]


def opengl_c2w_to_opencv_w2c(c2w: np.ndarray) -> np.ndarray:
    """Converts an OpenGL camera-to-world 4x4 to an OpenCV world-to-camera 4x4 (float64)."""
    return np.linalg.inv(np.asarray(c2w, np.float64) @ OPENGL_TO_OPENCV)


def _number(value: object, key: str, origin: str, *, integer: bool = False) -> float:
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            number = float(value)
    if not math.isfinite(number) or (integer and (number != int(number) or number < 0)):
        kind = "a non-negative integer" if integer else "a finite number"
        raise VhapExportError(f"{origin}: '{key}' must be {kind}, got {value!r:.80}")
    return number


def _relative_file(root: Path, value: object, key: str, origin: str) -> Path:
    """A path from the export, which must stay inside the export folder."""
    if not isinstance(value, str) or not value:
        raise VhapExportError(f"{origin}: '{key}' must be a relative path, got {value!r:.80}")
    relative = PurePosixPath(value)
    if relative.is_absolute() or ".." in relative.parts:
        raise VhapExportError(
            f"{origin}: '{key}' {value!r} leaves the export folder (a combine_nerf_datasets "
            "export? import each sequence's own export, with --sequence)"
        )
    return root.joinpath(*relative.parts)


def _c2w(value: object, origin: str) -> np.ndarray:
    matrix = np.asarray(value if isinstance(value, list) else [], dtype=object)
    if matrix.shape not in ((4, 4), (3, 4)):
        raise VhapExportError(f"{origin}: 'transform_matrix' must be 4x4, got {value!r:.80}")
    matrix = np.array([[_number(x, "transform_matrix", origin) for x in row] for row in matrix])
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    problem = camera_problem(matrix, np.eye(3))
    if problem:
        raise VhapExportError(f"{origin}: 'transform_matrix' is not a camera-to-world: {problem}")
    return matrix


def _read_transforms(path: Path) -> dict:
    data = read_json(path, VhapExportError)
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise VhapExportError(f"{path}: expected an object with a 'frames' list")
    return data


@dataclasses.dataclass(frozen=True)
class _Frame:
    """One parsed frame entry."""

    timestep: int
    camera: int
    camera_id: str
    c2w: np.ndarray
    K: np.ndarray
    size: tuple[int, int]
    files: dict[str, Path]
    flame_param: Path

    def same_camera(self, other: _Frame) -> bool:
        return (
            self.size == other.size
            and np.allclose(self.c2w, other.c2w, atol=CAMERA_TOLERANCE, rtol=0)
            and np.allclose(self.K, other.K, atol=CAMERA_TOLERANCE, rtol=CAMERA_TOLERANCE)
        )


def _parse_frame(frame: object, top: dict, root: Path, origin: str) -> _Frame:
    """Validates one entry of `frames` (intrinsics may come from the top level)."""
    if not isinstance(frame, dict):
        raise VhapExportError(f"{origin}: not an object")
    required = ("timestep_index", "camera_index", "transform_matrix", *PATH_KEYS.values())
    missing = [k for k in required if k not in frame]
    missing += [k for k in INTRINSIC_KEYS if k not in frame and k not in top]
    if missing:
        hint = " (export with --flame-mode param, the default)" * ("flame_param_path" in missing)
        raise VhapExportError(f"{origin}: missing {', '.join(missing)}{hint}")
    value = {k: _number(frame.get(k, top.get(k)), k, origin) for k in INTRINSIC_KEYS}
    count = {k: int(_number(frame.get(k, top.get(k)), k, origin, integer=True)) for k in COUNT_KEYS}
    size = (count["w"], count["h"])
    if min(size) < 1 or min(value["fl_x"], value["fl_y"]) <= 0:
        raise VhapExportError(f"{origin}: image size and focal lengths must be positive")
    paths = {kind: _relative_file(root, frame[key], key, origin) for kind, key in PATH_KEYS.items()}
    return _Frame(
        timestep=count["timestep_index"],
        camera=count["camera_index"],
        camera_id=str(frame.get("camera_id", "")),
        c2w=_c2w(frame["transform_matrix"], origin),
        K=np.array(
            [[value["fl_x"], 0.0, value["cx"]], [0.0, value["fl_y"], value["cy"]], [0.0, 0.0, 1.0]]
        ),
        size=size,
        files={"image": paths["image"], "mask": paths["mask"]},
        flame_param=paths["flame_param"],
    )


def _is_id(value: str) -> bool:
    with contextlib.suppress(DatasetFormatError):
        return check_id(value, "camera id", "") == value
    return False


def read_export(src: str | Path) -> VhapExport:
    """Reads an export's `transforms.json` (else its split files together) and checks it.

    Every camera must keep one pose, intrinsics and image size over the timesteps
    (the format stores one camera per sequence camera), every timestep must have
    every camera, and every listed file must exist.

    Args:
      src: the export folder.

    Raises:
      FileNotFoundError: if the folder, its transforms or a listed file is missing.
      VhapExportError: naming the file and the entry at fault.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: VHAP export folder not found")
    names = [TRANSFORMS_FILE] if (root / TRANSFORMS_FILE).is_file() else []
    names = names or [n for n in SPLIT_TRANSFORMS if (root / n).is_file()]
    if not names:
        raise FileNotFoundError(f"{root}: no {TRANSFORMS_FILE} (nor {', '.join(SPLIT_TRANSFORMS)})")
    cameras: dict[int, tuple[_Frame, str]] = {}
    files: dict[tuple[int, int], dict[str, Path]] = {}
    flame_params: dict[int, Path] = {}
    for name in names:
        data = _read_transforms(root / name)
        for i, entry in enumerate(data["frames"]):
            origin = f"{root / name}: frames[{i}]"
            frame = _parse_frame(entry, data, root, origin)
            first, first_origin = cameras.setdefault(frame.camera, (frame, origin))
            if not frame.same_camera(first):
                raise VhapExportError(
                    f"{origin}: camera {frame.camera}'s pose, intrinsics or size differ from "
                    f"{first_origin}; the format stores one fixed camera per sequence camera"
                )
            if files.setdefault((frame.timestep, frame.camera), frame.files) != frame.files:
                raise VhapExportError(f"{origin}: timestep {frame.timestep} camera listed twice")
            param = flame_params.setdefault(frame.timestep, frame.flame_param)
            if param != frame.flame_param:
                raise VhapExportError(f"{origin}: a second parameter file for the timestep")
    if not files:
        raise VhapExportError(f"{root / names[0]}: no frames")
    timesteps = tuple(sorted(flame_params))
    absent = [(t, c) for t in timesteps for c in sorted(cameras) if (t, c) not in files]
    if absent:
        raise VhapExportError(
            f"{root}: {len(absent)} (timestep, camera) pairs have no frame, e.g. {absent[:5]}; "
            "the format needs every camera at every timestep"
        )
    for path in [p for f in files.values() for p in f.values()] + list(flame_params.values()):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {root / names[0]} but missing")
    ids = [cameras[c][0].camera_id for c in sorted(cameras)]
    if len(set(ids)) != len(ids) or not all(_is_id(i) for i in ids):
        ids = [f"cam{c:02d}" for c in sorted(cameras)]
    return VhapExport(
        root=root,
        transforms=tuple(names),
        cameras=tuple(
            VhapCamera(
                index=c,
                id=camera_id,
                viewmat=opengl_c2w_to_opencv_w2c(cameras[c][0].c2w),
                K=cameras[c][0].K,
                width=cameras[c][0].size[0],
                height=cameras[c][0].size[1],
            )
            for c, camera_id in zip(sorted(cameras), ids, strict=True)
        ),
        timesteps=timesteps,
        files=files,
        flame_params=flame_params,
    )


# --------------------------------------------------------------------------- parameters


def _check_param_shape(shape: tuple[int, ...]) -> None:
    if math.prod(shape) > MAX_PARAM_ELEMENTS:
        raise ValueError(f"shape {shape} exceeds {MAX_PARAM_ELEMENTS:,} elements")


def _squeezed(value: np.ndarray, ndim: int, key: str, path: Path) -> np.ndarray:
    """Drops leading axes of length 1 (VHAP stores (1, n) per timestep) down to `ndim`."""
    while value.ndim > ndim and value.shape[0] == 1:
        value = value[0]
    if value.ndim != ndim:
        raise VhapExportError(f"{path}: '{key}' has shape {value.shape}, expected {ndim} axes")
    if value.dtype.kind not in "fiu":
        raise VhapExportError(f"{path}: '{key}' has dtype {value.dtype}, expected float")
    value = value.astype(np.float64)
    if not np.isfinite(value).all():
        where = np.argwhere(~np.isfinite(value))[0].tolist()
        raise VhapExportError(f"{path}: '{key}' is not finite at {where}")
    return value


def read_flame_param(path: Path) -> dict[str, np.ndarray]:
    """Reads one timestep's parameter file; returns float64 arrays without the leading axis.

    Keys: the pose keys (`POSE_KEYS`, flat), `left_eye` and `right_eye` (the two
    halves of `eyes_pose`), `shape` (S,), `expr` (E,) and, if present,
    `static_offset` (V, 3).

    Raises:
      VhapExportError: naming the file, if it is unreadable, lacks a key, has a
        wrong shape or a non-finite value, or holds a non-zero `dynamic_offset`
        (per-frame offsets, which the format cannot store).
    """
    wanted = (*POSE_KEYS, "shape", "expr", "static_offset", "dynamic_offset")
    raw, _ = read_npz(
        path,
        wanted,
        check_shape=_check_param_shape,
        max_total_bytes=16 * MAX_PARAM_ELEMENTS,
        error=VhapExportError,
    )
    missing = [k for k in (*POSE_KEYS, "shape", "expr") if k not in raw]
    if missing:
        raise VhapExportError(f"{path}: missing {', '.join(missing)}")
    out = {}
    for key, size in POSE_KEYS.items():
        out[key] = _squeezed(raw[key], 1, key, path)
        if out[key].shape != (size,):
            raise VhapExportError(f"{path}: '{key}' has {out[key].size} values, expected {size}")
    out["left_eye"], out["right_eye"] = out["eyes_pose"][:3], out["eyes_pose"][3:]
    for key in ("shape", "expr"):
        out[key] = _squeezed(raw[key], 1, key, path)
    if "static_offset" in raw:
        out["static_offset"] = _squeezed(raw["static_offset"], 2, "static_offset", path)
        if out["static_offset"].shape[1] != 3:
            raise VhapExportError(
                f"{path}: 'static_offset' has shape {out['static_offset'].shape}, expected (V, 3)"
            )
    if "dynamic_offset" in raw and np.any(raw["dynamic_offset"]):
        raise VhapExportError(
            f"{path}: holds a non-zero 'dynamic_offset' (per-frame vertex offsets), which the "
            "dataset format cannot store; track without dynamic offsets"
        )
    return out


def fit_coefficients(
    values: np.ndarray, count: int, policy: str, what: str, origin: Path
) -> np.ndarray:
    """Fits coefficients (..., n) to the head model's count per `policy` (COEFFICIENT_POLICIES).

    Raises:
      VhapExportError: naming the file and the option, if the counts differ and
        the policy does not allow it.
    """
    n = values.shape[-1]
    if n == count:
        return values
    if n < count and policy in ("pad", "fit"):
        return np.concatenate([values, np.zeros((*values.shape[:-1], count - n))], axis=-1)
    if n > count and policy == "fit":
        return values[..., :count]
    if n < count:
        option = "--coefficients pad (zero-pads: exact)"
    else:
        option = f"--coefficients fit (drops the last {n - count}: lossy)"
    raise VhapExportError(
        f"{origin}: '{what}' has {n} coefficients, the head model has {count}; pass {option} "
        "or use the head model VHAP tracked with"
    )


def fit_static_offset(offset: np.ndarray, num_vertices: int, teeth: str, origin: Path):
    """Matches a static offset (R, 3) to a head model of `num_vertices` vertices.

    R = num_vertices is used as is; R = num_vertices + TEETH_VERTICES (VHAP's FLAME
    with teeth) keeps the first num_vertices rows when `teeth` is "drop".

    Raises:
      VhapExportError: naming the file, for any other count, or teeth rows
        without `teeth="drop"`.
    """
    rows = offset.shape[0]
    if rows == num_vertices:
        return offset
    if rows == num_vertices + TEETH_VERTICES:
        if teeth == "drop":
            return offset[:num_vertices]
        raise VhapExportError(
            f"{origin}: 'static_offset' has {rows} rows = the head model's {num_vertices} "
            f"vertices + {TEETH_VERTICES} teeth vertices (VHAP's add_teeth); pass --teeth drop "
            f"to drop the last {TEETH_VERTICES} rows"
        )
    raise VhapExportError(
        f"{origin}: 'static_offset' has {rows} rows, the head model has {num_vertices} vertices "
        f"(or {num_vertices + TEETH_VERTICES} with VHAP's teeth): another head model?"
    )


def sequence_parameters(
    export: VhapExport, head: HeadModelInfo, *, coefficients: str = "strict", teeth: str = "refuse"
) -> dict[str, np.ndarray]:
    """Reads every timestep's parameters and maps them to the format's arrays (float32).

    Pose rows: global = rotation, neck, jaw, left eye = eyes_pose[:3], right eye =
    eyes_pose[3:]. Shape and static offset must be the same at every timestep.

    Args:
      export: the parsed export.
      head: the head model's sizes.
      coefficients: one of COEFFICIENT_POLICIES.
      teeth: one of TEETH_POLICIES.

    Returns:
      shape (S,), expression (F, E), pose (F, 5, 3), translation (F, 3) and,
      when the export has one, static_offset (V, 3).

    Raises:
      VhapExportError: naming the file at fault.
    """
    if coefficients not in COEFFICIENT_POLICIES or teeth not in TEETH_POLICIES:
        raise ValueError(f"coefficients in {COEFFICIENT_POLICIES}, teeth in {TEETH_POLICIES}")
    frames = [
        (export.flame_params[t], read_flame_param(export.flame_params[t])) for t in export.timesteps
    ]
    first_path, first = frames[0]
    for path, params in frames[1:]:
        for key in ("shape", "static_offset"):
            same = key in params and np.array_equal(params[key], first[key])
            if (key in params or key in first) and not same:
                raise VhapExportError(f"{path}: '{key}' differs from {first_path}'s")
    expression = [
        fit_coefficients(p["expr"], head.num_expression, coefficients, "expr", path)
        for path, p in frames
    ]
    pose_rows = ("rotation", "neck_pose", "jaw_pose", "left_eye", "right_eye")  # POSE_ROWS
    out = {
        "shape": fit_coefficients(
            first["shape"], head.num_shape, coefficients, "shape", first_path
        ),
        "expression": np.stack(expression),
        "pose": np.stack([[p[row] for row in pose_rows] for _, p in frames]),
        "translation": np.stack([p["translation"] for _, p in frames]),
    }
    if "static_offset" in first:
        out["static_offset"] = fit_static_offset(
            first["static_offset"], head.num_vertices, teeth, first_path
        )
    return {k: v.astype(np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------- frames and framing


def read_source_frame(path: Path, camera: VhapCamera, *, is_mask: bool) -> np.ndarray:
    """Reads a source image (H, W, 3) or mask (H, W) as uint8, checking its size against the camera.

    Images may be grey, palette, RGB or RGBA (the alpha channel is dropped: the
    mask is the export's foreground mask); masks grey, 1-bit, palette or RGB.

    Raises:
      VhapExportError: naming the file, if it is unreadable, of another size or mode.
    """
    what, modes = (
        ("mask", ("L", "1", "P", "RGB")) if is_mask else ("image", ("L", "P", "RGB", "RGBA"))
    )
    try:
        with Image.open(path) as image:
            if image.size != (camera.width, camera.height):
                raise VhapExportError(
                    f"{path}: {what} is {image.size[0]}x{image.size[1]}, camera {camera.index} "
                    f"says {camera.width}x{camera.height}"
                )
            if image.mode not in modes:
                raise VhapExportError(f"{path}: {what} has mode {image.mode}, expected {modes}")
            return np.asarray(image.convert("L" if is_mask else "RGB"))
    except VhapExportError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise VhapExportError(f"{path}: unreadable {what}: {e}") from None
