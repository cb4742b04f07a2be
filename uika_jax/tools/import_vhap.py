"""Import a VHAP export (FLAME tracked on a video or a capture rig) as one subject's sequence.

    uika import-vhap SRC --out DIR --head-model FLAME2023.pkl [--uv head_template.obj]
        [--size 512] [--subject ID] [--sequence ID] [--split train|val|test|hash:80/10/10]
        [--teeth refuse|drop] [--coefficients strict|pad|fit] [--image-format png|jpg]

SRC is the folder `vhap/export_as_nerf_dataset.py` wrote (transforms.json, images/,
fg_masks/, flame_param/); all its frames are imported (VHAP's own train/val/test
files split timesteps and cameras; the dataset splits by subject). Cameras become
OpenCV world-to-camera matrices; each camera's frames are cropped to a square around
the tracked head (its projected extent over the sequence, spanning 70% of the crop
as in the project's face framing) and resized to --size, intrinsics to match.
Parameters go to the format's rows (pose: global = rotation, neck, jaw, left eye,
right eye). --head-model must be the model VHAP tracked with (FLAME 2023 by default;
FLAME 2020 parameters are not interchangeable): its fingerprint is recorded, and
with a UV layout (--uv) the ground-truth image-UV maps are rendered from the tracked
mesh. VHAP's FLAME appends 120 teeth vertices: --teeth drop removes them from the
static offset. Shape and expression counts other than the model's are refused
unless --coefficients says how to fit them.

Several imports into one DIR add subjects (or sequences of a subject); the index is
rewritten with the union (run imports into one DIR one after another). A finished
sequence is skipped on a rerun; an interrupted one is redone. Exit status 0 on
success, 2 on bad input (the message names the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from uika_jax.data.format import (
    INDEX_FILE,
    PART_INDEX_GLOB,
    SPLITS,
    DatasetFormatError,
    DatasetIndex,
    HeadModelInfo,
    SequenceEntry,
    SubjectEntry,
    check_id,
    load_index,
    write_index,
)
from uika_jax.data.framing import crop_square, framing_crop
from uika_jax.data.vhap import (
    COEFFICIENT_POLICIES,
    TEETH_POLICIES,
    VhapExport,
    read_export,
    read_source_frame,
    sequence_parameters,
)
from uika_jax.data.writer import SequenceParams, finish_sequence, sequence_complete, write_frame
from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import HeadModel
from uika_jax.head.uv_raster import corner_image_uv
from uika_jax.render.camera import HEAD_FRACTION
from uika_jax.render.mesh_render import render_mesh
from uika_jax.tools.head_option import head_model_from_args

DEFAULT_SEQUENCE = "vhap"
PROVENANCE_KEY = "vhap_imports"
_HASH_RULE = re.compile(r"hash:(\d+)/(\d+)/(\d+)")


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """What an import did.

    Attributes:
      index: the dataset's index after the import.
      subject: the subject id written.
      sequence: the sequence id written.
      skipped: whether the sequence was already complete (nothing rewritten).
      uv_overflow: faces the mesh rasterizer clipped over all UV maps (0 expected).
    """

    index: DatasetIndex
    subject: str
    sequence: str
    skipped: bool
    uv_overflow: int


def default_subject_id(src: str | Path) -> str:
    """The export folder's name as an identifier (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", Path(src).resolve().name).lstrip(".")
    return name[:128] or "subject"


def subject_split(subject: str, rule: str) -> str:
    """The split of a subject: a split name, or `hash:TRAIN/VAL/TEST` percentages.

    A hash rule assigns a subject by its id alone (sha256), so every import, on any
    machine, puts an identity in the same split.

    Raises:
      ValueError: for a rule that is neither.
    """
    if rule in SPLITS:
        return rule
    match = _HASH_RULE.fullmatch(rule)
    if not match or sum(int(p) for p in match.groups()) != 100:
        raise ValueError(
            f"--split {rule!r}: expected one of {SPLITS} or hash:TRAIN/VAL/TEST percentages "
            "summing to 100 (e.g. hash:80/10/10)"
        )
    bucket = int.from_bytes(hashlib.sha256(subject.encode()).digest()[:8], "big") % 100
    train, val, _ = (int(p) for p in match.groups())
    return "train" if bucket < train else "val" if bucket < train + val else "test"


def _existing_index(out: Path) -> DatasetIndex | None:
    if (out / INDEX_FILE).exists() or any(out.glob(PART_INDEX_GLOB)):
        return load_index(out)
    return None


def _union(
    existing: DatasetIndex | None,
    header: DatasetIndex,
    subject: SubjectEntry,
    source: dict,
    out: Path,
) -> tuple[DatasetIndex, bool]:
    """The index with this import's sequence added; whether it already listed it from `source`.

    Raises:
      DatasetFormatError: if the folder holds another head model, image size,
        format or UV presence, the subject in another split, or the sequence
        with other cameras or frames or from another export.
    """
    (entry,) = subject.sequences
    key = f"{subject.id}/{entry.id}"
    existing = existing or header
    for field in ("head_model", "image_size", "image_format", "has_uv"):
        if getattr(existing, field) != getattr(header, field):
            raise DatasetFormatError(
                f"{out}: the dataset's {field} is {getattr(existing, field)!r}, this import's "
                f"{getattr(header, field)!r}; import into another folder"
            )
    imports = dict(existing.provenance.get(PROVENANCE_KEY, {}))
    subjects = {s.id: s for s in existing.subjects}
    old = subjects.get(subject.id)
    listed = False
    if old is None:
        subjects[subject.id] = subject
    elif old.split != subject.split:
        raise DatasetFormatError(
            f"{out}: subject {subject.id!r} is in split {old.split!r}, not {subject.split!r}"
        )
    else:
        old_entry = next((q for q in old.sequences if q.id == entry.id), None)
        previous = imports.get(key, {}).get("source")
        if old_entry is not None and (old_entry != entry or previous != source["source"]):
            raise DatasetFormatError(
                f"{out}: already holds {key} ({len(old_entry.cameras)} cameras, "
                f"{old_entry.num_frames} frames, from {previous}); pass another --sequence "
                "or --subject, or delete that folder to redo it"
            )
        listed = old_entry is not None
        sequences = old.sequences if listed else (*old.sequences, entry)
        subjects[subject.id] = dataclasses.replace(old, sequences=sequences)
    provenance = {**existing.provenance, PROVENANCE_KEY: {**imports, key: source}}
    index = dataclasses.replace(existing, subjects=tuple(subjects.values()), provenance=provenance)
    return index, listed


@jax.jit
def _posed_vertices(model, shape, expression, pose, translation, static_offset):
    return flame_forward(model, shape, expression, pose, translation, static_offset)[0]


def _framed_intrinsics(export: VhapExport, vertices_at, size: int) -> list:
    """Per camera: its square crop and the intrinsics of the crop resized to `size`."""
    boxes = np.zeros((len(export.timesteps), len(export.cameras), 4))
    for f, timestep in enumerate(export.timesteps):
        vertices = vertices_at(f)
        for c, camera in enumerate(export.cameras):
            cam = vertices @ camera.viewmat[:3, :3].T + camera.viewmat[:3, 3]
            if cam[:, 2].min() <= 0:
                raise DatasetFormatError(
                    f"{export.flame_params[timestep]}: the tracked head is (partly) behind "
                    f"camera {camera.index} (depth {cam[:, 2].min():.3f} m): wrong cameras?"
                )
            pixels = cam[:, :2] / cam[:, 2:] @ camera.K[:2, :2].T + camera.K[:2, 2]
            boxes[f, c] = [*pixels.min(0), *pixels.max(0)]
    framing = []
    for c, camera in enumerate(export.cameras):
        low, high = boxes[:, c, :2].min(0), boxes[:, c, 2:].max(0)
        if (high <= 0).any() or low[0] >= camera.width or low[1] >= camera.height:
            raise DatasetFormatError(
                f"{export.root}: the tracked head projects outside camera {camera.index}'s image "
                f"(x {low[0]:.0f}..{high[0]:.0f}, y {low[1]:.0f}..{high[1]:.0f} of "
                f"{camera.width}x{camera.height}): wrong cameras?"
            )
        crop = framing_crop(boxes[:, c], HEAD_FRACTION)
        framing.append((crop, crop.intrinsics(camera.K, size)))
    return framing


def import_vhap(
    src: str | Path,
    out: str | Path,
    model: HeadModel,
    *,
    size: int = 512,
    subject: str | None = None,
    sequence: str = DEFAULT_SEQUENCE,
    split: str = "train",
    teeth: str = "refuse",
    coefficients: str = "strict",
    image_format: str = "png",
    progress: bool = False,
) -> ImportResult:
    """Imports one VHAP export as one sequence of one subject (module docstring).

    Args:
      src: the export folder.
      out: the dataset folder (created; other subjects in it are kept).
      model: the head model VHAP tracked with (with a UV layout for UV maps).
      size: the side of the square frames written.
      subject: the subject id (default: the export folder's name).
      sequence: the sequence id.
      split: a split name or a `hash:` rule (`subject_split`).
      teeth: "drop" removes VHAP's 120 teeth rows from the static offset.
      coefficients: "pad" or "fit" allow shape / expression counts other than the model's.
      image_format: "png" or "jpg".
      progress: show a progress bar.

    Raises:
      FileNotFoundError: if the export or a file it lists is missing.
      ValueError: (VhapExportError, DatasetFormatError) naming the file or option at fault.
    """
    export = read_export(src)
    out = Path(out)
    subject = check_id(subject or default_subject_id(src), "subject id", "--subject")
    sequence = check_id(sequence, "sequence id", "--sequence")
    head = HeadModelInfo(
        str(model.fingerprint), model.num_vertices, model.num_shape, model.num_expression
    )
    params = sequence_parameters(export, head, coefficients=coefficients, teeth=teeth)
    entry = SequenceEntry(sequence, tuple(c.id for c in export.cameras), len(export.timesteps))
    header = DatasetIndex(head, size, image_format, model.has_uv, ())
    source = {
        "source": str(export.root.resolve()),
        "transforms": list(export.transforms),
        "timesteps": [export.timesteps[0], export.timesteps[-1], len(export.timesteps)],
        "camera_indices": [c.index for c in export.cameras],
        "teeth": teeth,
        "coefficients": coefficients,
    }
    subject_entry = SubjectEntry(subject, subject_split(subject, split), (entry,))
    index, listed = _union(_existing_index(out), header, subject_entry, source, out)
    if listed and sequence_complete(out, index, subject, entry):
        return ImportResult(index, subject, sequence, skipped=True, uv_overflow=0)

    offset = params.get("static_offset")

    def vertices_at(f: int) -> np.ndarray:
        posed = _posed_vertices(
            model, params["shape"], params["expression"][f], params["pose"][f],
            params["translation"][f], offset,
        )  # fmt: skip
        return np.asarray(posed, np.float64)

    framing = _framed_intrinsics(export, vertices_at, size)
    corner_uv = corner_image_uv(model) if model.has_uv else None
    overflow = 0
    bar = tqdm(
        total=len(export.timesteps) * len(export.cameras),
        disable=not progress,
        desc=f"import {subject}/{sequence}",
        unit="frame",
    )
    for f, timestep in enumerate(export.timesteps):
        vertices = vertices_at(f) if corner_uv is not None else None
        for camera, (crop, K) in zip(export.cameras, framing, strict=True):
            files = export.files[timestep, camera.index]
            image = read_source_frame(files["image"], camera, is_mask=False)
            mask = read_source_frame(files["mask"], camera, is_mask=True)
            uv = {}
            if corner_uv is not None:
                render = render_mesh(
                    vertices, model.faces, camera.viewmat, K, size, size, corner_uv=corner_uv
                )
                uv = {"image_uv": np.asarray(render.image_uv), "uv_valid": np.asarray(render.mask)}
                overflow += int(render.overflow)
            write_frame(
                out, index, subject, sequence, camera.id, f,
                image=crop_square(image, crop, size, is_mask=False),
                mask=crop_square(mask, crop, size, is_mask=True),
                **uv,
            )  # fmt: skip
            bar.update()
    bar.close()
    finish_sequence(
        out,
        index,
        subject,
        entry,
        SequenceParams(
            shape=params["shape"],
            expression=params["expression"],
            pose=params["pose"],
            translation=params["translation"],
            viewmats=np.stack([c.viewmat for c in export.cameras]).astype(np.float32),
            intrinsics=np.stack([K for _, K in framing]).astype(np.float32),
            static_offset=offset,
        ),
    )
    index, _ = _union(_existing_index(out), header, subject_entry, source, out)
    write_index(out, index)
    return ImportResult(index, subject, sequence, skipped=False, uv_overflow=overflow)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this subcommand's arguments."""
    parser.add_argument("src", help="the VHAP export folder (transforms.json, flame_param/)")
    parser.add_argument("--out", required=True, help="the dataset folder (created or extended)")
    parser.add_argument("--head-model", required=True, help="the FLAME .pkl/.npz VHAP tracked with")
    parser.add_argument(
        "--uv", default=None, help="its UV layout (head_template.obj): writes UV maps"
    )
    parser.add_argument("--size", type=int, default=512, help="side of the square frames")
    parser.add_argument("--subject", default=None, help="subject id (default: SRC's name)")
    parser.add_argument("--sequence", default=DEFAULT_SEQUENCE, help="sequence id")
    parser.add_argument(
        "--split", default="train", help=f"one of {SPLITS} or hash:TRAIN/VAL/TEST percentages"
    )
    parser.add_argument(
        "--teeth",
        choices=TEETH_POLICIES,
        default="refuse",
        help="drop: remove the 120 teeth rows VHAP's FLAME appends to the static offset",
    )
    parser.add_argument(
        "--coefficients",
        choices=COEFFICIENT_POLICIES,
        default="strict",
        help="counts other than the model's: pad (zero-pad) or fit (pad or truncate)",
    )
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")


def run(args: argparse.Namespace) -> int:
    """Runs the import; prints what was done; returns the exit status."""
    try:
        if not 16 <= args.size <= 8192:
            raise ValueError(f"--size {args.size}: expected 16..8192")
        result = import_vhap(
            args.src,
            args.out,
            head_model_from_args(args),
            size=args.size,
            subject=args.subject,
            sequence=args.sequence,
            split=args.split,
            teeth=args.teeth,
            coefficients=args.coefficients,
            image_format=args.image_format,
            progress=sys.stderr.isatty(),
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"uika import-vhap: {e}", file=sys.stderr)
        return 2
    key = f"{result.subject}/{result.sequence}"
    if result.skipped:
        print(f"{key}: already imported from {args.src}; skipped")
    else:
        (entry,) = [
            q for s in result.index.subjects if s.id == result.subject for q in s.sequences
            if q.id == result.sequence
        ]  # fmt: skip
        print(
            f"{key}: {len(entry.cameras)} cameras x {entry.num_frames} frames into {args.out}; "
            f"{len(result.index.subjects)} subjects in the dataset"
        )
        if result.uv_overflow:
            print(f"warning: {result.uv_overflow} faces clipped in the UV maps", file=sys.stderr)
    return 0
