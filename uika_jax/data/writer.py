"""Writing datasets in the format of `uika_jax.data.format`: atomically and resumably.

Every file is written under a temporary name and renamed (`atomic_write`; frames
without a per-file fsync, then one `os.sync()` before the sequence's marker), and a
sequence's `sequence.npz` is written after all its frames: a generator or
importer interrupted half-way leaves finished sequences intact and unfinished
ones without `sequence.npz`, which `sequence_complete` tells apart, so a rerun
redoes only those.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from uika_jax.data.format import (
    SEQUENCE_FILE,
    DatasetFormatError,
    DatasetIndex,
    SequenceEntry,
    encode_uv,
    frame_path,
    sequence_dir,
)
from uika_jax.data.reader import SequenceParams, read_sequence
from uika_jax.safe_files import atomic_write, write_npz

JPEG_QUALITY = 95


def _write_image(path: Path, pixels: np.ndarray, image_format: str) -> None:
    with atomic_write(path, durable=False) as f:
        if image_format == "jpg":
            Image.fromarray(pixels).save(f, format="JPEG", quality=JPEG_QUALITY)
        else:
            Image.fromarray(pixels).save(f, format="PNG", compress_level=1)


def write_frame(
    root: str | Path,
    index: DatasetIndex,
    subject: str,
    sequence: str,
    camera: str,
    frame: int,
    *,
    image: np.ndarray,
    mask: np.ndarray,
    image_uv: np.ndarray | None = None,
    uv_valid: np.ndarray | None = None,
) -> None:
    """Writes one frame's image, mask and (when the dataset has them) UV map.

    Args:
      root: the dataset folder.
      index: the dataset's index (image size and format, UV presence).
      subject: subject id.
      sequence: sequence id.
      camera: camera id.
      frame: frame number.
      image: (S, S, 3) uint8 RGB.
      mask: (S, S) uint8 alpha.
      image_uv: (S, S, 2) image UV in [0, 1] (needed when `index.has_uv`).
      uv_valid: (S, S) bool, where `image_uv` is defined.

    Raises:
      ValueError: on a wrong shape or dtype, or a missing UV map.
    """
    size = index.image_size
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"image must be ({size}, {size}, 3) uint8, got {image.shape} {image.dtype}"
        )
    if mask.shape != (size, size) or mask.dtype != np.uint8:
        raise ValueError(f"mask must be ({size}, {size}) uint8, got {mask.shape} {mask.dtype}")

    def path(kind: str, ext: str) -> Path:
        out = frame_path(root, subject, sequence, camera, frame, kind, ext)
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    _write_image(path("image", index.image_format), image, index.image_format)
    _write_image(path("mask", "png"), mask, "png")
    if index.has_uv:
        if image_uv is None or uv_valid is None:
            raise ValueError("the dataset has UV maps: pass image_uv and uv_valid")
        if image_uv.shape != (size, size, 2) or uv_valid.shape != (size, size):
            raise ValueError(f"image_uv must be ({size}, {size}, 2), uv_valid ({size}, {size})")
        write_npz(
            path("uv", "npz"), {"uv": encode_uv(image_uv, uv_valid)}, compress=True, durable=False
        )


def finish_sequence(
    root: str | Path, index: DatasetIndex, subject: str, entry: SequenceEntry, params
) -> Path:
    """Writes a sequence's `sequence.npz` (after its frames): the sequence is then complete.

    Args:
      root: the dataset folder.
      index: the dataset's index (expected sizes).
      subject: subject id.
      entry: the sequence's index entry.
      params: its `SequenceParams`.

    Returns:
      The path written.

    Raises:
      DatasetFormatError: if the parameters do not match the index (checked by
        reading the file back; the bad file is removed).
    """
    folder = sequence_dir(root, subject, entry.id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SEQUENCE_FILE
    arrays = {k: np.asarray(v, np.float32) for k, v in params.arrays().items()}
    os.sync()  # the frames (written without a per-file fsync) reach the disk first
    write_npz(path, arrays)
    try:
        read_sequence(root, index, subject, entry)
    except DatasetFormatError:
        path.unlink()
        raise
    return path


def sequence_complete(
    root: str | Path, index: DatasetIndex, subject: str, entry: SequenceEntry
) -> bool:
    """Whether a sequence was finished: a valid `sequence.npz` and every frame's files present."""
    try:
        read_sequence(root, index, subject, entry)
    except (FileNotFoundError, DatasetFormatError):
        return False
    kinds = [("image", index.image_format), ("mask", "png")]
    if index.has_uv:
        kinds.append(("uv", "npz"))
    return all(
        frame_path(root, subject, entry.id, camera, frame, kind, ext).is_file()
        for camera in entry.cameras
        for frame in range(entry.num_frames)
        for kind, ext in kinds
    )


__all__ = ["SequenceParams", "finish_sequence", "sequence_complete", "write_frame"]
