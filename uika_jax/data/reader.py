"""Reading a dataset's files (the format of `uika_jax.data.format`), each validated on read.

`read_sequence` reads and checks one `sequence.npz` (shapes against the index,
finite values, cameras whose rotation is a rotation, positive focal lengths);
`read_image`, `read_mask` and `read_uv` read one frame's files (or their bytes,
packed in a shard record), checking the declared image size before decoding.
Every error is a `DatasetFormatError` naming the file and what is wrong.
`uika_jax.data.checks` runs them over a whole dataset up front; the pipeline
reads through them.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from uika_jax.data.format import (
    POSE_ROWS,
    SEQUENCE_FILE,
    DatasetFormatError,
    DatasetIndex,
    SequenceEntry,
    decode_uv,
    frame_path,
    sequence_dir,
)
from uika_jax.safe_files import read_npz

MAX_SEQUENCE_ELEMENTS = 1 << 26
"""Largest array read from a `sequence.npz` (elements)."""

ROTATION_TOLERANCE = 1e-3
"""Largest |R R^T - I| entry and |det R - 1| accepted in a world-to-camera matrix."""

SEQUENCE_KEYS = ("shape", "expression", "pose", "translation", "viewmats", "intrinsics")
OPTIONAL_SEQUENCE_KEYS = ("static_offset",)


@dataclasses.dataclass(frozen=True)
class SequenceParams:
    """One sequence's FLAME parameters and cameras (shapes in `uika_jax.data.format`)."""

    shape: np.ndarray
    expression: np.ndarray
    pose: np.ndarray
    translation: np.ndarray
    viewmats: np.ndarray
    intrinsics: np.ndarray
    static_offset: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by `sequence.npz` name (static_offset only when present)."""
        out = {k: getattr(self, k) for k in SEQUENCE_KEYS}
        if self.static_offset is not None:
            out["static_offset"] = self.static_offset
        return out


def check_sequence_shape(shape: tuple[int, ...]) -> None:
    """Refuses a sequence array declaring more than `MAX_SEQUENCE_ELEMENTS` (before reading)."""
    if math.prod(shape) > MAX_SEQUENCE_ELEMENTS:
        raise ValueError(f"shape {shape} exceeds {MAX_SEQUENCE_ELEMENTS:,} elements")


def camera_problem(viewmat: np.ndarray, K: np.ndarray) -> str | None:
    """Why a camera is unusable (OpenCV world-to-camera 4x4 and intrinsics 3x3), or None."""
    if not (np.isfinite(viewmat).all() and np.isfinite(K).all()):
        return "not finite"
    if not np.allclose(viewmat[3], [0, 0, 0, 1], atol=1e-6):
        return f"viewmat's last row is {viewmat[3].tolist()}, expected [0, 0, 0, 1]"
    r = viewmat[:3, :3].astype(np.float64)
    orth = np.abs(r @ r.T - np.eye(3)).max()
    det = np.linalg.det(r)
    if orth > ROTATION_TOLERANCE or abs(det - 1.0) > ROTATION_TOLERANCE:
        return f"viewmat's 3x3 block is not a rotation (|R R^T - I| = {orth:.2e}, det = {det:.4f})"
    if not (K[0, 0] > 0 and K[1, 1] > 0) or not np.allclose(K[2], [0, 0, 1], atol=1e-6):
        return f"intrinsics {K.tolist()} are not a pinhole camera with positive focal lengths"
    return None


def read_sequence(root: str | Path, index: DatasetIndex, subject: str, entry: SequenceEntry):
    """Reads and validates one sequence's `sequence.npz`.

    Args:
      root: the dataset folder.
      index: its index (the expected sizes).
      subject: the subject id.
      entry: the sequence's index entry.

    Returns:
      The `SequenceParams` (float32).

    Raises:
      FileNotFoundError: if the file is missing.
      DatasetFormatError: naming the file and the array at fault.
    """
    path = sequence_dir(root, subject, entry.id) / SEQUENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the sequence was not finished)")
    raw, _ = read_npz(
        path,
        (*SEQUENCE_KEYS, *OPTIONAL_SEQUENCE_KEYS),
        check_shape=check_sequence_shape,
        max_total_bytes=4 * MAX_SEQUENCE_ELEMENTS,
        error=DatasetFormatError,
    )
    head = index.head_model
    f, c = entry.num_frames, len(entry.cameras)
    expected = {
        "shape": (head.num_shape,),
        "expression": (f, head.num_expression),
        "pose": (f, len(POSE_ROWS), 3),
        "translation": (f, 3),
        "viewmats": (c, 4, 4),
        "intrinsics": (c, 3, 3),
        "static_offset": (head.num_vertices, 3),
    }
    arrays = {}
    for key, shape in expected.items():
        if key not in raw:
            if key in OPTIONAL_SEQUENCE_KEYS:
                continue
            raise DatasetFormatError(f"{path}: missing array '{key}'")
        value = raw[key]
        if value.shape != shape:
            raise DatasetFormatError(
                f"{path}: '{key}' has shape {value.shape}, expected {shape} "
                f"({f} frames, {c} cameras, head model {head.fingerprint})"
            )
        if value.dtype.kind not in "fiu":
            raise DatasetFormatError(f"{path}: '{key}' has dtype {value.dtype}, expected float")
        value = value.astype(np.float32)
        bad = ~np.isfinite(value)
        if bad.any():
            where = np.argwhere(bad)[0].tolist()
            raise DatasetFormatError(f"{path}: '{key}' is not finite at {where}")
        arrays[key] = value
    for i, camera in enumerate(entry.cameras):
        problem = camera_problem(arrays["viewmats"][i], arrays["intrinsics"][i])
        if problem:
            raise DatasetFormatError(f"{path}: camera {camera!r}: {problem}")
    return SequenceParams(**arrays)


FileContents = Path | bytes
"""A frame file: its path, or its bytes as packed in a shard record."""


def _open_image(
    source: FileContents, size: int, modes: tuple[str, ...], what: str, origin: str | None
) -> np.ndarray:
    """Opens an image, checks its declared size and mode before decoding, decodes it."""
    path = origin or source
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"{path}: missing {what}")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.size != (size, size):
                raise DatasetFormatError(
                    f"{path}: {what} is {image.size[0]}x{image.size[1]}, expected {size}x{size}"
                )
            if image.mode not in modes:
                raise DatasetFormatError(f"{path}: {what} has mode {image.mode}, expected {modes}")
            return np.asarray(image.convert(modes[0]))
    except DatasetFormatError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetFormatError(f"{path}: unreadable {what}: {e}") from None


def read_image(source: FileContents, size: int, origin: str | None = None) -> np.ndarray:
    """One frame (a file, or its bytes named `origin` in errors): (size, size, 3) uint8 RGB."""
    return _open_image(source, size, ("RGB",), "image", origin)


def read_mask(source: FileContents, size: int, origin: str | None = None) -> np.ndarray:
    """One foreground mask (a file, or its bytes named `origin`): (size, size) uint8 alpha."""
    return _open_image(source, size, ("L",), "mask", origin)


def read_uv(
    source: FileContents, size: int, origin: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One UV map (a file, or its bytes named `origin`): (image UV, validity).

    The image UV is (size, size, 2) float32, the validity (size, size) bool.
    """
    path = origin or source
    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"{path}: missing UV map")
    raw, _ = read_npz(
        source,
        ("uv",),
        check_shape=check_sequence_shape,
        max_total_bytes=4 * size * size + 1024,
        error=DatasetFormatError,
        origin=origin,
    )
    encoded = raw.get("uv")
    if encoded is None or encoded.shape != (size, size, 2) or encoded.dtype != np.uint16:
        got = "none" if encoded is None else f"{encoded.shape} {encoded.dtype}"
        raise DatasetFormatError(f"{path}: 'uv' is {got}, expected ({size}, {size}, 2) uint16")
    return decode_uv(encoded)


@dataclasses.dataclass(frozen=True)
class FrameRef:
    """One frame of one camera of one sequence."""

    subject: str
    sequence: str
    camera: str
    frame: int

    def path(self, root: str | Path, kind: str, image_format: str) -> Path:
        """Its image, mask or UV file."""
        ext = {"image": image_format, "mask": "png", "uv": "npz"}[kind]
        return frame_path(root, self.subject, self.sequence, self.camera, self.frame, kind, ext)


def read_frame_files(root: str | Path, index: DatasetIndex, ref: FrameRef) -> dict[str, np.ndarray]:
    """A frame's image, mask and (if the dataset has them) UV map and its validity."""
    size = index.image_size
    out = {
        "image": read_image(ref.path(root, "image", index.image_format), size),
        "mask": read_mask(ref.path(root, "mask", index.image_format), size),
    }
    if index.has_uv:
        out["uv"], out["uv_valid"] = read_uv(ref.path(root, "uv", index.image_format), size)
    return out
