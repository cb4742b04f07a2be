"""The photos `uika reconstruct` reads: files, folders and videos, faces found and framed.

Inputs are photo files (`IMAGE_SUFFIXES`), video files (`VIDEO_SUFFIXES`) and folders
of them (their photos and videos, sorted by name; not recursive). Videos are decoded
through `uika_jax.video.read_video_frames`: every `every`-th frame, then at most
`max_frames` spread evenly over the clip. A photo's size is checked against
`MAX_IMAGE_PIXELS` from its header, before its pixels are decoded.

Face framing: the project's images are square with the head centred, crown to chin
spanning `HEAD_FRACTION` of the height (`uika_jax.render.camera`). dlib's 68 landmarks
(`uika_jax.evaluation.face_models.DlibFaceModels`) span the face only (jaw line, brows,
chin), so the head's square is placed from the landmarks' bounding box, whose larger
side is the face extent e:

    side   = SIDE_PER_FACE_EXTENT * e
    centre = box centre - (0, CENTRE_ABOVE_FACE * e)     (image y points down)

The two numbers were measured on the built-in synthetic head, whose framing is exact:
`uika_jax.synthetic.views.render_identity` at 256 pixels (no hair), identities 1 to 12
seen from the rig's 9 views (`uika_jax.synthetic.rig.FIXED_VIEWS`, no jitter). The
landmarks were found in 60 of the 108 renders: 59 of the 60 near-frontal ones (within
25 degrees) and 1 of the 48 wide ones. Each render's true square is the whole image
(side 256, centre (128, 128)); the constants are the medians over those 60 of 256 / e
(2.12; 10th to 90th percentile 1.98 to 2.25) and of (box centre y - 128) / e (0.27;
0.15 to 0.40: pitched views move the face within the head); the horizontal offset's
median is 0 (standard deviation 0.02 e). Roll is not modelled: the square stays
axis-aligned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from uika_jax.data.framing import SquareCrop, crop_square
from uika_jax.video import VideoError, evenly_spaced, read_video_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Photo files read (any case)."""

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
"""Video files read (any case)."""

MAX_IMAGE_PIXELS = 8192 * 8192
"""The largest photo (width x height) decoded."""

DETECTION_MAX_SIDE = 1024
"""Photos are shrunk to at most this side for face detection (the crop uses the original)."""

SIDE_PER_FACE_EXTENT = 2.12
"""The head square's side over the landmarks' larger extent (module docstring)."""

CENTRE_ABOVE_FACE = 0.27
"""The head square's centre above the landmarks' box centre, over their extent."""


class InputError(ValueError):
    """An input that cannot be used; the message names the file or folder."""


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One picture to reconstruct from.

    Attributes:
      name: the file's path, with the frame for a video frame.
      pixels: (H, W, 3) uint8 RGB.
    """

    name: str
    pixels: np.ndarray


@dataclasses.dataclass(frozen=True)
class FramedView:
    """A picture with its face framed.

    Attributes:
      name: the picture's name (`SourceImage.name`).
      image: (size, size, 3) uint8, the head centred per the project's framing.
      crop: the square window of the source that `image` resamples.
      landmarks: (68, 2) the face's landmarks in the source's image coordinates.
    """

    name: str
    image: np.ndarray
    crop: SquareCrop
    landmarks: np.ndarray


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def list_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """The photo and video files named by `paths`, folders expanded (sorted, not recursive).

    Raises:
      InputError: naming a path that does not exist, a file that is neither a photo nor
        a video, or a folder without any.
    """
    if not paths:
        raise InputError("no inputs given: name photos, a folder of photos or a video")
    files: list[Path] = []
    accepted = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _kind(p) is not None)
            if not found:
                raise InputError(f"{path}: the folder holds no photos or videos ({accepted})")
            files.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise InputError(f"{path}: not a photo or video (expected one of {accepted})")
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def read_photo(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A photo as (H, W, 3) uint8 RGB (EXIF orientation applied, alpha dropped).

    Raises:
      InputError: if it is not a readable image or exceeds `max_pixels`.
    """
    from PIL import ImageOps

    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    f"{path}: {width}x{height} pixels exceed the limit of {max_pixels:,}"
                )
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{path}: not a readable image ({error})") from error
    return np.asarray(rgb, np.uint8)


def read_sources(
    files: Sequence[Path], max_frames: int, every: int | None = None
) -> Iterator[SourceImage]:
    """The pictures of `files` one at a time: each photo, each video's kept frames.

    Args:
      files: photo and video files (`list_inputs`).
      max_frames: the most frames kept per video, spread evenly over it.
      every: keep every `every`-th video frame before that (None: all).

    Raises:
      InputError: naming an unreadable photo or video.
    """
    for path in files:
        if _kind(path) == "image":
            yield SourceImage(str(path), read_photo(path))
            continue
        try:
            frames = read_video_frames(path, every=every, max_frames=max_frames)
        except VideoError as error:
            raise InputError(str(error)) from error
        for k, frame in enumerate(frames):
            yield SourceImage(f"{path} (kept frame {k + 1} of {len(frames)})", frame)


def head_crop(landmarks: np.ndarray) -> SquareCrop:
    """The square that frames the head of a face with these landmarks (module docstring).

    Args:
      landmarks: (68, 2) x, y in image coordinates (pixel centres at j + 0.5).
    """
    landmarks = np.asarray(landmarks, np.float64)
    low, high = landmarks.min(0), landmarks.max(0)
    extent = float((high - low).max())
    centre = 0.5 * (low + high) - np.array([0.0, CENTRE_ABOVE_FACE * extent])
    side = SIDE_PER_FACE_EXTENT * extent
    return SquareCrop(float(centre[0] - side / 2), float(centre[1] - side / 2), float(side))


def _detection_pixels(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """The picture as the detector sees it, and its scale over the source.

    Shrunk to `DETECTION_MAX_SIDE`, or upsampled to the face models' minimum side.
    """
    from uika_jax.evaluation.face_models import detection_image

    height, width = pixels.shape[:2]
    if max(height, width) <= DETECTION_MAX_SIDE:
        return detection_image(pixels)
    scale = DETECTION_MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    shrunk = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
    return shrunk, size[0] / width


class FaceFramer:
    """Finds the face in a picture and crops its head to the project's framing."""

    def __init__(self, size: int) -> None:
        """Loads dlib's detector and landmarks (`DlibFaceModels`).

        Args:
          size: the side of the framed images (the model's image size).

        Raises:
          FaceBackendError: without dlib or face-recognition-models (the `eval` extra).
        """
        from uika_jax.evaluation.face_models import DlibFaceModels

        self._models = DlibFaceModels()
        self.size = int(size)

    def landmarks(self, pixels: np.ndarray) -> np.ndarray | None:
        """The largest face's 68 landmarks in the picture's image coordinates, or None."""
        detection, scale = _detection_pixels(pixels)
        found = self._models.landmarks(detection)
        if found is None:
            return None
        return (found + 0.5) / scale

    def frame(self, source: SourceImage) -> FramedView | None:
        """The picture's head framed at `size`, or None if no face was found."""
        landmarks = self.landmarks(source.pixels)
        if landmarks is None:
            return None
        crop = head_crop(landmarks)
        image = crop_square(source.pixels, crop, self.size, is_mask=False)
        return FramedView(source.name, image, crop, landmarks)


@dataclasses.dataclass(frozen=True)
class FramedInputs:
    """The framed views to reconstruct from, and what was left out.

    Attributes:
      views: the framed views, at most the asked number.
      no_face: names of the pictures where no face was found.
      dropped: names of framed pictures left out to keep at most that number.
    """

    views: list[FramedView]
    no_face: list[str]
    dropped: list[str]


def frame_inputs(
    paths: Sequence[str | Path],
    framer: FaceFramer,
    max_views: int,
    every: int | None = None,
) -> FramedInputs:
    """Reads the inputs, frames each face and keeps at most `max_views` spread evenly.

    Args:
      paths: photos, videos and folders (`list_inputs`).
      framer: the face framer at the model's image size.
      max_views: the most views kept (and frames decoded per video).
      every: keep every `every`-th video frame (None: all, before spreading).

    Raises:
      InputError: naming an input that cannot be read, or listing the pictures if none
        has a face.
    """
    if max_views < 1:
        raise InputError(f"max_views must be >= 1, got {max_views}")
    if every is not None and every < 1:
        raise InputError(f"--every must be >= 1, got {every}")
    files = list_inputs(paths)
    framed, no_face = [], []
    for source in read_sources(files, max_views, every):
        view = framer.frame(source)
        if view is None:
            no_face.append(source.name)
        else:
            framed.append(view)
    if not framed:
        raise InputError(f"no face found in {describe(no_face)}")
    kept = set(evenly_spaced(len(framed), max_views).tolist())
    return FramedInputs(
        views=[v for i, v in enumerate(framed) if i in kept],
        no_face=no_face,
        dropped=[v.name for i, v in enumerate(framed) if i not in kept],
    )


def describe(names: Sequence[str], shown: int = 5) -> str:
    """Names as one line: 'a, b, c', or the first `shown` and how many more."""
    more = len(names) - shown
    head = ", ".join(names[:shown])
    return head if more <= 0 else f"{head} and {more} more"
