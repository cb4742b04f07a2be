"""Scoring a protocol: per-sample image and face metrics of its rendered batches.

Self-reenactment samples get every metric: PSNR, SSIM (SAME and VALID) and LPIPS (VGG,
AlexNet) on the head region (`image_metrics`: prediction and ground truth composited
with the ground-truth mask onto one background), and CSIM, AKD, APD and AED between
the composited prediction and ground truth. Cross-reenactment samples have no ground
truth: CSIM compares the render with the reconstructed identity's first source, and
AKD / APD / AED compare it with the driving frame (the driver's image, which has the
motion the render should have).

A sample's value of a metric is the mean over its target frames; a face metric's
frames without a detected face are left out of that mean (counted in the detection
rate), and a sample with none is left out of the metric's mean (its value None).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uika_jax.evaluation.face_metrics import FaceBackends, face_metrics
from uika_jax.evaluation.image_metrics import IMAGE_METRIC_BACKENDS, ImageMetricEvaluator
from uika_jax.evaluation.manifest import SampleSpec, is_cross
from uika_jax.evaluation.reenactment import RenderedBatch
from uika_jax.evaluation.report import ProtocolResult

FACE_METRICS = {"CSIM": "csim", "AKD": "akd", "APD": "apd", "AED": "aed"}
"""`face_metrics`' names -> the report's metric keys."""


def sample_id(spec: SampleSpec) -> str:
    """A sample's label (and file name): "SUBJECT", or "SUBJECT_driven_by_DRIVER"."""
    return spec.subject if spec.driver is None else f"{spec.subject}_driven_by_{spec.driver}"


@dataclasses.dataclass
class _FaceTally:
    backend: str = ""
    detected: int = 0
    total: int = 0


class ProtocolScorer:
    """Accumulates the per-sample metrics of one protocol's batches (module docstring)."""

    def __init__(
        self,
        protocol: str,
        background: np.ndarray,
        image_metrics: ImageMetricEvaluator,
        faces: FaceBackends | None,
    ):
        """Starts an empty tally.

        Args:
          protocol: the protocol's name (`manifest.PROTOCOLS`).
          background: (3,) the colour renders and targets are composited onto.
          image_metrics: the image metric evaluator (unused for cross protocols).
          faces: the face-model backends; None leaves the face metrics out.
        """
        self.protocol = protocol
        self.cross = is_cross(protocol)
        self.background = np.asarray(background, np.float32)
        self.image_metrics = image_metrics
        self.faces = faces
        self.ids: list[str] = []
        self.values: dict[str, list[float | None]] = {}
        self.face_tally = {key: _FaceTally() for key in FACE_METRICS.values()}
        self.dropped = 0

    def add(self, batch: RenderedBatch) -> None:
        """Scores one rendered batch."""
        b, f = batch.predictions.shape[:2]
        self.ids += [sample_id(s) for s in batch.specs]
        self.dropped += batch.dropped
        column: dict[str, np.ndarray] = {}
        if not self.cross:
            per_frame = self.image_metrics(
                batch.predictions, batch.targets, batch.target_masks, self.background
            )
            column.update({k: v.mean(axis=1) for k, v in per_frame.items()})
        if self.faces is not None:
            column.update(self._face_columns(batch, b, f))
        for key, values in column.items():
            self.values.setdefault(key, []).extend(
                None if not np.isfinite(v) else float(v) for v in values
            )

    def _face_columns(self, batch: RenderedBatch, b: int, f: int) -> dict[str, np.ndarray]:
        size = batch.predictions.shape[2:]
        if self.cross:
            predictions = batch.predictions
            motion = batch.targets
            first_source = batch.sources[:, :1]
            identity = np.broadcast_to(first_source, (b, f, *size)).reshape(b * f, *size)
        else:
            predictions = batch.composited_predictions
            motion = batch.composited_targets
            identity = None
        metrics = face_metrics(
            predictions.reshape(b * f, *size),
            motion.reshape(b * f, *size),
            self.faces,
            identity_references=identity,
            K=batch.target_intrinsics.reshape(b * f, 3, 3),
        )
        out = {}
        for name, metric in metrics.items():
            key = FACE_METRICS[name]
            tally = self.face_tally[key]
            tally.backend = metric.backend
            if not metric.available:  # n/a: its backend says why, no detection rate
                continue
            tally.detected += metric.detected_pairs
            tally.total += metric.total
            per_sample = metric.values.reshape(b, f)
            with np.errstate(invalid="ignore"):
                counts = np.sum(np.isfinite(per_sample), axis=1)
                sums = np.nansum(per_sample, axis=1)
                out[key] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        return out

    def result(self, name: str, manifest: str | None) -> ProtocolResult:
        """The protocol's row for the report."""
        backends = {} if self.cross else dict(IMAGE_METRIC_BACKENDS)
        rates = {}
        for key, tally in self.face_tally.items():
            if tally.backend:
                backends[key] = tally.backend
            if tally.total:
                rates[key] = tally.detected / tally.total
        return ProtocolResult(
            name=name,
            sample_ids=tuple(self.ids),
            values={k: v for k, v in self.values.items()},
            backends=backends,
            detection_rates=rates,
            manifest=manifest,
        )
