"""The on-disk dataset format (version 1): layout, index, and the encodings of its files.

A dataset is a folder:

    DIR/
      dataset.json                        the index (below)
      dataset.part-00003-of-00008.json    part indexes, when N machines wrote disjoint parts
      SUBJECT/SEQUENCE/
        sequence.npz                      per-frame FLAME parameters and the cameras
        CAMERA/images/000000.png          frames (png or jpg, 8-bit RGB, square)
        CAMERA/masks/000000.png           foreground alpha (8-bit grey, same size)
        CAMERA/uv/000000.npz              optional ground-truth image-UV map

`sequence.npz` (float32; F frames, C cameras in the index's camera order, E
expression and S shape coefficients, V head-model vertices):

    shape          (S,)        identity coefficients
    expression     (F, E)
    pose           (F, 5, 3)   axis-angle rows: global, neck, jaw, left eye, right eye
    translation    (F, 3)      metres, applied after the global rotation
    static_offset  (V, 3)      optional per-vertex offset of the template (VHAP)
    viewmats       (C, 4, 4)   OpenCV world-to-camera (x right, y down, z forward)
    intrinsics     (C, 3, 3)   pixels, for the stored image size

A sequence's `sequence.npz` is written last: its presence marks the sequence
complete (an interrupted writer resumes from the first incomplete sequence).

The UV map `uv/FRAME.npz` holds one uint16 array `uv` (H, W, 2): 0 where no
head-model surface is seen, else 1 + round(u * 65534) with (u, v) the image UV
in [0, 1] (both axes pointing like image columns and rows: the convention of
`uika_jax.render.mesh_render`); 1.5e-5 resolution, 0.006 texel at 384.

The index (`dataset.json`) is JSON:

    {"format": "uika-dataset", "version": 1,
     "head_model": {"fingerprint": "synthetic:3:0123abcd...", "num_vertices": V,
                    "num_shape": S, "num_expression": E},
     "image_size": 256, "image_format": "png", "has_uv": true,
     "provenance": {...free-form: generator or importer and its arguments...},
     "subjects": [{"id": "id000042", "split": "train",
                   "sequences": [{"id": "talking_00", "cameras": ["cam0", ...],
                                  "num_frames": 24}]}]}

Splits are by subject (train / val / test), so evaluation identities are never
trained on. Identifiers are path components: letters, digits, `_`, `-` and `.`,
not starting with a dot. Everything in a dataset is untrusted input: the index is
validated before any path is built from it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from uika_jax.safe_files import atomic_write

FORMAT_NAME = "uika-dataset"
FORMAT_VERSION = 1
INDEX_FILE = "dataset.json"
PART_INDEX_GLOB = "dataset.part-*-of-*.json"
SEQUENCE_FILE = "sequence.npz"
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = ("png", "jpg")
POSE_ROWS = ("global", "neck", "jaw", "left_eye", "right_eye")
FRAME_KINDS = {"image": "images", "mask": "masks", "uv": "uv"}
MAX_INDEX_BYTES = 256 << 20
"""Largest index file read (a million subjects' worth of JSON)."""

_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_PART = re.compile(r"dataset\.part-(\d{5})-of-(\d{5})\.json")
UV_SCALE = 65534


class DatasetFormatError(ValueError):
    """A dataset file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class SequenceEntry:
    """One sequence of a subject: its cameras (in `sequence.npz` order) and frame count."""

    id: str
    cameras: tuple[str, ...]
    num_frames: int


@dataclasses.dataclass(frozen=True)
class SubjectEntry:
    """One subject (identity): its split and sequences."""

    id: str
    split: str
    sequences: tuple[SequenceEntry, ...]


@dataclasses.dataclass(frozen=True)
class HeadModelInfo:
    """The head model the parameters belong to: fingerprint string and sizes."""

    fingerprint: str
    num_vertices: int
    num_shape: int
    num_expression: int


@dataclasses.dataclass(frozen=True)
class DatasetIndex:
    """A dataset's index (the module docstring's `dataset.json`)."""

    head_model: HeadModelInfo
    image_size: int
    image_format: str
    has_uv: bool
    subjects: tuple[SubjectEntry, ...]
    provenance: dict = dataclasses.field(default_factory=dict, compare=False)

    @property
    def num_frames(self) -> int:
        """Frames over all subjects, sequences and cameras."""
        return sum(len(q.cameras) * q.num_frames for s in self.subjects for q in s.sequences)

    def split(self, name: str) -> tuple[SubjectEntry, ...]:
        """The subjects of one split."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return tuple(s for s in self.subjects if s.split == name)

    def to_json(self) -> dict:
        """The index as JSON-ready data."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "head_model": dataclasses.asdict(self.head_model),
            "image_size": self.image_size,
            "image_format": self.image_format,
            "has_uv": self.has_uv,
            "provenance": self.provenance,
            "subjects": [
                {
                    "id": s.id,
                    "split": s.split,
                    "sequences": [
                        {"id": q.id, "cameras": list(q.cameras), "num_frames": q.num_frames}
                        for q in s.sequences
                    ],
                }
                for s in self.subjects
            ],
        }


# --------------------------------------------------------------------------- validation


def check_id(value: object, what: str, origin: str) -> str:
    """Returns `value` if it is a valid identifier (a safe path component), else raises."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise DatasetFormatError(
            f"{origin}: {what} {value!r} is not an identifier (letters, digits, '_', '-', '.', "
            "at most 128, not starting with '.')"
        )
    return value


def _field(data: dict, key: str, kind: type | tuple, origin: str, where: str = ""):
    if not isinstance(data, dict) or key not in data:
        raise DatasetFormatError(f"{origin}: {where}missing '{key}'")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DatasetFormatError(f"{origin}: {where}'{key}' must be {names}, got {value!r:.80}")
    return value


def _count(data: dict, key: str, origin: str, where: str, low: int = 1) -> int:
    value = _field(data, key, int, origin, where)
    if isinstance(value, bool) or not low <= value <= 1 << 31:
        raise DatasetFormatError(f"{origin}: {where}'{key}' = {value} is out of range")
    return value


def index_from_json(data: object, origin: str) -> DatasetIndex:
    """Validates parsed index JSON and returns the `DatasetIndex`.

    Raises:
      DatasetFormatError: naming `origin` and the bad field.
    """
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{origin}: the index must be a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{origin}: not a {FORMAT_NAME} index (format field)")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{origin}: format version {version!r}; this code reads version {FORMAT_VERSION}"
        )
    head = _field(data, "head_model", dict, origin)
    head_model = HeadModelInfo(
        fingerprint=_field(head, "fingerprint", str, origin, "head_model: "),
        num_vertices=_count(head, "num_vertices", origin, "head_model: "),
        num_shape=_count(head, "num_shape", origin, "head_model: ", 0),
        num_expression=_count(head, "num_expression", origin, "head_model: ", 0),
    )
    image_format = _field(data, "image_format", str, origin)
    if image_format not in IMAGE_FORMATS:
        raise DatasetFormatError(f"{origin}: image_format {image_format!r} not in {IMAGE_FORMATS}")
    image_size = _count(data, "image_size", origin, "")
    if image_size > 8192:
        raise DatasetFormatError(f"{origin}: image_size {image_size} exceeds 8192")
    subjects, seen = [], set()
    for i, s in enumerate(_field(data, "subjects", list, origin)):
        where = f"subjects[{i}]: "
        sid = check_id(_field(s, "id", str, origin, where), "subject id", origin)
        if sid in seen:
            raise DatasetFormatError(f"{origin}: subject {sid!r} listed twice")
        seen.add(sid)
        split = _field(s, "split", str, origin, where)
        if split not in SPLITS:
            raise DatasetFormatError(f"{origin}: subject {sid!r}: split {split!r} not in {SPLITS}")
        sequences, seq_seen = [], set()
        for j, q in enumerate(_field(s, "sequences", list, origin, where)):
            qwhere = f"subject {sid!r} sequences[{j}]: "
            qid = check_id(_field(q, "id", str, origin, qwhere), "sequence id", origin)
            if qid in seq_seen:
                raise DatasetFormatError(f"{origin}: subject {sid!r}: sequence {qid!r} twice")
            seq_seen.add(qid)
            cameras = tuple(
                check_id(c, "camera id", origin) for c in _field(q, "cameras", list, origin, qwhere)
            )
            if not cameras or len(set(cameras)) != len(cameras):
                raise DatasetFormatError(
                    f"{origin}: {sid}/{qid}: cameras must be a non-empty list of distinct ids"
                )
            sequences.append(SequenceEntry(qid, cameras, _count(q, "num_frames", origin, qwhere)))
        subjects.append(SubjectEntry(sid, split, tuple(sequences)))
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise DatasetFormatError(f"{origin}: provenance must be an object")
    return DatasetIndex(
        head_model=head_model,
        image_size=image_size,
        image_format=image_format,
        has_uv=bool(_field(data, "has_uv", bool, origin)),
        subjects=tuple(subjects),
        provenance=provenance,
    )


def read_json(path: Path, error: type[Exception] = DatasetFormatError) -> object:
    """Parses a JSON file from outside (an index, a manifest, an export), its size capped.

    Args:
      path: the file.
      error: the exception type raised (its message names the file).

    Raises:
      `error`: if it is not a file, is larger than `MAX_INDEX_BYTES`, or is not
        readable, valid JSON.
    """
    if not path.is_file():
        raise error(f"{path}: not a file")
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise error(f"{path}: larger than {MAX_INDEX_BYTES:,} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON: {e}") from None


def part_index_name(part: int, num_parts: int) -> str:
    """File name of part `part` (0-based) of `num_parts` part indexes."""
    return f"dataset.part-{part:05d}-of-{num_parts:05d}.json"


def merge_indexes(parts: list[tuple[str, DatasetIndex]]) -> DatasetIndex:
    """Combines part indexes (disjoint subjects, the same header) into one index.

    Raises:
      DatasetFormatError: if the parts disagree on the head model, image size or
        format, UV presence, or list a subject twice.
    """
    (origin0, first), *rest = parts
    subjects = list(first.subjects)
    for origin, part in rest:
        for field in ("head_model", "image_size", "image_format", "has_uv"):
            if getattr(part, field) != getattr(first, field):
                raise DatasetFormatError(
                    f"{origin}: {field} {getattr(part, field)!r} differs from {origin0}'s "
                    f"{getattr(first, field)!r}"
                )
        subjects.extend(part.subjects)
    ids = [s.id for s in subjects]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DatasetFormatError(f"subjects listed by more than one part: {dupes[:10]}")
    provenance = {"parts": [origin for origin, _ in parts], **first.provenance}
    return dataclasses.replace(first, subjects=tuple(subjects), provenance=provenance)


def load_index(root: str | Path) -> DatasetIndex:
    """Reads a dataset's index: `dataset.json`, else all part indexes combined.

    Args:
      root: the dataset folder.

    Raises:
      FileNotFoundError: if the folder or any index is missing.
      DatasetFormatError: naming the file, if an index is invalid, or parts are
        missing or disagree.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    main = root / INDEX_FILE
    if main.exists():
        return index_from_json(read_json(main), str(main))
    paths = sorted(root.glob(PART_INDEX_GLOB))
    if not paths:
        raise FileNotFoundError(f"{root}: no {INDEX_FILE} and no part indexes ({PART_INDEX_GLOB})")
    numbered = {}
    for path in paths:
        m = _PART.fullmatch(path.name)
        if not m:
            raise DatasetFormatError(f"{path}: part index name not as {part_index_name(0, 1)}")
        numbered[path] = int(m[1]), int(m[2])
    totals = {n for _, n in numbered.values()}
    if len(totals) != 1:
        raise DatasetFormatError(f"{root}: part indexes of different part counts {sorted(totals)}")
    (total,) = totals
    present = {k for k, _ in numbered.values()}
    missing = sorted(set(range(total)) - present)
    if missing:
        raise DatasetFormatError(
            f"{root}: parts {missing[:20]} of {total} have no index yet (still being written, "
            "or failed: rerun those parts)"
        )
    return merge_indexes([(str(p), index_from_json(read_json(p), str(p))) for p in paths])


def write_index(root: str | Path, index: DatasetIndex, name: str = INDEX_FILE) -> Path:
    """Writes an index atomically; returns its path."""
    path = Path(root) / name
    with atomic_write(path) as f:
        f.write(json.dumps(index.to_json(), indent=1).encode())
    return path


# --------------------------------------------------------------------------- paths, encodings


def sequence_dir(root: str | Path, subject: str, sequence: str) -> Path:
    """The folder of one sequence."""
    return Path(root) / subject / sequence


def frame_path(
    root: str | Path, subject: str, sequence: str, camera: str, frame: int, kind: str, ext: str
) -> Path:
    """The file of one frame's image, mask or UV map (`kind` in FRAME_KINDS)."""
    return sequence_dir(root, subject, sequence) / camera / FRAME_KINDS[kind] / f"{frame:06d}.{ext}"


def encode_uv(image_uv: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Quantises an image-UV map (H, W, 2) in [0, 1] with its validity (H, W) to uint16."""
    q = 1 + np.round(np.clip(image_uv, 0.0, 1.0) * UV_SCALE).astype(np.uint16)
    return np.where(np.asarray(valid, bool)[..., None], q, 0).astype(np.uint16)


def decode_uv(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverts `encode_uv`: (image UV (H, W, 2) float32, 0 where invalid; validity (H, W))."""
    valid = (encoded[..., 0] > 0) & (encoded[..., 1] > 0)
    uv = (encoded.astype(np.float32) - 1.0) / UV_SCALE
    uv[~valid] = 0.0
    return uv, valid
