"""Packed shards: a dataset's frames as ArrayRecord records, and `ShardSource` reading them.

Millions of small files do not scale on a pod's filesystem; a few hundred shard
files do. `pack_dataset` (`uika pack`) writes a checked dataset folder as:

    SHARDS/
      shards.json                          the manifest, written last: the pack is complete
      shards.plan.json                     the same manifest, written first (resuming checks it)
      shard-00000-of-00012.array_record    records 0 .. K-1
      shard-00001-of-00012.array_record    records K .. 2K-1, ...

Record i is row i of the `FrameTable` (the dataset's frames subject by subject,
sequence by sequence, camera by camera, frame by frame, without the bad frames
left out by `skip_bad_frames`), the same order as `FolderSource`: frames of one
identity are stored together. It lives in shard i // K at position i % K, so the
assignment is deterministic and a rerun rewrites only the shards that are not
there (each one written under a temporary name, then renamed).

A record (`uika_jax.data.shard_records`) holds the frame's files as stored
(decoded on read, with the folder reader's checks) and its parameters and camera;
it is untrusted input, and every error names the shard file and the record. The
manifest (`ShardManifest`) holds the dataset index, the frames left out (with the
index they determine the frame table), K, and the shard files with their record
counts; `ShardSource` refuses one that lists a missing shard.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from tqdm import tqdm

from uika_jax.data.checks import iter_frames
from uika_jax.data.format import (
    DatasetFormatError,
    DatasetIndex,
    check_id,
    index_from_json,
    read_json,
)
from uika_jax.data.reader import FrameRef, SequenceParams, read_sequence
from uika_jax.data.shard_records import (
    PARAM_KEYS,
    CameraChecks,
    RecordParams,
    decode_record,
    encode_params,
    encode_record,
)
from uika_jax.data.sources import FolderSource, FrameTable, frame_record
from uika_jax.safe_files import atomic_path, atomic_write

SHARDS_FORMAT = "uika-shards"
SHARDS_VERSION = 1
MANIFEST_FILE = "shards.json"
PLAN_FILE = "shards.plan.json"
WRITER_OPTIONS = "group_size:1,zstd:1"
"""ArrayRecord options: one record a chunk (grain's random access), each compressed by
zstd level 1: free beside image decoding, and fast-written png frames (the synthetic
generator's) shrink to about half (512 px: 42 MB of files, 23 MB of shards)."""


def shard_name(shard: int, num_shards: int) -> str:
    """File name of shard `shard` (0-based) of `num_shards`."""
    return f"shard-{shard:05d}-of-{num_shards:05d}.array_record"


# --------------------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class ShardManifest:
    """What a shard set holds: the dataset index, the frames left out, the shard layout."""

    index: DatasetIndex
    skipped: tuple[FrameRef, ...]
    records_per_shard: int

    def refs(self) -> list[FrameRef]:
        """The frames packed, in record order."""
        skipped = set(self.skipped)
        return [r for r in iter_frames(self.index) if r not in skipped]

    def shard_sizes(self) -> list[int]:
        """Records in each shard."""
        total, k = self.index.num_frames - len(self.skipped), self.records_per_shard
        return [min(k, total - start) for start in range(0, total, k)]

    def shard_names(self) -> list[str]:
        """The shard files' names."""
        n = len(self.shard_sizes())
        return [shard_name(s, n) for s in range(n)]

    def to_json(self) -> dict:
        """The manifest as JSON-ready data."""
        return {
            "format": SHARDS_FORMAT,
            "version": SHARDS_VERSION,
            "dataset": self.index.to_json(),
            "skipped": [[r.subject, r.sequence, r.camera, r.frame] for r in self.skipped],
            "records_per_shard": self.records_per_shard,
            "num_records": self.index.num_frames - len(self.skipped),
            "shards": [
                {"file": name, "num_records": n}
                for name, n in zip(self.shard_names(), self.shard_sizes(), strict=True)
            ],
        }

    @classmethod
    def from_json(cls, data: object, origin: str) -> ShardManifest:
        """Validates parsed manifest JSON.

        Raises:
          DatasetFormatError: naming `origin` and the field at fault.
        """
        if not isinstance(data, dict) or data.get("format") != SHARDS_FORMAT:
            raise DatasetFormatError(f"{origin}: not a {SHARDS_FORMAT} manifest (format field)")
        if data.get("version") != SHARDS_VERSION:
            raise DatasetFormatError(
                f"{origin}: version {data.get('version')!r}; this code reads {SHARDS_VERSION}"
            )
        index = index_from_json(data.get("dataset"), f"{origin}: dataset")
        k = data.get("records_per_shard")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1 << 31:
            raise DatasetFormatError(f"{origin}: records_per_shard {k!r} is not a positive int")
        skipped = data.get("skipped")
        if not isinstance(skipped, list):
            raise DatasetFormatError(f"{origin}: 'skipped' must be a list")
        frames = {
            (s.id, q.id, c): q.num_frames
            for s in index.subjects
            for q in s.sequences
            for c in q.cameras
        }
        refs = []
        for item in skipped:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[3], int)):
                raise DatasetFormatError(
                    f"{origin}: skipped frame {item!r:.80} is not [s, q, c, f]"
                )
            ref = FrameRef(*(check_id(x, "id", origin) for x in item[:3]), item[3])
            if not 0 <= ref.frame < frames.get((ref.subject, ref.sequence, ref.camera), 0):
                raise DatasetFormatError(f"{origin}: skipped frame {item} is not in the dataset")
            refs.append(ref)
        if len(set(refs)) != len(refs):
            raise DatasetFormatError(f"{origin}: a skipped frame is listed twice")
        manifest = cls(index, tuple(refs), k)
        expected = manifest.to_json()
        for key in ("num_records", "shards"):
            if data.get(key) != expected[key]:
                raise DatasetFormatError(
                    f"{origin}: '{key}' is {data.get(key)!r:.200}, expected {expected[key]!r:.200}"
                )
        return manifest


def read_manifest(path: str | Path) -> ShardManifest:
    """Reads and validates a manifest file (`shards.json`)."""
    return ShardManifest.from_json(read_json(Path(path)), str(path))


def _write_manifest(path: Path, manifest: ShardManifest) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(manifest.to_json(), indent=1).encode())


# --------------------------------------------------------------------------- the source


class ShardSource:
    """Random access to packed frames: the interface and records of `FolderSource`.

    A grain random-access data source (`len`, `__getitem__`, `__getitems__`) built on
    `grain.sources.ArrayRecordDataSource`; picklable for grain's worker processes.
    """

    def __init__(self, path: str | Path, *, fingerprint: str | None = None):
        """Opens a shard set.

        Args:
          path: the shard folder, or its `shards.json`.
          fingerprint: the configured head model's fingerprint; another one is an error.

        Raises:
          FileNotFoundError: if there is no manifest (the pack is not finished).
          DatasetFormatError: if the manifest is invalid, lists a shard that is missing,
            or belongs to another head model.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_FILE if path.is_dir() else path
        self.root = manifest_path.parent
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path}: no shard manifest (not packed, or the pack did not finish: "
                "rerun uika pack)"
            )
        manifest = read_manifest(manifest_path)
        head = manifest.index.head_model.fingerprint
        if fingerprint is not None and head != fingerprint:
            raise DatasetFormatError(
                f"{manifest_path}: parameters belong to head model {head}, not the configured "
                f"{fingerprint}"
            )
        self.shard_paths = [self.root / name for name in manifest.shard_names()]
        missing = [p.name for p in self.shard_paths if not p.is_file()]
        if missing:
            raise DatasetFormatError(
                f"{manifest_path}: lists {len(missing)} shards missing from {self.root}: "
                f"{missing[:10]} (rerun uika pack to rewrite them)"
            )
        self.index = manifest.index
        self.table = FrameTable.from_refs(self.index, manifest.refs())
        self.num_skipped = len(manifest.skipped)
        self.records_per_shard = manifest.records_per_shard
        self._cameras = CameraChecks()
        self._records = grain.sources.ArrayRecordDataSource(
            [f"{p}[0:{n}]" for p, n in zip(self.shard_paths, manifest.shard_sizes(), strict=True)]
        )

    def __len__(self) -> int:
        return len(self.table)

    def _origin(self, i: int) -> str:
        shard, position = divmod(i, self.records_per_shard)
        return f"{self.shard_paths[shard]}: record {position} (source record {i})"

    def _key(self, i) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records in {self.root}")
        return i

    def _read(self, i: int) -> bytes:
        try:
            return self._records[i]
        except RuntimeError as e:
            raise DatasetFormatError(f"{self._origin(i)}: unreadable: {e}") from None

    def _record(self, i: int, data: bytes) -> dict[str, np.ndarray]:
        origin = self._origin(i)
        frames, params = decode_record(data, self.index, origin, self._cameras)
        table = self.table
        row = (int(table.sequence[i]), int(table.camera[i]), int(table.frame[i]))
        if params.record != i or params.row != row:
            raise DatasetFormatError(
                f"{origin}: holds record {params.record} (sequence, camera, frame {params.row}), "
                f"the manifest expects {i} {row}: a shard of another pack?"
            )
        one_frame = SequenceParams(
            shape=params.arrays["shape"],
            expression=params.arrays["expression"][None],
            pose=params.arrays["pose"][None],
            translation=params.arrays["translation"][None],
            viewmats=params.arrays["viewmat"][None],
            intrinsics=params.arrays["intrinsics"][None],
        )
        return frame_record(frames, one_frame, 0, 0, i)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = self._key(i)
        return self._record(i, self._read(i))

    def __getitems__(self, keys: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Several records, their bytes read by parallel threads."""
        keys = [self._key(i) for i in keys]
        try:
            blobs = self._records.__getitems__(keys)
        except RuntimeError:
            blobs = [self._read(i) for i in keys]
        return [self._record(i, data) for i, data in zip(keys, blobs, strict=True)]


# --------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class PackResult:
    """What `pack_dataset` did."""

    num_records: int
    num_skipped: int
    num_shards: int
    shards_written: int


def _shard_complete(path: Path, num_records: int) -> bool:
    if not path.is_file():
        return False
    try:
        reader = ArrayRecordReader(str(path))
    except RuntimeError:
        return False
    try:
        return reader.num_records() == num_records
    finally:
        reader.close()


def _check_resumable(out: Path, manifest: ShardManifest) -> None:
    """Refuses an output folder that holds a pack of something else (provenance aside)."""
    for name in (MANIFEST_FILE, PLAN_FILE):
        path = out / name
        if not path.exists():
            continue
        try:
            earlier = read_manifest(path)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"{out}: holds an unreadable {name} ({e})") from None
        if earlier != manifest:
            raise DatasetFormatError(
                f"{out}: holds a pack of another dataset, records-per-shard or set of skipped "
                f"frames ({name}); pack into an empty folder"
            )


def _shard_records(source: FolderSource, start: int, stop: int):
    """The encoded records start .. stop-1 of a checked dataset (their files' bytes)."""
    table, index, params = source.table, source.index, None
    entries = [(s.id, q) for s in index.subjects for q in s.sequences]
    for i in range(start, stop):
        ref, sequence = table.ref(i), int(table.sequence[i])
        subject, entry = entries[sequence]
        if params is None or params[0] != sequence:
            params = sequence, read_sequence(source.root, index, subject, entry)
        record = frame_record({}, params[1], entry.cameras.index(ref.camera), ref.frame, i)
        row = (sequence, int(table.camera[i]), ref.frame)
        arrays = {k: record[k] for k in PARAM_KEYS}
        yield encode_record(
            image=ref.path(source.root, "image", index.image_format).read_bytes(),
            mask=ref.path(source.root, "mask", index.image_format).read_bytes(),
            uv=ref.path(source.root, "uv", index.image_format).read_bytes()
            if index.has_uv
            else b"",
            params=encode_params(RecordParams(arrays, i, row)),
        )


def pack_dataset(
    root: str | Path,
    out: str | Path,
    *,
    records_per_shard: int,
    fingerprint: str | None = None,
    skip_bad_frames: bool = False,
    progress: bool = False,
) -> PackResult:
    """Packs a dataset folder into ArrayRecord shards (module docstring); resumable.

    The dataset is checked first (every file decoded). Shards already in `out` with
    the right record count are kept; the others are written under a temporary name
    and renamed; the manifest is written last.

    Args:
      root: the dataset folder.
      out: the shard folder (created).
      records_per_shard: K, records in every shard but the last.
      fingerprint: the configured head model's fingerprint; another one is an error.
      skip_bad_frames: leave bad frames out (listed in the manifest) instead of failing.
      progress: show progress bars (check, then packing).

    Returns:
      The `PackResult`.

    Raises:
      DatasetFormatError: if the dataset check fails, or `out` holds another pack.
      ValueError: if `records_per_shard` is not positive.
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
    source = FolderSource(
        root, fingerprint=fingerprint, skip_bad_frames=skip_bad_frames, progress=progress
    )
    used = {source.table.ref(i) for i in range(len(source))}
    skipped = tuple(r for r in iter_frames(source.index) if r not in used)
    manifest = ShardManifest(source.index, skipped, records_per_shard)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_resumable(out, manifest)
    for stale in out.glob(".shard-*.tmp"):  # left by a killed run (one pack per folder)
        stale.unlink()
    _write_manifest(out / PLAN_FILE, manifest)
    sizes = manifest.shard_sizes()
    todo = [
        s
        for s, (name, n) in enumerate(zip(manifest.shard_names(), sizes, strict=True))
        if not _shard_complete(out / name, n)
    ]
    bar = tqdm(total=sum(sizes[s] for s in todo), disable=not progress, desc="pack", unit="rec")
    for s in todo:
        start = s * records_per_shard
        with atomic_path(out / manifest.shard_names()[s]) as temp:
            writer = ArrayRecordWriter(str(temp), WRITER_OPTIONS)
            for record in _shard_records(source, start, start + sizes[s]):
                writer.write(record)
                bar.update()
            writer.close()
    bar.close()
    _write_manifest(out / MANIFEST_FILE, manifest)
    (out / PLAN_FILE).unlink()
    return PackResult(len(source), len(skipped), len(sizes), len(todo))
