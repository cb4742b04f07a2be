"""Frame sources: random access to a dataset's frames, from folders (and, in `shards`, packed).

A frame source is what the grain pipeline reads (a `grain` random-access data
source: `len(source)` and `source[i]`), together with its `FrameTable`: which
subject, sequence, camera and frame every record is, so that samples can be
assembled per identity without reading any pixels. Record `i` is a dict of
numpy arrays (S the image size, E and S' the index's expression and shape sizes):

    image        (S, S, 3) uint8     mask   (S, S) uint8
    uv           (S, S, 2) float32   uv_valid (S, S) bool     only when the index has_uv
    expression   (E,) float32        pose   (5, 3) float32    translation (3,) float32
    shape        (S',) float32       viewmat (4, 4) float32   intrinsics  (3, 3) float32
    record       () int64            its position in the table

`FolderSource` checks the dataset when it opens (`uika_jax.data.checks`): any
problem is an error naming the files, or, with `skip_bad_frames=True`, the bad
frames are left out of the table and counted in `num_skipped`.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np

from uika_jax.data.checks import check_dataset, iter_frames
from uika_jax.data.format import SPLITS, DatasetFormatError, DatasetIndex
from uika_jax.data.reader import FrameRef, SequenceParams, read_frame_files, read_sequence


@dataclasses.dataclass(frozen=True)
class FrameTable:
    """Who every record of a source is (N records).

    Attributes:
      subjects: subject ids; `subject` indexes them.
      sequences: "subject/sequence" keys; `sequence` indexes them.
      cameras: camera ids; `camera` indexes them.
      subject: (N,) int32.
      sequence: (N,) int32.
      camera: (N,) int32.
      frame: (N,) int32 frame number within the sequence.
      split: (N,) int8 index into `uika_jax.data.format.SPLITS`.
    """

    subjects: tuple[str, ...]
    sequences: tuple[str, ...]
    cameras: tuple[str, ...]
    subject: np.ndarray
    sequence: np.ndarray
    camera: np.ndarray
    frame: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.frame)

    def ref(self, i: int) -> FrameRef:
        """The `FrameRef` of record i."""
        subject, sequence = self.sequences[self.sequence[i]].split("/")
        return FrameRef(subject, sequence, self.cameras[self.camera[i]], int(self.frame[i]))

    @classmethod
    def from_refs(cls, index: DatasetIndex, refs: list[FrameRef]) -> FrameTable:
        """The table of `refs` (frames of `index`)."""
        split_of = {s.id: SPLITS.index(s.split) for s in index.subjects}
        subjects = tuple(s.id for s in index.subjects)
        sequences = tuple(f"{s.id}/{q.id}" for s in index.subjects for q in s.sequences)
        cameras = tuple(sorted({c for s in index.subjects for q in s.sequences for c in q.cameras}))
        lookup = [{k: i for i, k in enumerate(names)} for names in (subjects, sequences, cameras)]

        def column(values, dtype):
            return np.fromiter(values, dtype, count=len(refs))

        return cls(
            subjects=subjects,
            sequences=sequences,
            cameras=cameras,
            subject=column((lookup[0][r.subject] for r in refs), np.int32),
            sequence=column((lookup[1][f"{r.subject}/{r.sequence}"] for r in refs), np.int32),
            camera=column((lookup[2][r.camera] for r in refs), np.int32),
            frame=column((r.frame for r in refs), np.int32),
            split=column((split_of[r.subject] for r in refs), np.int8),
        )


def frame_record(
    frames: dict[str, np.ndarray], params: SequenceParams, camera: int, frame: int, record: int
) -> dict[str, np.ndarray]:
    """One record (module docstring) from a frame's files and its sequence's parameters."""
    return {
        **frames,
        "expression": params.expression[frame],
        "pose": params.pose[frame],
        "translation": params.translation[frame],
        "shape": params.shape,
        "viewmat": params.viewmats[camera],
        "intrinsics": params.intrinsics[camera],
        "record": np.int64(record),
    }


PARAMS_CACHE_SIZE = 64
"""Sequences whose parameters a `FolderSource` keeps in memory."""


class FolderSource:
    """Random access to the frames of a dataset folder (`uika_jax.data.format`)."""

    def __init__(
        self,
        root: str | Path,
        *,
        fingerprint: str | None = None,
        skip_bad_frames: bool = False,
        decode_frames: bool = True,
        progress: bool = False,
    ):
        """Opens and checks a dataset.

        Args:
          root: the dataset folder.
          fingerprint: the configured head model's fingerprint; another one is an error.
          skip_bad_frames: leave bad frames out (counted in `num_skipped`) instead of failing.
          decode_frames: decode every file while checking (else parameters only; a bad
            frame file then fails when it is read).
          progress: show a progress bar while checking.

        Raises:
          DatasetFormatError: listing the problems, unless they are bad frames skipped.
        """
        self.root = Path(root)
        report = check_dataset(
            root, fingerprint=fingerprint, decode_frames=decode_frames, progress=progress
        )
        fatal = [p for p in report.problems if not p.frames]
        if fatal or (report.problems and not skip_bad_frames):
            hint = "" if fatal else " (skip_bad_frames=True uses the rest)"
            raise DatasetFormatError(f"{root}: dataset check failed{hint}:\n{report.summary()}")
        bad = report.bad_frames
        refs = [r for r in iter_frames(report.index) if r not in bad]
        if not refs:
            raise DatasetFormatError(f"{root}: no usable frames")
        self.index = report.index
        self.table = FrameTable.from_refs(self.index, refs)
        self.num_skipped = len(bad)
        self._entries = [(s.id, q) for s in self.index.subjects for q in s.sequences]
        self._cache: dict[int, SequenceParams] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Pickled for grain's worker processes: without the lock and the cache."""
        return {**self.__dict__, "_lock": None, "_cache": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __len__(self) -> int:
        return len(self.table)

    def _params(self, sequence: int) -> SequenceParams:
        """A sequence's parameters, read once (a few cached: records come sequence-grouped)."""
        with self._lock:
            params = self._cache.get(sequence)
        if params is None:
            subject, entry = self._entries[sequence]
            params = read_sequence(self.root, self.index, subject, entry)
            with self._lock:
                if len(self._cache) >= PARAMS_CACHE_SIZE:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[sequence] = params
        return params

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        ref = self.table.ref(i)
        sequence = int(self.table.sequence[i])
        camera = self._entries[sequence][1].cameras.index(ref.camera)
        frames = read_frame_files(self.root, self.index, ref)
        return frame_record(frames, self._params(sequence), camera, ref.frame, i)
