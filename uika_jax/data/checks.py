"""Validating a whole dataset up front (`uika check DIR`, and the pipeline at start).

`check_dataset` reads the index, every `sequence.npz` and every frame's image,
mask and UV map through `uika_jax.data.reader`, and collects each problem with
the file it is in, instead of stopping at the first: a missing frame, an
unreadable image, a mask of another size, NaN or wrong-length parameters, a
camera that is not a rotation, a head-model fingerprint other than the
configured one. The report says which frames are bad, so that a dataset with a
few bad frames can be used with exactly those skipped and counted (never
silently).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from uika_jax.data.format import DatasetFormatError, DatasetIndex, load_index
from uika_jax.data.reader import FrameRef, read_frame_files, read_sequence


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the file, what is wrong, and the frames it makes unusable."""

    path: str
    message: str
    frames: tuple[FrameRef, ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """What `check_dataset` found."""

    index: DatasetIndex
    problems: tuple[Problem, ...]
    num_frames: int

    @property
    def bad_frames(self) -> frozenset[FrameRef]:
        """Frames some problem makes unusable."""
        return frozenset(f for p in self.problems for f in p.frames)

    @property
    def ok(self) -> bool:
        """Whether nothing is wrong."""
        return not self.problems

    def summary(self, limit: int = 20) -> str:
        """A human-readable report: counts, then up to `limit` problems."""
        bad = len(self.bad_frames)
        lines = [
            f"{len(self.index.subjects)} subjects, {self.num_frames} frames; "
            f"{len(self.problems)} problems, {bad} bad frames"
        ]
        lines += [f"  {p.message}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def iter_frames(index: DatasetIndex, split: str | None = None) -> Iterator[FrameRef]:
    """Every frame of the index (or of one split), subject by subject."""
    for s in index.subjects if split is None else index.split(split):
        for q in s.sequences:
            for camera in q.cameras:
                for frame in range(q.num_frames):
                    yield FrameRef(s.id, q.id, camera, frame)


def check_dataset(
    root: str | Path,
    *,
    fingerprint: str | None = None,
    decode_frames: bool = True,
    progress: bool = False,
) -> CheckReport:
    """Checks a dataset; returns every problem found (raises only if the index is unusable).

    Args:
      root: the dataset folder.
      fingerprint: the configured head model's fingerprint (`str(model.fingerprint)`);
        a dataset whose parameters belong to another model is a problem.
      decode_frames: decode every image, mask and UV map (else only the parameters).
      progress: show a progress bar over frames.

    Returns:
      The `CheckReport`.

    Raises:
      FileNotFoundError, DatasetFormatError: if the index itself is missing or invalid.
    """
    index = load_index(root)
    root = Path(root)
    problems: list[Problem] = []
    if fingerprint is not None and index.head_model.fingerprint != fingerprint:
        problems.append(
            Problem(
                str(root),
                f"{root}: parameters belong to head model {index.head_model.fingerprint}, "
                f"not the configured {fingerprint}",
                tuple(iter_frames(index)),
            )
        )
    bar = tqdm(total=index.num_frames, disable=not progress, desc="check", unit="frame")
    for subject in index.subjects:
        for entry in subject.sequences:
            frames = [
                FrameRef(subject.id, entry.id, camera, frame)
                for camera in entry.cameras
                for frame in range(entry.num_frames)
            ]
            try:
                read_sequence(root, index, subject.id, entry)
            except (FileNotFoundError, DatasetFormatError) as e:
                problems.append(Problem(str(e).split(":")[0], str(e), tuple(frames)))
                bar.update(len(frames))
                continue
            if decode_frames:
                for ref in frames:
                    try:
                        read_frame_files(root, index, ref)
                    except (FileNotFoundError, DatasetFormatError) as e:
                        problems.append(Problem(str(e).split(":")[0], str(e), (ref,)))
                    bar.update()
            else:
                bar.update(len(frames))
    bar.close()
    return CheckReport(index, tuple(problems), index.num_frames)
