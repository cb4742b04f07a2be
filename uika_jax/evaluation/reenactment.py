"""Running a protocol's samples: reconstruct from the sources, drive with the targets, render.

`Reenactor` reads each `SampleSpec`'s frames from the dataset (`SampleReader.assemble`,
the training pipeline's layout: one code path for both), pads the sources to a fixed
view count with a view mask and the samples to a fixed batch size (repeats of the last
sample, dropped from the results), so every protocol, view count and batch runs one
compiled program. Reconstruction uses the estimator's own UV maps (no ground truth).
The targets are rendered with the driving frames' FLAME parameters and cameras over
`render.background`: for a cross-reenactment sample those are the driver's frames, so
its `targets` images show the driver (for motion metrics), never the reconstructed
identity; its shape coefficients (used with `head.use_dataset_shape`) are the
reconstructed identity's.

The rasterizer's capacity is calibrated once for the largest Gaussians the head can
make (`uika_jax.training.raster_budget.raster_config`, as training does), and the
intersections it drops are counted per batch and reported, never silently lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uika_jax.data.global_batches import to_unit_float
from uika_jax.data.pipeline import PipelineConfig, SamplePlan, SampleReader
from uika_jax.evaluation.manifest import FrameIndex, SampleSpec
from uika_jax.evaluation.trained_model import TrainedModel
from uika_jax.render import RasterConfig
from uika_jax.training.losses import composite
from uika_jax.training.raster_budget import raster_config
from uika_jax.training.step import StepAssets, render_targets


@dataclasses.dataclass(frozen=True)
class RenderedBatch:
    """One batch of a protocol on host (real samples only).

    Attributes:
      specs: the samples.
      sources: (b, N, S, S, 3) source images in [0, 1] (padded views are zero).
      view_mask: (b, N) real source views.
      predictions: (b, F, S, S, 3) the renders over the background.
      targets: (b, F, S, S, 3) the driving frames' images.
      target_masks: (b, F, S, S) their head masks in [0, 1].
      composited_targets: (b, F, S, S, 3) the targets composited onto the background.
      composited_predictions: (b, F, S, S, 3) the renders composited the same way (with
        the targets' masks): what the head-region metrics and error maps compare.
      target_intrinsics: (b, F, 3, 3) the targets' cameras' intrinsics (pixels).
      dropped: rasterizer intersections dropped in this batch (0 unless it overflowed).
    """

    specs: tuple[SampleSpec, ...]
    sources: np.ndarray
    view_mask: np.ndarray
    predictions: np.ndarray
    targets: np.ndarray
    target_masks: np.ndarray
    composited_targets: np.ndarray
    composited_predictions: np.ndarray
    target_intrinsics: np.ndarray
    dropped: int


class Reenactor:
    """Renders the samples of a protocol with a trained model (module docstring)."""

    def __init__(self, trained: TrainedModel, source: Any, *, batch_size: int, num_views: int):
        """Prepares the reading and the compiled forward pass.

        Args:
          trained: the model, its config, head model and anchors.
          source: the dataset (`uika_jax.data.pipeline.open_source`) the manifest names.
          batch_size: samples per forward pass.
          num_views: the padded source view count (at most `model.num_views`).
        """
        config = trained.config
        m = config.model
        if not 1 <= num_views <= m.num_views:
            raise ValueError(f"num_views {num_views} not in [1, model.num_views={m.num_views}]")
        self.config = config
        self.batch_size = int(batch_size)
        self.num_views = int(num_views)
        self.source = source
        self.frames = FrameIndex(source.table)
        self.origin = str(getattr(source, "root", "the evaluation dataset"))
        self.reader = SampleReader(
            [source],
            [None],
            PipelineConfig(
                image_size=m.image_size,
                num_drive=m.num_drive,
                global_batch_size=1,
                buckets=(m.num_views,),
                read_threads=0,
            ),
            mixing=np.ones(1),
            process_index=0,
            local_batch_size=1,
        )
        self.background = jnp.asarray(config.render.background, jnp.float32)
        self.assets = StepAssets(trained.head, trained.anchors)
        self.graphdef, self.state = nnx.split(trained.model)
        self._raster: RasterConfig | None = None
        self._render = None

    def _sample(self, spec: SampleSpec) -> dict[str, np.ndarray]:
        sources = self.frames.resolve(spec.sources[: self.num_views], self.origin)
        targets = self.frames.resolve(spec.targets, self.origin)
        plan = SamplePlan(
            step=0,
            slot=0,
            views=self.num_views,
            dataset=0,
            subject=int(self.source.table.subject[sources[0]]),
            monocular=False,
            sources=sources,
            targets=targets,
        )
        sample = self.reader.assemble(plan)
        if spec.driver is not None:  # the reconstructed identity's shape, not the driver's
            sample["shape"] = self.source[int(sources[0])]["shape"].astype(np.float32)
        return sample

    def _compiled(self, batch: dict[str, jax.Array]):
        if self._render is None:
            head, anchors = self.assets.head, self.assets.anchors
            self._raster = raster_config(self.config, head, anchors, batch)
            graphdef, background, raster = self.graphdef, self.background, self._raster
            use_shape = bool(self.config.head.use_dataset_shape)

            @jax.jit
            def render(state, batch, assets):
                model = nnx.merge(graphdef, state)
                _, rendered = render_targets(
                    model, batch, assets, background=background, raster=raster,
                    use_shape=use_shape,
                )  # fmt: skip
                dropped = jnp.sum(rendered.meta["isects_dropped"])
                return rendered.images, dropped

            self._render = render
        return self._render

    def batches(self, specs: Sequence[SampleSpec]) -> Iterator[RenderedBatch]:
        """The rendered batches of `specs`, in order."""
        for start in range(0, len(specs), self.batch_size):
            chunk = tuple(specs[start : start + self.batch_size])
            samples = [self._sample(s) for s in chunk]
            samples += [samples[-1]] * (self.batch_size - len(samples))
            batch = to_unit_float({k: np.stack([s[k] for s in samples]) for k in samples[0]})
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            images, dropped = self._compiled(batch)(self.state, batch, self.assets)
            b = len(chunk)
            masks = batch["target_mask"][:b]
            host = jax.device_get(
                {
                    "predictions": images[:b],
                    "composited": composite(batch["target_image"][:b], masks, self.background),
                    "composited_predictions": composite(images[:b], masks, self.background),
                }
            )
            yield RenderedBatch(
                specs=chunk,
                sources=np.asarray(batch["source_image"][:b]),
                view_mask=np.asarray(batch["view_mask"][:b]),
                predictions=np.asarray(host["predictions"]),
                targets=np.asarray(batch["target_image"][:b]),
                target_masks=np.asarray(batch["target_mask"][:b]),
                composited_targets=np.asarray(host["composited"]),
                composited_predictions=np.asarray(host["composited_predictions"]),
                target_intrinsics=np.asarray(batch["target_intrinsics"][:b]),
                dropped=int(dropped),
            )
