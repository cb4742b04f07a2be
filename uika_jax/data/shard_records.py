"""The record of a packed shard: one frame with its mask, UV map, parameters and camera.

A record (version 1, little-endian) is a 40-byte header, then four blobs:

    header   RECORD_MAGIC, uint16 version, uint16 flags (bit 0: a UV map),
             four uint64 blob lengths (image, mask, uv, params)
    image    the frame file's bytes as stored (png or jpg)
    mask     the mask png's bytes
    uv       the UV map npz's bytes (empty when the dataset has none)
    params   a 32-byte header, PARAMS_MAGIC, uint32 E and S (expression and shape
             sizes), int64 record number, int32 sequence, camera and frame (the
             record's row of the frame table), then float32 expression (E,),
             pose (5, 3), translation (3,), shape (S,), viewmat (4, 4), intrinsics (3, 3)

Images stay compressed as stored and are decoded on read by the folder reader's
functions (`read_image`, `read_mask`, `read_uv`: declared size checked before
decoding). A record is untrusted input: nothing is unpickled, every length is
checked against the record's size before a blob is cut out, the parameters
against the index's sizes, finiteness and a valid camera (`camera_problem`), and
every error is a `DatasetFormatError` naming `origin` (the shard file and the
record).
"""

from __future__ import annotations

import dataclasses
import math
import struct

import numpy as np

from uika_jax.data.format import POSE_ROWS, DatasetFormatError, DatasetIndex
from uika_jax.data.reader import camera_problem, read_image, read_mask, read_uv

RECORD_MAGIC = b"UIKR"
RECORD_VERSION = 1
PARAMS_MAGIC = b"UIKP"
BLOBS = ("image", "mask", "uv", "params")
PARAM_KEYS = ("expression", "pose", "translation", "shape", "viewmat", "intrinsics")
"""The parameter arrays of a record, in params-blob order."""
_HEADER = struct.Struct("<4sHH4Q")
_PARAMS_HEADER = struct.Struct("<4sIIqiii")
_HAS_UV = 1
MAX_CHECKED_CAMERAS = 4096
"""Distinct cameras a `CameraChecks` remembers as valid before it starts over."""


def param_shapes(index: DatasetIndex) -> dict[str, tuple[int, ...]]:
    """The shapes of a record's parameter arrays (`PARAM_KEYS`, in that order)."""
    head = index.head_model
    return {
        "expression": (head.num_expression,),
        "pose": (len(POSE_ROWS), 3),
        "translation": (3,),
        "shape": (head.num_shape,),
        "viewmat": (4, 4),
        "intrinsics": (3, 3),
    }


@dataclasses.dataclass(frozen=True)
class RecordParams:
    """A record's parameters and camera (float32), its number and its frame-table row."""

    arrays: dict[str, np.ndarray]
    record: int
    row: tuple[int, int, int]


def encode_record(*, image: bytes, mask: bytes, uv: bytes, params: bytes) -> bytes:
    """One record: the header, then the blobs (module docstring); `uv` empty when none."""
    flags = _HAS_UV if uv else 0
    lengths = (len(image), len(mask), len(uv), len(params))
    return _HEADER.pack(RECORD_MAGIC, RECORD_VERSION, flags, *lengths) + image + mask + uv + params


def split_record(data: bytes, origin: str) -> dict[str, bytes]:
    """The blobs of a record, by name, after checking its header against its length.

    Raises:
      DatasetFormatError: naming `origin`, if the header is not a record's or its
        lengths do not add up to the record's size (truncated or corrupt).
    """
    if len(data) < _HEADER.size:
        raise DatasetFormatError(
            f"{origin}: {len(data)} bytes, shorter than a record header ({_HEADER.size}); "
            "truncated?"
        )
    magic, version, flags, *lengths = _HEADER.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise DatasetFormatError(f"{origin}: not a uika record (magic {magic!r})")
    if version != RECORD_VERSION:
        raise DatasetFormatError(
            f"{origin}: record version {version}; this code reads version {RECORD_VERSION}"
        )
    declared = _HEADER.size + sum(lengths)
    if declared != len(data):
        raise DatasetFormatError(
            f"{origin}: the header declares {declared:,} bytes, the record has {len(data):,} "
            "(truncated or corrupt)"
        )
    if bool(flags & _HAS_UV) != (lengths[2] > 0):
        raise DatasetFormatError(
            f"{origin}: UV flag {flags & _HAS_UV} with a {lengths[2]}-byte map"
        )
    offsets = np.cumsum([_HEADER.size, *lengths]).tolist()
    return {name: data[offsets[k] : offsets[k + 1]] for k, name in enumerate(BLOBS)}


def encode_params(params: RecordParams) -> bytes:
    """The params blob (module docstring) of a record's parameters."""
    expression, shape = params.arrays["expression"], params.arrays["shape"]
    header = _PARAMS_HEADER.pack(
        PARAMS_MAGIC, expression.size, shape.size, params.record, *params.row
    )
    values = [np.asarray(params.arrays[k], "<f4").ravel() for k in PARAM_KEYS]
    return header + np.concatenate(values).tobytes()


class CameraChecks:
    """Cameras already found valid (by their bytes), so each is checked once per source."""

    def __init__(self):
        self._valid: set[bytes] = set()

    def problem(self, viewmat: np.ndarray, intrinsics: np.ndarray) -> str | None:
        """`camera_problem` of a camera, remembered when there is none."""
        key = viewmat.tobytes() + intrinsics.tobytes()
        if key in self._valid:
            return None
        problem = camera_problem(viewmat, intrinsics)
        if problem is None:
            if len(self._valid) >= MAX_CHECKED_CAMERAS:
                self._valid.clear()
            self._valid.add(key)
        return problem


def decode_params(
    blob: bytes, index: DatasetIndex, origin: str, cameras: CameraChecks
) -> RecordParams:
    """Reads and checks a params blob: sizes of the index, finite values, a valid camera.

    Args:
      blob: the params blob.
      index: the dataset index (expression and shape sizes).
      origin: names the record in errors.
      cameras: the source's cameras checked so far.

    Returns:
      The `RecordParams` (writable float32 arrays).

    Raises:
      DatasetFormatError: naming `origin` and what is wrong.
    """
    shapes = param_shapes(index)
    floats = sum(math.prod(s) for s in shapes.values())
    expected = _PARAMS_HEADER.size + 4 * floats
    if len(blob) < _PARAMS_HEADER.size or blob[:4] != PARAMS_MAGIC:
        raise DatasetFormatError(f"{origin}: params: not a params blob (magic {blob[:4]!r})")
    _, num_expression, num_shape, record, *row = _PARAMS_HEADER.unpack_from(blob)
    if (num_expression, num_shape) != (shapes["expression"][0], shapes["shape"][0]):
        raise DatasetFormatError(
            f"{origin}: params: {num_expression} expression and {num_shape} shape "
            f"coefficients, the index says {shapes['expression'][0]} and {shapes['shape'][0]}"
        )
    if len(blob) != expected:
        raise DatasetFormatError(
            f"{origin}: params: {len(blob):,} bytes, expected {expected:,} (truncated or corrupt)"
        )
    values = np.frombuffer(blob, "<f4", floats, _PARAMS_HEADER.size).astype(np.float32)
    if not np.isfinite(values).all():
        raise DatasetFormatError(f"{origin}: params: not finite")
    arrays, start = {}, 0
    for key, shape in shapes.items():
        arrays[key] = values[start : start + math.prod(shape)].reshape(shape)
        start += math.prod(shape)
    problem = cameras.problem(arrays["viewmat"], arrays["intrinsics"])
    if problem:
        raise DatasetFormatError(f"{origin}: camera: {problem}")
    return RecordParams(arrays, record, tuple(row))


def decode_record(
    data: bytes, index: DatasetIndex, origin: str, cameras: CameraChecks
) -> tuple[dict[str, np.ndarray], RecordParams]:
    """A record's decoded frame files (as `read_frame_files` returns them) and parameters.

    Raises:
      DatasetFormatError: naming `origin` and what is wrong.
    """
    blobs = split_record(data, origin)
    size = index.image_size
    frames = {
        "image": read_image(blobs["image"], size, origin),
        "mask": read_mask(blobs["mask"], size, origin),
    }
    if index.has_uv != bool(blobs["uv"]):
        raise DatasetFormatError(f"{origin}: UV map {'missing' if index.has_uv else 'unexpected'}")
    if index.has_uv:
        frames["uv"], frames["uv_valid"] = read_uv(blobs["uv"], size, f"{origin}: uv")
    return frames, decode_params(blobs["params"], index, origin, cameras)
