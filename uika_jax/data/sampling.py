"""Which frames make a training sample: identity catalogues, view-count buckets, sample draws.

A sample is one identity: 1..N_ref source frames and N_d target frames of one
sequence of that identity, the targets disjoint from the sources (never the same
(camera, frame)). Everything here works on a source's `FrameTable` alone, so a
sample's frames are chosen without reading any pixels, and every choice is a
function of integers (seed, stream, step, slot) through numpy's `SeedSequence`,
the same on every host, platform and worker process.

- `Catalogue`: the usable sequences of one source's split, grouped by identity,
  with only this process's share of the identities (`build_catalogue`): the
  identities are shuffled by the seed (the same order on every host) and host p
  of P keeps every P-th, so hosts read disjoint identities.
- Buckets: the number of source views is padded to one of a few sizes
  (`buckets`, ascending). The bucket of a step is `bucket_of_step(seed, step,
  weights)`, a function of (seed, step) only, so every host runs the same program
  at the same step; a sample of bucket b draws its view count uniformly from
  (buckets[b-1], buckets[b]] (1..buckets[0] for the first). The default weights,
  proportional to the view counts each bucket covers, make the view count uniform
  over 1..max(buckets), the paper's "1 to N_ref frames".
- `draw_frames`: monocular samples take their sources from one camera (frames of
  a video); multi-view samples take them round-robin over the sequence's cameras
  in a random order (several cameras and frames). Targets are drawn uniformly
  from the sequence's other records (other frames and other cameras). When a
  sequence has fewer records than asked, the view count is lowered so that the
  N_d targets always fit (the view mask says how many are real).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from uika_jax.data.format import SPLITS
from uika_jax.data.sources import FrameTable

CATALOGUE_STREAM, BUCKET_STREAM, SAMPLE_STREAM, AUGMENT_STREAM = range(4)
"""Independent random streams: `numpy.random.default_rng([seed, stream, ...])`."""


def stream_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """The generator of one stream at integer keys (e.g. step and slot)."""
    return np.random.default_rng([seed, stream, *keys])


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """The usable sequences of one source on this process, grouped by identity.

    Records are sorted by (subject, sequence, camera, frame); identity i owns the
    sequences `identity_starts[i]:identity_starts[i + 1]`, sequence q the entries
    `sequence_starts[q]:sequence_starts[q + 1]` of `records` and `cameras`.

    Attributes:
      subjects: (I,) int32 subject index (into the table's `subjects`) per identity.
      identity_starts: (I + 1,) int64 offsets into the sequences.
      sequence_starts: (Q + 1,) int64 offsets into `records`.
      records: (R,) int64 record indices of the source.
      cameras: (R,) int32 camera index (the table's) of each record.
      num_identities_total: identities of the split over all processes.
      num_excluded_sequences: sequences of the split with too few records for a sample.
    """

    subjects: np.ndarray
    identity_starts: np.ndarray
    sequence_starts: np.ndarray
    records: np.ndarray
    cameras: np.ndarray
    num_identities_total: int
    num_excluded_sequences: int

    @property
    def num_identities(self) -> int:
        """Identities on this process."""
        return len(self.subjects)


def _starts(keys: np.ndarray) -> np.ndarray:
    """Offsets of the runs of equal values in `keys` (runs + 1 entries, 0 and len included)."""
    if not len(keys):
        return np.zeros(1, np.int64)
    return np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1, [len(keys)]]).astype(np.int64)


def build_catalogue(
    table: FrameTable,
    *,
    split: str,
    min_records: int,
    process_index: int,
    process_count: int,
    seed: int,
    origin: str,
) -> Catalogue:
    """This process's identities of one split of a source, with their usable sequences.

    Args:
      table: the source's frame table.
      split: "train", "val" or "test".
      min_records: the fewest records a sequence needs (1 source + N_d targets).
      process_index: this process (`jax.process_index()`).
      process_count: all processes.
      seed: shuffles the identities before they are dealt to processes.
      origin: names the source in errors.

    Raises:
      ValueError: if the split has fewer usable identities than there are processes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    keep = np.flatnonzero(table.split == SPLITS.index(split))
    order = keep[
        np.lexsort(
            (table.frame[keep], table.camera[keep], table.sequence[keep], table.subject[keep])
        )
    ]
    counts = np.diff(_starts(table.sequence[order]))
    usable = counts >= min_records
    order = order[np.repeat(usable, counts)]
    identities = np.unique(table.subject[order])
    if len(identities) < process_count:
        raise ValueError(
            f"{origin}: split {split!r} has {len(identities)} identities with a sequence of at "
            f"least {min_records} frames; {process_count} processes need one each at least"
        )
    dealt = stream_rng(seed, CATALOGUE_STREAM).permutation(len(identities))
    mine = np.sort(identities[dealt[process_index::process_count]])
    order = order[np.isin(table.subject[order], mine)]
    sequence_starts = _starts(table.sequence[order])
    first_of_sequence = order[sequence_starts[:-1]]
    return Catalogue(
        subjects=mine.astype(np.int32),
        identity_starts=_starts(table.subject[first_of_sequence]),
        sequence_starts=sequence_starts,
        records=order.astype(np.int64),
        cameras=table.camera[order].astype(np.int32),
        num_identities_total=len(identities),
        num_excluded_sequences=int((~usable).sum()),
    )


def default_bucket_weights(buckets: Sequence[int]) -> tuple[float, ...]:
    """Weights making the view count uniform over 1..max(buckets): each bucket's share."""
    lows = (0, *buckets[:-1])
    return tuple((high - low) / buckets[-1] for low, high in zip(lows, buckets, strict=True))


def check_buckets(buckets: Sequence[int], weights: Sequence[float]) -> None:
    """Raises a ValueError unless buckets ascend from >= 1 and weights match them."""
    if not buckets or buckets[0] < 1 or any(a >= b for a, b in itertools.pairwise(buckets)):
        raise ValueError(f"buckets must be ascending view counts >= 1, got {tuple(buckets)}")
    if len(weights) != len(buckets) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"bucket weights {tuple(weights)} must be one non-negative weight per bucket "
            f"{tuple(buckets)}, not all zero"
        )


def bucket_of_step(seed: int, step: int, weights: Sequence[float]) -> int:
    """The bucket (index into the buckets) of a step: a function of (seed, step) only."""
    p = np.asarray(weights, np.float64)
    return int(stream_rng(seed, BUCKET_STREAM, step).choice(len(p), p=p / p.sum()))


def draw_view_count(rng: np.random.Generator, buckets: Sequence[int], bucket: int) -> int:
    """A view count of bucket `bucket`: uniform over (buckets[bucket-1], buckets[bucket]]."""
    low = buckets[bucket - 1] + 1 if bucket else 1
    return int(rng.integers(low, buckets[bucket] + 1))


def _draw_in_run(rng: np.random.Generator, runs: np.ndarray, run: int, count: int) -> np.ndarray:
    """`count` distinct positions (or all there are) of camera run `run`, at random."""
    length = runs[run + 1] - runs[run]
    return runs[run] + rng.choice(length, min(count, length), replace=False)


def _round_robin(rng: np.random.Generator, runs: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct positions over the camera runs, cameras in a random order."""
    per_camera = [_draw_in_run(rng, runs, r, count) for r in rng.permutation(len(runs) - 1)]
    padded = np.full((max(map(len, per_camera)), len(per_camera)), -1, np.int64)
    for column, positions in enumerate(per_camera):
        padded[: len(positions), column] = positions
    flat = padded.reshape(-1)
    return flat[flat >= 0][:count]


def _draw_outside(rng: np.random.Generator, length: int, taken: np.ndarray, count: int):
    """`count` distinct positions of range(length) not in `taken`, at random (O(count + taken))."""
    free = rng.choice(length - len(taken), count, replace=False)
    taken = np.sort(taken)
    # The free-th position outside `taken` skips every taken position j with
    # taken[j] - j (the free positions before it) <= free.
    return free + np.searchsorted(taken - np.arange(len(taken)), free, side="right")


def draw_frames(
    catalogue: Catalogue,
    rng: np.random.Generator,
    num_sources: int,
    num_targets: int,
    monocular: bool,
    identity: int | None = None,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Chooses an identity, one of its sequences, and that sequence's sources and targets.

    Args:
      catalogue: this process's identities of one source.
      rng: the sample's generator.
      num_sources: source views wanted (fewer if the sequence is short: module docstring).
      num_targets: target frames (always exactly this many).
      monocular: sources from one camera (else round-robin over the cameras).
      identity: this identity (an index into the catalogue) instead of a random one.

    Returns:
      (identity index into the catalogue, source records (n,), target records
      (num_targets,)), sources and targets disjoint.
    """
    if identity is None:
        identity = int(rng.integers(catalogue.num_identities))
    elif not 0 <= identity < catalogue.num_identities:
        raise ValueError(f"identity {identity} not in [0, {catalogue.num_identities})")
    first, last = catalogue.identity_starts[identity : identity + 2]
    sequence = int(rng.integers(first, last))
    start, stop = catalogue.sequence_starts[sequence : sequence + 2]
    runs = _starts(catalogue.cameras[start:stop])
    available = stop - start - num_targets
    if monocular:
        run = int(rng.integers(len(runs) - 1))
        sources = _draw_in_run(rng, runs, run, min(num_sources, available))
    else:
        sources = _round_robin(rng, runs, min(num_sources, available))
    targets = _draw_outside(rng, stop - start, sources, num_targets)
    records = catalogue.records[start:stop]
    return identity, records[sources], records[targets]
