"""Evaluation protocols and their manifests: exactly which frames every sample uses.

Four protocols, as in the paper (monocular and multi-view inputs x self- and
cross-reenactment):

    self_mono    sources: frames of one camera of a sequence; targets: other frames of
                 the same sequence (any camera), compared with their ground truth
    self_multi   sources: round-robin over the sequence's cameras (past the cameras,
                 further frames); targets as self_mono
    cross_mono   identity A's self_mono sources, driven by identity B's targets (B's
                 FLAME parameters and cameras): identity and motion metrics only
    cross_multi  the same with self_multi sources

A manifest lists, per protocol, its samples: the subject, its source frames and its
target frames, each frame as (subject, sequence, camera, frame number), and for cross
protocols the driving subject. `draw_manifest` draws one (seeded by `eval.seed`: the
same dataset and settings give the same frames); `write_manifest` stores it as JSON and
`read_manifest` reads a stored one back, so two runs or two methods are scored on
exactly the same frames. A manifest read back is untrusted: its size, structure and
every frame's existence in the dataset are checked (`resolve`), naming what is wrong.

Cross-reenactment pairs subject i with subject i + 1 (cyclically) of the drawn list,
so every subject drives exactly one other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uika_jax.data.reader import FrameRef
from uika_jax.data.sampling import build_catalogue, draw_frames, stream_rng
from uika_jax.data.sources import FrameTable
from uika_jax.safe_files import write_json

PROTOCOLS = ("self_mono", "self_multi", "cross_mono", "cross_multi")
"""The evaluation protocols (module docstring)."""

FORMAT, VERSION = "uika-eval-manifest", 1

MAX_MANIFEST_BYTES = 64 << 20
"""The largest manifest file read."""

MANIFEST_STREAM = 11
"""The random stream of the manifest's draws (distinct from training's and periodic eval's)."""


class ManifestError(ValueError):
    """A manifest that cannot be read or does not fit the dataset (names the file)."""


def is_cross(protocol: str) -> bool:
    """Whether a protocol drives one identity with another's motion."""
    return protocol.startswith("cross")


def is_monocular(protocol: str) -> bool:
    """Whether a protocol's sources come from one camera."""
    return protocol.endswith("mono")


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """One evaluation sample.

    Attributes:
      subject: the reconstructed identity.
      sources: its source frames, in order (the first N of them make an N-view input).
      targets: the frames whose motion and cameras drive it (the subject's own for self
        protocols, `driver`'s for cross protocols).
      driver: the driving identity of a cross protocol; None for self protocols.
    """

    subject: str
    sources: tuple[FrameRef, ...]
    targets: tuple[FrameRef, ...]
    driver: str | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The samples of each protocol, and what they were drawn from.

    Attributes:
      dataset: the dataset folder the frames belong to.
      split: its split ("test", "val", ...).
      protocols: protocol name -> its samples.
    """

    dataset: str
    split: str
    protocols: dict[str, tuple[SampleSpec, ...]]


def _refs(table: FrameTable, records: np.ndarray) -> tuple[FrameRef, ...]:
    return tuple(table.ref(int(r)) for r in records)


def draw_manifest(
    source: Any,
    *,
    dataset: str,
    split: str,
    protocols: Sequence[str],
    subjects: int,
    num_sources: int,
    num_targets: int,
    seed: int,
) -> Manifest:
    """Draws the samples of `protocols` on a source's split (module docstring).

    Args:
      source: a frame source (`uika_jax.data.pipeline.open_source`).
      dataset: the source's path (recorded in the manifest).
      split: the split to evaluate on.
      protocols: names from `PROTOCOLS`.
      subjects: the most subjects per protocol (the first by subject order).
      num_sources: source frames per sample (fewer where a sequence is short).
      num_targets: target frames per sample.
      seed: the draws' seed.

    Raises:
      ValueError: on an unknown protocol, or a split with fewer than 2 usable subjects.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocols {unknown}: choose from {PROTOCOLS}")
    catalogue = build_catalogue(
        source.table,
        split=split,
        min_records=1 + num_targets,
        process_index=0,
        process_count=1,
        seed=seed,
        origin=dataset,
    )
    order = np.argsort(catalogue.subjects)[: max(int(subjects), 0)]
    if len(order) < 2:
        raise ValueError(
            f"{dataset}: the {split!r} split has {catalogue.num_identities} usable subjects "
            f"(with at least {1 + num_targets} frames a sequence); evaluation needs 2"
        )
    table = source.table
    drawn: dict[str, tuple[SampleSpec, ...]] = {}
    for protocol in protocols:
        monocular = is_monocular(protocol)
        own = []
        for identity in order:
            rng = stream_rng(seed, MANIFEST_STREAM, int(monocular), int(identity))
            _, sources, targets = draw_frames(
                catalogue, rng, num_sources, num_targets, monocular, identity=int(identity)
            )
            subject = table.subjects[int(catalogue.subjects[identity])]
            own.append(SampleSpec(subject, _refs(table, sources), _refs(table, targets)))
        if is_cross(protocol):
            own = [
                SampleSpec(s.subject, s.sources, d.targets, driver=d.subject)
                for s, d in zip(own, own[1:] + own[:1], strict=True)
            ]
        drawn[protocol] = tuple(own)
    return Manifest(dataset=dataset, split=split, protocols=drawn)


def _ref_json(ref: FrameRef) -> list[Any]:
    return [ref.subject, ref.sequence, ref.camera, ref.frame]


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> None:
    """Writes a manifest as JSON, atomically."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": manifest.dataset,
        "split": manifest.split,
        "protocols": {
            name: [
                {
                    "subject": s.subject,
                    "driver": s.driver,
                    "sources": [_ref_json(r) for r in s.sources],
                    "targets": [_ref_json(r) for r in s.targets],
                }
                for s in samples
            ]
            for name, samples in manifest.protocols.items()
        },
    }
    write_json(path, document)


def _ref_from_json(value: Any, where: str) -> FrameRef:
    valid = (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, str) for v in value[:3])
        and isinstance(value[3], int)
        and not isinstance(value[3], bool)
    )
    if not valid:
        raise ManifestError(f"{where}: a frame must be [subject, sequence, camera, frame]")
    return FrameRef(value[0], value[1], value[2], value[3])


def _sample_from_json(value: Any, protocol: str, where: str) -> SampleSpec:
    if not isinstance(value, dict) or not {"subject", "sources", "targets"} <= value.keys():
        raise ManifestError(f"{where}: a sample needs subject, sources and targets")
    frames = {}
    for key in ("sources", "targets"):
        items = value[key]
        if not isinstance(items, list) or not items:
            raise ManifestError(f"{where}.{key}: a non-empty list of frames expected")
        frames[key] = tuple(_ref_from_json(v, f"{where}.{key}[{i}]") for i, v in enumerate(items))
    driver = value.get("driver")
    if is_cross(protocol) != isinstance(driver, str):
        raise ManifestError(
            f"{where}: a {protocol} sample {'needs' if is_cross(protocol) else 'has no'} driver"
        )
    if not isinstance(value["subject"], str):
        raise ManifestError(f"{where}.subject: a string expected")
    return SampleSpec(value["subject"], frames["sources"], frames["targets"], driver)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Reads a manifest written by `write_manifest` (untrusted: checked, module docstring).

    Raises:
      FileNotFoundError: if there is no such file.
      ManifestError: naming the file and the first thing wrong in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES:,} bytes")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: not a JSON manifest ({error})") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise ManifestError(f"{path}: version {document.get('version')!r}, expected {VERSION}")
    protocols = document.get("protocols")
    if not isinstance(protocols, dict):
        raise ManifestError(f"{path}: 'protocols' must map protocol names to samples")
    parsed = {}
    for name, samples in protocols.items():
        if name not in PROTOCOLS:
            raise ManifestError(f"{path}: unknown protocol {name!r} (known: {PROTOCOLS})")
        if not isinstance(samples, list) or not samples:
            raise ManifestError(f"{path}: protocol {name!r} has no samples")
        parsed[name] = tuple(
            _sample_from_json(s, name, f"{path}: {name}[{i}]") for i, s in enumerate(samples)
        )
    return Manifest(
        dataset=str(document.get("dataset", "")), split=str(document.get("split", "")),
        protocols=parsed,
    )  # fmt: skip


class FrameIndex:
    """Finds a source's records by (subject, sequence, camera, frame) in O(log N).

    Every record gets the key (sequence * cameras + camera) * frames + frame, sorted
    once; a lookup is a binary search, and a camera's frames of a sequence are one
    contiguous run of keys.
    """

    def __init__(self, table: FrameTable):
        """Sorts the table's keys."""
        self.table = table
        self._sequences = {name: i for i, name in enumerate(table.sequences)}
        self._cameras = {name: i for i, name in enumerate(table.cameras)}
        self._frames = int(table.frame.max()) + 1 if len(table) else 1
        keys = self._key(table.sequence.astype(np.int64), table.camera.astype(np.int64))
        keys = keys + table.frame.astype(np.int64)
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]

    def _key(self, sequence: Any, camera: Any) -> Any:
        return (sequence * len(self.table.cameras) + camera) * self._frames

    def _base(self, ref: FrameRef) -> int | None:
        sequence = self._sequences.get(f"{ref.subject}/{ref.sequence}")
        camera = self._cameras.get(ref.camera)
        return None if sequence is None or camera is None else int(self._key(sequence, camera))

    def resolve(self, refs: Sequence[FrameRef], origin: str) -> np.ndarray:
        """The record indices of `refs`.

        Raises:
          ManifestError: naming `origin` and the first frame the source does not hold.
        """
        records = np.empty(len(refs), np.int64)
        for i, ref in enumerate(refs):
            base = self._base(ref)
            found = -1
            if base is not None and 0 <= ref.frame < self._frames:
                at = int(np.searchsorted(self._keys, base + ref.frame))
                if at < len(self._keys) and self._keys[at] == base + ref.frame:
                    found = int(self._order[at])
            if found < 0:
                raise ManifestError(
                    f"{origin}: frame {[ref.subject, ref.sequence, ref.camera, ref.frame]} is "
                    "not in the dataset (another dataset or split?)"
                )
            records[i] = found
        return records

    def camera_frames(self, ref: FrameRef, limit: int) -> list[FrameRef]:
        """The frames of `ref`'s sequence seen by its camera, in frame order (at most `limit`)."""
        base = self._base(ref)
        if base is None:
            return []
        lo, hi = np.searchsorted(self._keys, [base, base + self._frames])
        return [self.table.ref(int(r)) for r in self._order[lo:hi][:limit]]
