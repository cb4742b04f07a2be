"""Periodic evaluation during training: a fixed set of validation samples, head-region metrics.

The set (`EvalSet.build`) is the same at every evaluation and in every run of a config:
the first `eval.identities` validation identities (by subject index) of the first
training source, each a sample of its first usable sequence with `model.num_views`
source views round-robin over its cameras and `model.num_drive` other frames as
targets, drawn by a generator seeded with (`eval.seed`, identity). The test split is
left for `evaluate.py`.

`Evaluator.__call__(params, rest)` reconstructs every sample from its sources with the
estimator's own UV maps (no ground-truth UV), renders the targets over the configured
background, and returns `head_region_metrics` averaged over target frames and samples:

    eval/psnr, eval/ssim, eval/lpips         own sources
    eval/psnr_other_sources                  sample i's targets rendered from the
                                             sources of the next sample (another identity)
    eval/psnr_own_minus_other                how much the model uses its inputs
    eval/uv_error, eval/face_iou             the estimator on the sources: mean |UV -
                                             ground truth| on head pixels, and the IoU
                                             of its face mask (probability > threshold)
                                             with the ground-truth head mask

plus the first batch's images for a picture grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uika_jax import sharding
from uika_jax.data.global_batches import to_unit_float
from uika_jax.data.pipeline import PipelineConfig, SamplePlan, SampleReader
from uika_jax.data.sampling import build_catalogue, draw_frames, stream_rng
from uika_jax.evaluation.image_metrics import head_region_metrics
from uika_jax.render import RasterConfig
from uika_jax.training.losses import LpipsFn, composite
from uika_jax.training.step import StepAssets, render_targets

EVAL_STREAM = 7
"""The random stream of the evaluation set's draws (distinct from the pipeline's)."""


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Fixed evaluation samples, stacked into equal batches.

    Attributes:
      batches: per batch, the pipeline's layout with images as float32 in [0, 1].
      weights: (num batches, batch size) 1 for real samples, 0 for padding repeats.
      subjects: the subject ids of the samples, in order.
    """

    batches: tuple[dict[str, np.ndarray], ...]
    weights: np.ndarray
    subjects: tuple[str, ...]

    @classmethod
    def build(cls, source: Any, config: ml_collections.ConfigDict) -> EvalSet:
        """The set of a config on a source (module docstring).

        Args:
          source: a frame source (`FolderSource`, `ShardSource`).
          config: the run's config (`model`, `eval`).

        Raises:
          ValueError: if the source has fewer than two usable validation identities.
        """
        m, ev = config.model, config.eval
        pipeline_config = PipelineConfig(
            image_size=m.image_size,
            num_drive=m.num_drive,
            global_batch_size=1,
            buckets=(m.num_views,),
            split="val",
            seed=int(ev.seed),
        )
        catalogue = build_catalogue(
            source.table,
            split="val",
            min_records=1 + m.num_drive,
            process_index=0,
            process_count=1,
            seed=int(ev.seed),
            origin=str(getattr(source, "root", "the evaluation source")),
        )
        count = min(int(ev.identities), catalogue.num_identities)
        if count < 2:
            raise ValueError(
                f"periodic evaluation needs at least 2 validation identities, the source has "
                f"{catalogue.num_identities}: give the dataset a val split"
            )
        reader = SampleReader(
            [source],
            [catalogue],
            pipeline_config,
            mixing=np.ones(1),
            process_index=0,
            local_batch_size=1,
        )
        samples = []
        for identity in range(count):
            rng = stream_rng(int(ev.seed), EVAL_STREAM, identity)
            _, sources, targets = draw_frames(
                catalogue, rng, m.num_views, m.num_drive, monocular=False, identity=identity
            )
            plan = SamplePlan(
                step=0,
                slot=identity,
                views=m.num_views,
                dataset=0,
                subject=int(catalogue.subjects[identity]),
                monocular=False,
                sources=sources,
                targets=targets,
            )
            samples.append(reader.assemble(plan))
        size = int(ev.batch_size)
        num_batches = -(-count // size)
        order = [i % count for i in range(num_batches * size)]
        weights = (np.arange(num_batches * size) < count).astype(np.float32)
        batches = tuple(
            _stack([samples[i] for i in order[b * size : (b + 1) * size]])
            for b in range(num_batches)
        )
        subjects = tuple(source.table.subjects[s["subject"]] for s in samples)
        return cls(batches, weights.reshape(num_batches, size), subjects)


def _stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return to_unit_float({key: np.stack([s[key] for s in samples]) for key in samples[0]})


def _other_sources(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch with each sample's sources replaced by the next sample's."""
    keys = ("source_image", "source_mask", "source_uv", "source_uv_valid", "view_mask")
    return {**batch, **{k: jnp.roll(batch[k], 1, axis=0) for k in keys}}


def _estimator_errors(
    pred: Any, batch: Mapping[str, jax.Array], b: int, threshold: float
) -> dict[str, jax.Array]:
    """Per sample: mean |UV - ground truth| on head pixels, face-mask IoU (real views)."""
    uv, face = pred.uv[:b], pred.face_prob[:b][..., 0] > threshold
    truth = batch["source_uv_valid"]
    views = batch["view_mask"][:, :, None, None]
    head = truth & views
    error = jnp.sum(jnp.abs(uv - batch["source_uv"]).mean(-1) * head, axis=(1, 2, 3))
    inter = jnp.sum(face & head, axis=(1, 2, 3))
    union = jnp.sum((face | truth) & views, axis=(1, 2, 3))
    return {
        "uv_error": error / jnp.maximum(jnp.sum(head, axis=(1, 2, 3)), 1),
        "face_iou": inter / jnp.maximum(union, 1),
    }


class Evaluator:
    """Evaluates a state's weights on an `EvalSet` (module docstring)."""

    def __init__(
        self,
        eval_set: EvalSet,
        config: ml_collections.ConfigDict,
        graphdef: nnx.GraphDef,
        assets: StepAssets,
        raster: RasterConfig,
        mesh: jax.sharding.Mesh,
        rules: sharding.Rules,
        lpips_fn: LpipsFn | None = None,
    ):
        """Places the set on the mesh and jits the evaluation.

        Args:
          eval_set: the fixed samples.
          config: the run's config.
          graphdef: the model's graph.
          assets: the head model, anchors and LPIPS weights (LPIPS computed when
            `lpips_fn` is given).
          raster: the rasterizer's settings.
          mesh: the device mesh.
          rules: the logical axis rules (the batch axis).
          lpips_fn: `load_lpips()[0]`, or None to leave LPIPS out.
        """
        self.eval_set = eval_set
        self.assets = assets
        self.batches = [sharding.shard_batch(b, mesh, rules) for b in eval_set.batches]
        replicated = NamedSharding(mesh, PartitionSpec())
        self.weights = [jax.device_put(w, replicated) for w in eval_set.weights]
        background = jnp.asarray(config.render.background, jnp.float32)
        self.background = background
        use_shape = bool(config.head.use_dataset_shape)
        threshold = float(config.model.correspondence.threshold)

        def evaluate(params, rest, batch, assets):
            model = nnx.merge(graphdef, params, rest)
            lpips = None if lpips_fn is None else (lpips_fn, assets.lpips_params)
            # Own and other sources as one batch of 2B: one program, compiled once.
            both = jax.tree.map(
                lambda own, other: jnp.concatenate([own, other]), batch, _other_sources(batch)
            )
            out, rendered = render_targets(
                model, both, assets, background=background, raster=raster, use_shape=use_shape
            )
            metrics = head_region_metrics(
                rendered.images, both["target_image"], both["target_mask"], background,
                lpips=lpips,
            )  # fmt: skip
            b = batch["target_image"].shape[0]
            own = {k: jnp.mean(v[:b], axis=1) for k, v in metrics.items()}
            other = jnp.mean(metrics["psnr"][b:], axis=1)
            return {
                **own,
                "psnr_other_sources": other,
                **_estimator_errors(out.correspondence, batch, b, threshold),
            }, rendered.images[:b]

        self._evaluate = jax.jit(evaluate)
        self._mesh = mesh

    def _composited_targets(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        image, mask = batch["target_image"], batch["target_mask"]
        return np.asarray(composite(image, mask, self.background))

    def __call__(self, params: Any, rest: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metrics of the weights and the first batch's pictures.

        Returns:
          ({"eval/psnr", ...}: floats, {"sources", "source_mask", "prediction",
          "ground_truth"}: the first batch's arrays on host, the ground truth composited
          with its mask onto the render's background).
        """
        totals: dict[str, float] = {}
        pictures = {}
        with jax.set_mesh(self._mesh):
            for i, (batch, weights) in enumerate(zip(self.batches, self.weights, strict=True)):
                metrics, images = self._evaluate(params, rest, batch, self.assets)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(jnp.sum(v * weights))
                if i == 0:
                    first = self.eval_set.batches[0]
                    pictures = {
                        "sources": first["source_image"],
                        "source_mask": first["view_mask"],
                        "prediction": sharding.to_host(images),
                        "ground_truth": self._composited_targets(first),
                    }
        count = float(self.eval_set.weights.sum())
        out = {f"eval/{k}": v / count for k, v in totals.items()}
        out["eval/psnr_own_minus_other"] = out["eval/psnr"] - out["eval/psnr_other_sources"]
        return out, pictures
