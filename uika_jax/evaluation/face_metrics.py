"""Face metrics: identity (CSIM), keypoints (AKD), head pose (APD) and expression (AED).

Every image is converted to uint8 and upsampled (bicubic, an integer factor) until its
shorter side is at least 256 px, then the face is detected and its 68 landmarks placed
once (`observe_faces`); all four metrics reuse that observation. Per sample pair
(prediction, reference):

* CSIM (higher is better): cosine similarity of the identity embeddings of the
  prediction and its identity reference (the ground truth in self-reenactment, the
  source in cross-reenactment);
* AKD (lower): mean L2 distance of the 68 landmarks, in pixels of the *input* images
  (detections are mapped back from the upsampled image; the unit names the size);
* APD (lower): angle in degrees of the relative rotation between the two head poses,
  each solved by PnP (`head_pose.solve_head_pose`) against the head model's 3D
  landmarks with the images' intrinsics;
* AED (lower): mean absolute difference of expression coefficients from a
  user-supplied regressor, else "n/a".

A face that is not detected is counted: the pair is left out of that metric's mean
(its value is NaN), and each `FaceMetric` carries its backend's name, how many pairs
it averages and how many images failed on each side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from uika_jax.evaluation.face_models import (
    ARCFACE_INPUT,
    MIN_DETECTION_SIZE,
    DlibFaceModels,
    ExpressionRegressor,
    IdentityEncoder,
    ImageInput,
    OnnxArcFace,
    OnnxExpressionRegressor,
    detection_image,
)
from uika_jax.evaluation.head_pose import (
    landmark_points,
    read_landmark_embedding,
    rotation_angle_deg,
    solve_head_pose,
    synthetic_landmark_embedding,
)
from uika_jax.head.model import HeadModel
from uika_jax.render.camera import DEFAULT_FOV_DEG, focal_from_fov

POSE_BACKEND = "PnP (OpenCV) on dlib 68-point"
"""APD's backend name (the 3D points' source is appended)."""


@dataclasses.dataclass(frozen=True)
class FaceObservation:
    """One detected face.

    Attributes:
      image: (H', W', 3) uint8 detection image (the input upsampled by `scale`).
      detected: (68, 2) landmarks as the detector returns them, in `image` pixels.
      scale: upsampling factor from the input image to `image`.
    """

    image: np.ndarray
    detected: np.ndarray
    scale: float

    @property
    def landmarks(self) -> np.ndarray:
        """(68, 2) landmarks in input-image pixels (pixel (i, j) centred at (j + .5, i + .5))."""
        return (self.detected + 0.5) / self.scale


@dataclasses.dataclass(frozen=True)
class FaceMetric:
    """One face metric over a batch of (prediction, reference) pairs.

    Attributes:
      name: "CSIM", "AKD", "APD" or "AED".
      backend: the model that measured it, or "n/a (...)" when it could not be measured.
      values: (N,) per-pair values; NaN where a face was not detected (or n/a).
      failed_prediction: predictions with no detected face.
      failed_reference: references with no detected face.
      detected_pairs: pairs with both faces detected.
      unit: the values' unit.
      higher_is_better: the metric's direction.
    """

    name: str
    backend: str
    values: np.ndarray
    failed_prediction: int
    failed_reference: int
    detected_pairs: int
    unit: str
    higher_is_better: bool

    @property
    def total(self) -> int:
        """Pairs given."""
        return len(self.values)

    @property
    def valid(self) -> int:
        """Pairs the mean averages (both faces detected, metric available)."""
        return int(np.sum(np.isfinite(self.values)))

    @property
    def available(self) -> bool:
        """Whether the metric had a backend (AED without a regressor does not)."""
        return not self.backend.startswith("n/a")

    @property
    def mean(self) -> float | None:
        """Mean over the valid pairs; None when there are none or the metric is n/a."""
        return float(np.nanmean(self.values)) if self.valid else None

    @property
    def detection_rate(self) -> float:
        """Fraction of pairs where both faces were detected."""
        return self.detected_pairs / max(self.total, 1)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary (for `metrics.json`)."""
        return {
            "name": self.name,
            "backend": self.backend,
            "available": self.available,
            "mean": self.mean,
            "unit": self.unit,
            "better": "higher" if self.higher_is_better else "lower",
            "valid": self.valid,
            "total": self.total,
            "detection_rate": self.detection_rate,
            "failed_prediction": self.failed_prediction,
            "failed_reference": self.failed_reference,
            "values": [None if math.isnan(v) else float(v) for v in self.values],
        }


def observe_faces(
    images: np.ndarray | Sequence[np.ndarray],
    models: DlibFaceModels,
    min_size: int = MIN_DETECTION_SIZE,
) -> list[FaceObservation | None]:
    """Detects the face and its 68 landmarks in each image (None where none is found).

    Args:
      images: (N, H, W, 3) float in [0, 1] or uint8, or a sequence of such images.
      models: the detector and landmark predictor.
      min_size: images are upsampled until their shorter side is at least this.
    """
    observations: list[FaceObservation | None] = []
    for image in images:
        upsampled, scale = detection_image(image, min_size)
        detected = models.landmarks(upsampled)
        observations.append(
            None if detected is None else FaceObservation(upsampled, detected, scale)
        )
    return observations


def _pairs(
    name: str, predictions: Sequence[FaceObservation | None], references: Sequence
) -> tuple[list[int], int, int]:
    """Indices of pairs with both faces detected, and the failures on each side."""
    if len(predictions) != len(references):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(references)} references")
    both = [i for i, (p, r) in enumerate(zip(predictions, references, strict=True)) if p and r]
    failed_prediction = sum(p is None for p in predictions)
    failed_reference = sum(r is None for r in references)
    return both, failed_prediction, failed_reference


def _metric(name, backend, values, predictions, references, unit, higher_is_better) -> FaceMetric:
    both, failed_prediction, failed_reference = _pairs(name, predictions, references)
    return FaceMetric(
        name,
        backend,
        values,
        failed_prediction,
        failed_reference,
        len(both),
        unit,
        higher_is_better,
    )


def csim(
    predictions: Sequence[FaceObservation | None],
    references: Sequence[FaceObservation | None],
    encoder: IdentityEncoder,
) -> FaceMetric:
    """CSIM: cosine similarity of identity embeddings, per pair.

    Args:
      predictions: observations of the predicted images.
      references: observations of the identity references (ground truth or source).
      encoder: the identity backend (`DlibFaceModels` or `OnnxArcFace`).
    """
    both, _, _ = _pairs("CSIM", predictions, references)
    values = np.full(len(predictions), np.nan)
    for i in both:
        a = encoder.embed(predictions[i].image, predictions[i].detected)
        b = encoder.embed(references[i].image, references[i].detected)
        values[i] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    return _metric("CSIM", encoder.name, values, predictions, references, "cosine", True)


def akd(
    predictions: Sequence[FaceObservation | None],
    references: Sequence[FaceObservation | None],
    image_size: tuple[int, int],
    backend: str = DlibFaceModels.landmark_name,
) -> FaceMetric:
    """AKD: mean L2 distance (pixels at `image_size`) of the 68 landmarks, per pair.

    Args:
      predictions: observations of the predicted images.
      references: observations of the motion references (ground truth / driving frames).
      image_size: (H, W) of the input images, named in the unit.
      backend: the landmark model's name.
    """
    both, _, _ = _pairs("AKD", predictions, references)
    values = np.full(len(predictions), np.nan)
    for i in both:
        values[i] = float(
            np.linalg.norm(predictions[i].landmarks - references[i].landmarks, axis=1).mean()
        )
    unit = f"px at {image_size[0]}x{image_size[1]}"
    return _metric("AKD", backend, values, predictions, references, unit, False)


def default_intrinsics(height: int, width: int) -> np.ndarray:
    """The project's face-framing camera (`render.camera.DEFAULT_FOV_DEG` vertically)."""
    focal = focal_from_fov(DEFAULT_FOV_DEG, height)
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def apd(
    predictions: Sequence[FaceObservation | None],
    references: Sequence[FaceObservation | None],
    points: np.ndarray | None,
    K: np.ndarray,
    backend: str = POSE_BACKEND,
) -> FaceMetric:
    """APD: angle (degrees) between the head poses solved by PnP, per pair.

    Args:
      predictions: observations of the predicted images.
      references: observations of the motion references.
      points: (68, 3) the head model's 3D landmarks (`head_pose.landmark_points`), or
        None to report n/a.
      K: (3, 3) intrinsics shared by every pair, or (N, 3, 3) one per pair (a pair's two
        images share its camera).
      backend: the pose backend's name, with the embedding's source.
    """
    values = np.full(len(predictions), np.nan)
    if points is None:
        backend = "n/a (no landmark embedding)"
    else:
        both, _, _ = _pairs("APD", predictions, references)
        K = np.broadcast_to(np.asarray(K, np.float64), (len(predictions), 3, 3))
        for i in both:
            rotation_p = solve_head_pose(predictions[i].landmarks, points, K[i])[0]
            rotation_r = solve_head_pose(references[i].landmarks, points, K[i])[0]
            values[i] = rotation_angle_deg(rotation_p, rotation_r)
    return _metric("APD", backend, values, predictions, references, "degrees", False)


def aed(
    predictions: Sequence[FaceObservation | None],
    references: Sequence[FaceObservation | None],
    regressor: ExpressionRegressor | None,
) -> FaceMetric:
    """AED: mean absolute difference of expression coefficients, per pair (n/a without one).

    Args:
      predictions: observations of the predicted images.
      references: observations of the motion references.
      regressor: the expression backend, or None.
    """
    values = np.full(len(predictions), np.nan)
    if regressor is None:
        backend = "n/a (no expression regressor given)"
    else:
        backend = regressor.name
        both, _, _ = _pairs("AED", predictions, references)
        for i in both:
            a = regressor.coefficients(predictions[i].image, predictions[i].detected)
            b = regressor.coefficients(references[i].image, references[i].detected)
            values[i] = float(np.abs(a - b).mean())
    return _metric("AED", backend, values, predictions, references, "coefficient L1", False)


@dataclasses.dataclass
class FaceBackends:
    """The backends `face_metrics` uses.

    Attributes:
      models: detector + 68 landmarks (+ the default identity embedding).
      identity: the CSIM backend; None uses `models` (dlib's ResNet).
      expression: the AED backend; None reports AED as n/a.
      points: (68, 3) 3D landmarks of the head model for APD; None reports APD as n/a.
      pose_source: where `points` came from (named in APD's backend).
      min_size: shorter side images are upsampled to before detection.
    """

    models: DlibFaceModels
    identity: IdentityEncoder | None = None
    expression: ExpressionRegressor | None = None
    points: np.ndarray | None = None
    pose_source: str = ""
    min_size: int = MIN_DETECTION_SIZE


def build_face_backends(
    model: HeadModel | None = None,
    *,
    landmark_embedding: str | Path | None = None,
    arcface: str | Path | None = None,
    arcface_input: ImageInput = ARCFACE_INPUT,
    expression: str | Path | None = None,
    min_size: int = MIN_DETECTION_SIZE,
) -> FaceBackends:
    """Assembles the backends from the user's files, with the offline defaults elsewhere.

    Args:
      model: the head model the evaluated avatars use (APD's 3D points live on its
        template); None reports APD as n/a.
      landmark_embedding: the model's 68-landmark embedding file (FLAME / DECA layouts,
        `head_pose.read_landmark_embedding`); None measures one on the built-in
        synthetic head (`head_pose.synthetic_landmark_embedding`: one render and one
        detection) and, for any other model, reports APD as n/a.
      arcface: an ArcFace ONNX file for CSIM; None uses dlib's ResNet embedding.
      arcface_input: its input layout and normalisation.
      expression: an ONNX expression regressor for AED; None reports AED as n/a.
      min_size: shorter side images are upsampled to before detection.

    Raises:
      FaceBackendError: if dlib or face-recognition-models (or onnxruntime, for a
        given ONNX file) is missing.
      FileNotFoundError, ValueError: a missing or malformed user file.
    """
    models = DlibFaceModels()
    points, pose_source = None, ""
    if model is not None and landmark_embedding is not None:
        embedding = read_landmark_embedding(landmark_embedding)
        points, pose_source = landmark_points(embedding, model), embedding.source
    elif model is not None and model.fingerprint.source == "synthetic":
        embedding = synthetic_landmark_embedding(model, models)
        points, pose_source = landmark_points(embedding, model), embedding.source
    return FaceBackends(
        models,
        identity=None if arcface is None else OnnxArcFace(arcface, arcface_input),
        expression=None if expression is None else OnnxExpressionRegressor(expression),
        points=points,
        pose_source=pose_source,
        min_size=min_size,
    )


def face_metrics(
    predictions: np.ndarray,
    motion_references: np.ndarray,
    backends: FaceBackends,
    *,
    identity_references: np.ndarray | None = None,
    K: np.ndarray | None = None,
) -> dict[str, FaceMetric]:
    """CSIM, AKD, APD and AED of a batch, detecting every image once.

    Args:
      predictions: (N, H, W, 3) predicted images (float in [0, 1] or uint8).
      motion_references: (N, H, W, 3) images whose pose and expression the
        predictions should have (ground truth, or the driving frames).
      backends: the face models.
      identity_references: (N, ...) images whose identity the predictions should have
        (the sources in cross-reenactment); None uses `motion_references`.
      K: (3, 3) or per pair (N, 3, 3) intrinsics of the images in their pixels; None uses
        `default_intrinsics` (the project's face framing).

    Returns:
      {"CSIM", "AKD", "APD", "AED"} -> `FaceMetric`.

    Raises:
      ValueError: if the batches' shapes disagree.
    """
    predictions, motion_references = np.asarray(predictions), np.asarray(motion_references)
    if predictions.ndim != 4 or predictions.shape != motion_references.shape:
        raise ValueError(
            f"predictions {predictions.shape} and references {motion_references.shape} must "
            "be the same (N, H, W, 3)"
        )
    height, width = predictions.shape[1:3]
    observed_p = observe_faces(predictions, backends.models, backends.min_size)
    observed_m = observe_faces(motion_references, backends.models, backends.min_size)
    if identity_references is None:
        observed_i = observed_m
    else:
        if len(identity_references) != len(predictions):
            raise ValueError(
                f"{len(identity_references)} identity references for {len(predictions)} predictions"
            )
        observed_i = observe_faces(identity_references, backends.models, backends.min_size)
    K = default_intrinsics(height, width) if K is None else np.asarray(K, np.float64)
    pose_backend = POSE_BACKEND + (
        f", 3D points: {backends.pose_source}" if backends.pose_source else ""
    )
    return {
        "CSIM": csim(observed_p, observed_i, backends.identity or backends.models),
        "AKD": akd(observed_p, observed_m, (height, width)),
        "APD": apd(observed_p, observed_m, backends.points, K, pose_backend),
        "AED": aed(observed_p, observed_m, backends.expression),
    }


def summary_text(metric: FaceMetric) -> str:
    """One line for a report: mean, unit, backend and detection rate."""
    value = "n/a" if metric.mean is None or not math.isfinite(metric.mean) else f"{metric.mean:.4f}"
    return (
        f"{metric.name} {value} ({metric.unit}; {metric.backend}; "
        f"{metric.valid}/{metric.total} pairs, detection rate {metric.detection_rate:.0%})"
    )
