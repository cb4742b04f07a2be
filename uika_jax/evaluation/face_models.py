"""Face-model backends of the face metrics: detection, 68 landmarks, identity, expression.

The paper's identity (ArcFace) and expression (a 3DMM regressor) networks have no
weights that can be fetched offline, so each backend is pluggable with an offline
default whose weights ship inside a package of the `eval` extra:

* `DlibFaceModels`: dlib's HOG frontal face detector, its 68-point landmark predictor
  (iBUG 300-W point order) and its 128-d ResNet identity embedding, the last two from
  the `face-recognition-models` package. That package's `__init__` imports the removed
  `pkg_resources`, so it is never imported: its `models/` folder is found with
  `importlib.util.find_spec`. Licence: dlib's 68-point model was trained on the iBUG
  300-W data set and is licensed for non-commercial use only.
* `OnnxArcFace`: a user's ArcFace ONNX file run by onnxruntime on the standard 112 x 112
  crop, aligned by the 5-point similarity transform (eye centres, nose tip, mouth
  corners taken from the 68 landmarks) onto insightface's template.
* `OnnxExpressionRegressor`: a user's ONNX file mapping a face crop to expression
  coefficients. Without one, AED is reported as n/a.

Images handed to backends are (H, W, 3) uint8 RGB at detection resolution
(`detection_image`); landmarks are (68, 2) float (x, y) pixels of that image.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

MIN_DETECTION_SIZE = 256
"""Images are upsampled so that their shorter side is at least this many pixels."""

DLIB_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "identity": "dlib_face_recognition_resnet_model_v1.dat",
}
"""The `face-recognition-models` files the dlib backend loads."""

ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float64,
)
"""insightface's 5 reference points in the 112 x 112 ArcFace crop: the eye in the image's
left half (the subject's right), the other eye, nose tip, left then right mouth corner."""


class FaceBackendError(RuntimeError):
    """A face-model backend cannot run: its package or its model file is missing."""


class IdentityEncoder(Protocol):
    """An identity embedding backend (CSIM)."""

    name: str

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Returns the identity embedding (D,) of the face with these 68 landmarks."""


class ExpressionRegressor(Protocol):
    """An expression coefficient backend (AED)."""

    name: str

    def coefficients(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """Returns the expression coefficients (C,) of the face with these 68 landmarks."""


def detection_image(
    image: np.ndarray, min_size: int = MIN_DETECTION_SIZE
) -> tuple[np.ndarray, float]:
    """Converts an image to uint8 RGB, upsampled (bicubic) so its shorter side is >= `min_size`.

    Args:
      image: (H, W, 3) float in [0, 1] or uint8.
      min_size: the smallest shorter side handed to the detector.

    Returns:
      (the uint8 (H', W', 3) image, the scale H'/H), the scale an integer >= 1.

    Raises:
      ValueError: if the image is not (H, W, 3) or holds non-finite values.
    """
    import cv2

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.all(np.isfinite(image)):
            raise ValueError("image holds NaN or infinite values")
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    scale = max(1, -(-min_size // min(image.shape[:2])))
    if scale > 1:
        height, width = image.shape[:2]
        image = cv2.resize(image, (width * scale, height * scale), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(image), float(scale)


def dlib_model_dir() -> Path:
    """The `models/` folder of `face-recognition-models`, found without importing the package.

    Raises:
      FaceBackendError: if the package or one of `DLIB_FILES` is missing.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise FaceBackendError(
            "face-recognition-models is not installed (pip install -e '.[eval]')"
        )
    folder = Path(spec.origin).parent / "models"
    for file_name in DLIB_FILES.values():
        if not (folder / file_name).is_file():
            raise FaceBackendError(f"{folder / file_name}: model file missing (reinstall it)")
    return folder


def _import_dlib():
    try:
        import dlib
    except ImportError as e:
        raise FaceBackendError(f"dlib is not installed (pip install -e '.[eval]'): {e}") from e
    return dlib


class DlibFaceModels:
    """dlib's HOG face detector, 68-point landmarks and 128-d ResNet identity embedding.

    The 68-point predictor is licensed for non-commercial use only (iBUG 300-W).

    Attributes:
      name: the identity backend's name in reports.
      landmark_name: the detector and landmark backend's name in reports.
    """

    name = "dlib ResNet-128 (face-recognition-models)"
    landmark_name = "dlib HOG detector + 68-point predictor (iBUG 300-W, non-commercial)"

    def __init__(self, upsample_times: int = 1) -> None:
        """Loads the models.

        Args:
          upsample_times: image doublings inside the HOG detector (finds smaller faces).

        Raises:
          FaceBackendError: if dlib or the model files are missing.
        """
        dlib = _import_dlib()
        folder = dlib_model_dir()
        self._dlib = dlib
        self._upsample_times = int(upsample_times)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(folder / DLIB_FILES["landmarks"]))
        self._encoder = dlib.face_recognition_model_v1(str(folder / DLIB_FILES["identity"]))

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """The 68 landmarks (68, 2) float64 of the largest detected face, or None if none.

        Args:
          image: (H, W, 3) uint8 RGB (`detection_image`).
        """
        faces = self._detector(image, self._upsample_times)
        if len(faces) == 0:
            return None
        face = max(faces, key=lambda rect: rect.area())
        shape = self._predictor(image, face)
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The 128-d identity embedding (not unit length) of the face with these landmarks.

        Args:
          image: (H, W, 3) uint8 RGB.
          landmarks: (68, 2) pixel positions from `landmarks`.
        """
        dlib = self._dlib
        points = [dlib.point(round(x), round(y)) for x, y in landmarks]
        low, high = np.floor(landmarks.min(0)), np.ceil(landmarks.max(0))
        box = dlib.rectangle(int(low[0]), int(low[1]), int(high[0]), int(high[1]))
        shape = dlib.full_object_detection(box, points)
        return np.asarray(self._encoder.compute_face_descriptor(image, shape), np.float64)


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """ArcFace's 5 points (5, 2) from iBUG-68 landmarks, in `ARCFACE_TEMPLATE` order."""
    landmarks = np.asarray(landmarks, np.float64)
    return np.stack(
        [
            landmarks[36:42].mean(0),
            landmarks[42:48].mean(0),
            landmarks[30],
            landmarks[48],
            landmarks[54],
        ]
    )


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, shift) mapping source onto target.

    Umeyama's closed form, as insightface's `SimilarityTransform.estimate`.

    Args:
      source: (N, 2) points.
      target: (N, 2) points.

    Returns:
      The (2, 3) affine matrix A with target ~ A[:, :2] @ source + A[:, 2].
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    cs, ct = source - mean_s, target - mean_t
    covariance = ct.T @ cs / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / cs.var(0).sum()
    shift = mean_t - scale * rotation @ mean_s
    return np.concatenate([scale * rotation, shift[:, None]], axis=1)


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """How an ONNX image model wants its input.

    Attributes:
      layout: "NCHW" or "NHWC".
      mean: subtracted from 0..255 pixel values (scalar or per channel).
      std: divides them after.
      bgr: feed channels in BGR order (insightface's ArcFace exports take RGB).
    """

    layout: str = "NCHW"
    mean: float | tuple[float, float, float] = 127.5
    std: float | tuple[float, float, float] = 127.5
    bgr: bool = False

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        if np.any(np.asarray(self.std, np.float64) == 0):
            raise ValueError("std must be non-zero")

    def tensor(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB crops -> the normalised float32 input tensor."""
        x = crops[..., ::-1] if self.bgr else crops
        x = (x.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "NCHW" else x)


ARCFACE_INPUT = ImageInput()
"""ArcFace's usual input: RGB, NCHW, (x - 127.5) / 127.5."""

EXPRESSION_INPUT = ImageInput(mean=0.0, std=255.0)
"""The expression regressor's default input: RGB, NCHW, x / 255."""


class _OnnxImageModel:
    """An onnxruntime session with one image input of a fixed square size and one output."""

    def __init__(self, path: str | Path, size: int, image_input: ImageInput, what: str) -> None:
        try:
            import onnxruntime
        except ImportError as e:
            raise FaceBackendError(f"onnxruntime is not installed ({what}): {e}") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise ValueError(f"{path}: not a loadable ONNX model ({what}): {e}") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: {what} needs one 4-D image input, got {inputs}")
        channel_axis = 1 if image_input.layout == "NCHW" else 3
        declared = inputs[0].shape
        spatial = [declared[a] for a in range(1, 4) if a != channel_axis]
        channels = declared[channel_axis]  # an int, or None / a name when dynamic
        if isinstance(channels, int) and channels != 3:
            raise ValueError(
                f"{path}: input {declared} has no 3 channels at axis {channel_axis} "
                f"(layout {image_input.layout}; set the layout)"
            )
        if any(isinstance(s, int) and s != size for s in spatial):
            raise ValueError(f"{path}: input {declared} is not {size} x {size} ({what})")
        self._input_name = inputs[0].name
        self.size = size
        self.image_input = image_input
        self.path = path

    def run(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 crops -> (N, D) float64 outputs (the first output, flattened)."""
        output = self._session.run(None, {self._input_name: self.image_input.tensor(crops)})[0]
        return np.asarray(output, np.float64).reshape(len(crops), -1)


class OnnxArcFace:
    """A user's ArcFace ONNX model on the standard aligned 112 x 112 crop.

    Attributes:
      name: the backend's name in reports.
    """

    def __init__(
        self, path: str | Path, image_input: ImageInput = ARCFACE_INPUT, size: int = 112
    ) -> None:
        """Opens the model.

        Args:
          path: the ONNX file.
          image_input: layout and normalisation; the default is ArcFace's
            (RGB, NCHW, (x - 127.5) / 127.5).
          size: crop side; the template is scaled from 112.

        Raises:
          FaceBackendError: without onnxruntime.
          FileNotFoundError, ValueError: a missing, unloadable or mis-shaped model.
        """
        self._model = _OnnxImageModel(path, size, image_input, "ArcFace")
        self.name = f"ArcFace ONNX ({Path(path).name})"

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The aligned (size, size, 3) uint8 crop: 5 points warped onto the ArcFace template."""
        import cv2

        size = self._model.size
        matrix = similarity_transform(five_points(landmarks), ARCFACE_TEMPLATE * (size / 112.0))
        return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The embedding (D,) of the face with these 68 landmarks."""
        return self._model.run(self.align(image, landmarks)[None])[0]


class OnnxExpressionRegressor:
    """A user's ONNX expression regressor: a square face crop in, coefficients out.

    The crop is the landmarks' bounding square enlarged by `margin` on each side,
    resized to `size` (pixels beyond the image are black).

    Attributes:
      name: the backend's name in reports.
    """

    def __init__(
        self,
        path: str | Path,
        size: int = 224,
        image_input: ImageInput = EXPRESSION_INPUT,
        margin: float = 0.25,
    ) -> None:
        """Opens the model.

        Args:
          path: the ONNX file; its first output holds the coefficients.
          size: crop side the model takes.
          image_input: layout and normalisation (default: RGB, NCHW, x / 255).
          margin: crop enlargement, as a fraction of the landmarks' extent.

        Raises:
          FaceBackendError: without onnxruntime.
          FileNotFoundError, ValueError: a missing, unloadable or mis-shaped model.
        """
        self._model = _OnnxImageModel(path, size, image_input, "expression regressor")
        self._margin = float(margin)
        self.name = f"expression ONNX ({Path(path).name})"

    def crop(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The (size, size, 3) uint8 face crop the regressor sees."""
        import cv2

        low, high = landmarks.min(0), landmarks.max(0)
        centre, half = 0.5 * (low + high), 0.5 * (1.0 + 2.0 * self._margin) * (high - low).max()
        size = self._model.size
        scale = size / (2.0 * half)
        shift = size / 2 - scale * centre
        matrix = np.array([[scale, 0.0, shift[0]], [0.0, scale, shift[1]]])
        return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_AREA, borderValue=0)

    def coefficients(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The expression coefficients (C,) of the face with these 68 landmarks."""
        return self._model.run(self.crop(image, landmarks)[None])[0]
