"""The grain training pipeline: samples of one identity, bucketed view counts, global batches.

A sample is one identity: 1..N_ref source views and N_d target frames of one
sequence, disjoint (`uika_jax.data.sampling`). Several sources (folders or shards,
anything with `index`, `table`, `len()` and `[i]` -> record, as
`uika_jax.data.sources`) mix with `PipelineConfig.mixing_weights`, drawn per
sample (then an identity of it uniformly, then one of the identity's sequences);
weight 0 leaves a source out (the paper's "w/o synth" ablation).

Global batch layout (B = `global_batch_size`, N = the step's bucket, N_d =
`num_drive`, S = `image_size`, E and S' the head model's expression and shape
sizes); padded views are zero with `view_mask` False:

    source_image        (B, N, S, S, 3)  float32 in [0, 1]  (augmented if configured)
    source_mask         (B, N, S, S)     float32 in [0, 1]  foreground alpha
    source_uv           (B, N, S, S, 2)  float32 image UV in [0, 1] (0 where invalid)
    source_uv_valid     (B, N, S, S)     bool    (all False if the dataset has no UV maps)
    view_mask           (B, N)           bool    real source views
    target_image        (B, N_d, S, S, 3) float32 in [0, 1]  (never augmented)
    target_mask         (B, N_d, S, S)   float32 in [0, 1]
    target_expression   (B, N_d, E)      float32
    target_pose         (B, N_d, 5, 3)   float32 axis-angle rows global, neck, jaw, eyes
    target_translation  (B, N_d, 3)      float32
    target_viewmat      (B, N_d, 4, 4)   float32 OpenCV world-to-camera
    target_intrinsics   (B, N_d, 3, 3)   float32 pixels of the S x S image
    shape               (B, S')          float32 the identity's shape coefficients
    dataset, subject    (B,)             int32 source index, subject index in its table
    source_records      (B, N)           int32 record indices (-1 where padded)
    target_records      (B, N_d)         int32
    monocular           (B,)             bool    sources from one camera
    step                (B,)             int32

Every process builds the batch rows of its own devices: the local batch (B / P
rows for P processes, numpy, images and masks still uint8) comes from a grain
dataset of this process's identities only, and `GlobalBatchIterator` turns it
into global arrays (`jax.make_array_from_process_local_data`, the batch axis
split over the mesh axes of the logical "batch" axis), then to float on device.

Determinism: element k of a process's dataset is step k // (B / P), slot
k % (B / P); its draws come from (seed, step, global slot) and its bucket from
(seed, step) only (`sampling.bucket_of_step`), so hosts agree on every step's
shapes, and a restored iterator (`get_state`/`set_state`, or orbax through
`grain.checkpoint.CheckpointSave`) yields exactly the batches an uninterrupted run
would, with any number of worker processes.

Image size: a dataset stored at another size than `image_size` is resized on
read (images and masks bilinear with antialiasing, UV maps nearest, intrinsics
scaled), so datasets of several sizes can mix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import numpy as np
from absl import logging
from PIL import Image

from uika_jax.data.augment import AugmentConfig, augment_views
from uika_jax.data.global_batches import GlobalBatchIterator
from uika_jax.data.sampling import (
    AUGMENT_STREAM,
    SAMPLE_STREAM,
    bucket_of_step,
    build_catalogue,
    check_buckets,
    default_bucket_weights,
    draw_frames,
    draw_view_count,
    stream_rng,
)
from uika_jax.data.shards import MANIFEST_FILE, ShardSource
from uika_jax.data.sources import FolderSource
from uika_jax.sharding import Rules

TARGET_PARAMETERS = ("expression", "pose", "translation", "viewmat", "intrinsics")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline draws and how it reads (the training config fills it).

    Attributes:
      image_size: S of every image in a batch (`model.image_size`).
      num_drive: N_d target frames per sample (`model.num_drive`).
      global_batch_size: samples per step over all processes (`optim.batch_size`).
      buckets: padded source view counts, ascending; the last is N_ref (`model.num_views`).
      bucket_weights: probability of each bucket per step; None: uniform view count.
      monocular_probability: chance that a sample's sources come from one camera
        (assumed 0.5: the paper mixes monocular and multi-view inputs without a ratio).
      mixing_weights: per source; None: equal.
      split: "train", "val" or "test" (subjects of that split only).
      seed: every draw's seed.
      num_steps: length of the dataset in steps.
      workers: grain worker processes (0: read in this process).
      read_threads: threads reading batches ahead in each reading process (0: none).
      prefetch_batches: batches each reading process keeps ready (raised to read_threads).
      augment: photometric augmentation of the sources; None: off.
      skip_bad_frames: `Pipeline.open` leaves a folder's bad frames out (counted).
    """

    image_size: int
    num_drive: int
    global_batch_size: int
    buckets: tuple[int, ...] = (1, 4, 16)
    bucket_weights: tuple[float, ...] | None = None
    monocular_probability: float = 0.5
    mixing_weights: tuple[float, ...] | None = None
    split: str = "train"
    seed: int = 0
    num_steps: int = 1 << 32
    workers: int = 0
    read_threads: int = 4
    prefetch_batches: int = 4
    augment: AugmentConfig | None = None
    skip_bad_frames: bool = False

    def __post_init__(self):
        check_buckets(self.buckets, self.bucket_weights or default_bucket_weights(self.buckets))
        if not 0.0 <= self.monocular_probability <= 1.0:
            raise ValueError(f"monocular_probability {self.monocular_probability} not in [0, 1]")
        for name in ("image_size", "num_drive", "global_batch_size", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"PipelineConfig.{name} must be positive, got {getattr(self, name)}"
                )

    @property
    def step_bucket_weights(self) -> tuple[float, ...]:
        """The bucket weights in use (the default when none are configured)."""
        return self.bucket_weights or default_bucket_weights(self.buckets)


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """Which frames make one sample (no pixels read)."""

    step: int
    slot: int
    views: int
    dataset: int
    subject: int
    monocular: bool
    sources: np.ndarray
    targets: np.ndarray


def _resize(array: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), resample, reducing_gap=None))


def fit_record(record: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A record resized to `size` (module docstring); unchanged if it has that size."""
    old = record["image"].shape[0]
    if old == size:
        return record
    nearest = ((np.arange(size) + 0.5) * old / size).astype(np.int64)
    out = dict(record)
    out["image"] = _resize(record["image"], size, Image.Resampling.BILINEAR)
    out["mask"] = _resize(record["mask"], size, Image.Resampling.BILINEAR)
    for key in ("uv", "uv_valid"):
        if key in record:
            out[key] = record[key][nearest][:, nearest]
    intrinsics = record["intrinsics"].copy()
    intrinsics[:2] *= size / old
    out["intrinsics"] = intrinsics
    return out


class SampleReader:
    """Element k of a process's dataset: plans it, reads its frames, assembles the sample.

    Picklable: grain worker processes each get a copy.
    """

    def __init__(
        self,
        sources: Sequence,
        catalogues: Sequence,
        config: PipelineConfig,
        *,
        mixing: np.ndarray,
        process_index: int,
        local_batch_size: int,
    ):
        """Keeps what plans and reads need.

        Args:
          sources: the frame sources.
          catalogues: per source, this process's `Catalogue` (None where never drawn).
          config: the pipeline's config.
          mixing: per source, the probability that a sample comes from it.
          process_index: this process.
          local_batch_size: samples per step on this process.
        """
        self.sources = list(sources)
        self.catalogues = list(catalogues)
        self.config = config
        self.mixing = mixing
        self.process_index = process_index
        self.local_batch_size = local_batch_size

    def plan(self, index: int) -> SamplePlan:
        """The frames of element `index` (module docstring: step, slot and draws)."""
        config = self.config
        step, slot = divmod(int(index), self.local_batch_size)
        slot += self.process_index * self.local_batch_size
        bucket = bucket_of_step(config.seed, step, config.step_bucket_weights)
        rng = stream_rng(config.seed, SAMPLE_STREAM, step, slot)
        dataset = int(rng.choice(len(self.mixing), p=self.mixing))
        count = draw_view_count(rng, config.buckets, bucket)
        monocular = bool(rng.random() < config.monocular_probability)
        catalogue = self.catalogues[dataset]
        identity, sources, targets = draw_frames(catalogue, rng, count, config.num_drive, monocular)
        return SamplePlan(
            step=step,
            slot=slot,
            views=config.buckets[bucket],
            dataset=dataset,
            subject=int(catalogue.subjects[identity]),
            monocular=monocular,
            sources=sources,
            targets=targets,
        )

    def _read(self, dataset: int, records: np.ndarray) -> list[dict[str, np.ndarray]]:
        size = self.config.image_size
        source = self.sources[dataset]
        keys = [int(r) for r in records]
        read_many = getattr(source, "__getitems__", None)
        out = []
        for frame in read_many(keys) if read_many else [source[k] for k in keys]:
            frame = fit_record(frame, size)
            if "uv" not in frame:
                frame = {
                    **frame,
                    "uv": np.zeros((size, size, 2), np.float32),
                    "uv_valid": np.zeros((size, size), bool),
                }
            out.append(frame)
        return out

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        """The sample of element `index`: the module docstring's layout without B, uint8 images."""
        return self.assemble(self.plan(index))

    def assemble(self, plan: SamplePlan) -> dict[str, np.ndarray]:
        """The sample of a plan: reads its frames (module docstring's layout without B)."""
        sources = self._read(plan.dataset, plan.sources)
        targets = self._read(plan.dataset, plan.targets)
        count = len(sources)
        images = np.stack([r["image"] for r in sources])
        if self.config.augment is not None:
            rng = stream_rng(self.config.seed, AUGMENT_STREAM, plan.step, plan.slot)
            images = augment_views(images, rng, self.config.augment)

        def padded(values, dtype, fill=0) -> np.ndarray:
            values = np.asarray(values, dtype)
            out = np.full((plan.views, *values.shape[1:]), fill, dtype)
            out[:count] = values
            return out

        return {
            "source_image": padded(images, np.uint8),
            "source_mask": padded([r["mask"] for r in sources], np.uint8),
            "source_uv": padded([r["uv"] for r in sources], np.float32),
            "source_uv_valid": padded([r["uv_valid"] for r in sources], bool),
            "view_mask": np.arange(plan.views) < count,
            "target_image": np.stack([r["image"] for r in targets]),
            "target_mask": np.stack([r["mask"] for r in targets]),
            **{
                f"target_{key}": np.stack([r[key] for r in targets]).astype(np.float32)
                for key in TARGET_PARAMETERS
            },
            "shape": targets[0]["shape"].astype(np.float32),
            "dataset": np.int32(plan.dataset),
            "subject": np.int32(plan.subject),
            "source_records": padded(plan.sources, np.int32, -1),
            "target_records": plan.targets.astype(np.int32),
            "monocular": np.bool_(plan.monocular),
            "step": np.int32(plan.step),
        }


def open_source(path: str | Path, *, fingerprint: str | None = None, skip_bad_frames: bool = False):
    """A dataset folder (`FolderSource`) or packed shards (`ShardSource`, `shards.json` there).

    Args:
      path: the folder (or a shard set's `shards.json`).
      fingerprint: the configured head model's fingerprint; another one is an error.
      skip_bad_frames: a folder's bad frames left out and counted (shards hold only the
        frames their pack kept, its skipped frames counted in `num_skipped`).

    Raises:
      FileNotFoundError, DatasetFormatError: naming the file, as the sources do.
    """
    path = Path(path)
    if path.name == MANIFEST_FILE or (path / MANIFEST_FILE).is_file():
        return ShardSource(path, fingerprint=fingerprint)
    return FolderSource(path, fingerprint=fingerprint, skip_bad_frames=skip_bad_frames)


def _origin(source, i: int) -> str:
    return str(getattr(source, "root", f"source {i}"))


class Pipeline:
    """The training pipeline over one or more sources (module docstring)."""

    def __init__(
        self,
        sources: Sequence,
        config: PipelineConfig,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: Rules = (("batch", ("data", "fsdp")),),
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        """Builds each source's catalogue of this process's identities.

        Args:
          sources: frame sources (`FolderSource`, `ShardSource`, ...), opened already.
          config: the pipeline's config.
          mesh: the device mesh of global batches (needed only to iterate them).
          rules: logical axis rules; "batch" names the mesh axes of the batch.
          process_index: this process (default `jax.process_index()`).
          process_count: all processes (default `jax.process_count()`).

        Raises:
          ValueError: on sources of different head models, weights that do not match the
            sources, a batch that does not split over the processes, or a split with
            fewer usable identities than processes.
        """
        self.config = config
        self.mesh, self.rules = mesh, rules
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if config.global_batch_size % self.process_count:
            raise ValueError(
                f"global batch {config.global_batch_size} does not split over "
                f"{self.process_count} processes"
            )
        self.local_batch_size = config.global_batch_size // self.process_count
        heads = {s.index.head_model for s in sources}
        if len(heads) != 1:
            raise ValueError(
                f"sources of different head models cannot mix: {sorted(map(str, heads))}"
            )
        weights = np.asarray(config.mixing_weights or (1.0,) * len(sources), np.float64)
        if weights.shape != (len(sources),) or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(
                f"mixing_weights {config.mixing_weights} must be one non-negative weight per "
                f"source ({len(sources)}), not all zero"
            )
        self.sources = list(sources)
        self.catalogues = [
            None
            if weight == 0
            else build_catalogue(
                source.table,
                split=config.split,
                min_records=1 + config.num_drive,
                process_index=self.process_index,
                process_count=self.process_count,
                seed=config.seed,
                origin=_origin(source, i),
            )
            for i, (source, weight) in enumerate(zip(sources, weights, strict=True))
        ]
        self.reader = SampleReader(
            self.sources,
            self.catalogues,
            config,
            mixing=weights / weights.sum(),
            process_index=self.process_index,
            local_batch_size=self.local_batch_size,
        )
        logging.info("data pipeline, process %d of %d:\n%s", self.process_index,
                     self.process_count, self.summary())  # fmt: skip

    @classmethod
    def open(
        cls,
        paths: Sequence[str | Path],
        config: PipelineConfig,
        *,
        fingerprint: str | None = None,
        **kwargs,
    ) -> Pipeline:
        """Opens dataset folders or shard sets (`open_source`) and builds their pipeline.

        Args:
          paths: one per source, in the order of `config.mixing_weights`.
          config: the pipeline's config (its `skip_bad_frames` applies to folders).
          fingerprint: the configured head model's fingerprint; another one is an error.
          **kwargs: `mesh`, `rules`, `process_index`, `process_count` as in the constructor.
        """
        sources = [
            open_source(p, fingerprint=fingerprint, skip_bad_frames=config.skip_bad_frames)
            for p in paths
        ]
        return cls(sources, config, **kwargs)

    def summary(self) -> str:
        """Per source: identities read here, sequences too short, bad frames skipped."""
        lines = []
        for i, (source, catalogue) in enumerate(zip(self.sources, self.catalogues, strict=True)):
            skipped = getattr(source, "num_skipped", 0)
            if catalogue is None:
                lines.append(f"  {_origin(source, i)}: weight 0, not read")
                continue
            lines.append(
                f"  {_origin(source, i)}: {catalogue.num_identities} of "
                f"{catalogue.num_identities_total} {self.config.split} identities on this "
                f"process; {catalogue.num_excluded_sequences} sequences with fewer than "
                f"{1 + self.config.num_drive} frames left out; {skipped} bad frames skipped"
            )
        return "\n".join(lines)

    def bucket(self, step: int) -> int:
        """The padded source view count N of a step (the same on every process)."""
        weights = self.config.step_bucket_weights
        return self.config.buckets[bucket_of_step(self.config.seed, step, weights)]

    def plan(self, step: int, slot: int) -> SamplePlan:
        """The frames of local slot `slot` (0 .. local batch - 1) of a step."""
        return self.reader.plan(step * self.local_batch_size + slot)

    def dataset(self) -> grain.IterDataset:
        """This process's local batches (numpy, images uint8) as a grain dataset."""
        config = self.config
        batches = (
            grain.MapDataset.range(config.num_steps * self.local_batch_size)
            .map(self.reader)
            .batch(self.local_batch_size, drop_remainder=True)
        )
        read = grain.ReadOptions(
            num_threads=config.read_threads,
            prefetch_buffer_size=max(config.prefetch_batches, config.read_threads),
        )
        out = batches.to_iter_dataset(read)
        if config.workers:
            options = grain.MultiprocessingOptions(
                num_workers=config.workers, per_worker_buffer_size=config.prefetch_batches
            )
            out = out.mp_prefetch(options)
        return out

    def local_iterator(self) -> grain.DatasetIterator:
        """An iterator over this process's local batches (checkpointable grain iterator)."""
        return iter(self.dataset())

    def __iter__(self) -> GlobalBatchIterator:
        """Global batches on `mesh` (module docstring's layout), from step 0."""
        if self.mesh is None:
            raise ValueError("Pipeline(mesh=...) is needed to build global batches")
        return GlobalBatchIterator(
            self.local_iterator(),
            self.mesh,
            self.rules,
            self.config.global_batch_size,
            self.local_batch_size,
        )
