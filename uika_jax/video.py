"""Video files in and out: mp4 written atomically from a stream of frames, frames read back.

`write_video` encodes (H, W, 3) frames (uint8, or floats in [0, 1]) to H.264 mp4
with the ffmpeg binary that ships inside `imageio-ffmpeg`. Frames arrive through an
iterable, so a long video is never held in memory; they are encoded into a
temporary file beside the destination and renamed over it when the encoder
finished (`uika_jax.safe_files.atomic_path`), so a reader never sees half a video.
libx264 with yuv420p needs even widths and heights: an odd-sized frame is padded
by repeating its last row and/or column (the video is then one pixel larger than
the frames; `padded_size` says what a size becomes).

`read_video_frames` decodes a video to uint8 RGB frames, optionally keeping only
every k-th frame and at most N frames spread evenly over the video (the input of
`uika reconstruct`). The frame size is checked against a pixel limit, and the
frames' total bytes against a byte budget, before any frame is decoded; a missing
or unreadable file raises `VideoError` naming the path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from uika_jax.safe_files import atomic_path

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest frame (width x height) `read_video_frames` decodes unless told otherwise."""

DEFAULT_MAX_BYTES = 2 << 30
"""Largest total of decoded frame bytes `read_video_frames` holds unless told otherwise."""


class VideoError(ValueError):
    """A video that cannot be written or read as asked; the message names the file."""


def padded_size(height: int, width: int) -> tuple[int, int]:
    """The (height, width) a frame of this size is encoded at: each rounded up to even."""
    return height + height % 2, width + width % 2


def _to_uint8_frame(frame: object, path: Path, index: int) -> np.ndarray:
    """One frame as a C-contiguous (H, W, 3) uint8 array, checked; floats are clipped to [0, 1]."""
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise VideoError(f"{path}: frame {index} has shape {array.shape}, expected (H, W, 3)")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise VideoError(
            f"{path}: frame {index} has dtype {array.dtype}, expected uint8 or floats in [0, 1]"
        )
    if not np.all(np.isfinite(array)):
        raise VideoError(f"{path}: frame {index} holds NaN or infinite values")
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _ffmpeg_reason(error: Exception) -> str:
    """The last lines of an ffmpeg failure (its banner and configuration dropped)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " / ".join(lines[-2:]) if lines else type(error).__name__


def _pad_to_even(frame: np.ndarray) -> np.ndarray:
    """The frame with its last row and/or column repeated to make both sides even."""
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    *,
    fps: float = 25.0,
    quality: float = 8.0,
) -> int:
    """Encodes frames to an H.264 mp4, atomically; returns the number of frames written.

    Args:
      path: the destination (any name: the container is always mp4); its folder must
        exist.
      frames: (H, W, 3) arrays, uint8 or floats in [0, 1] (clipped), all of one size;
        consumed one at a time. Odd sizes are padded to even (see the module docstring).
      fps: frames per second, > 0.
      quality: the encoder's quality from 1 (smallest file) to 10 (best); 8 is a
        constant rate factor of 10, visually lossless for renders.

    Returns:
      The number of frames in the video.

    Raises:
      VideoError: if there are no frames, a frame has another shape or dtype than
        the first, holds NaN, or ffmpeg fails (its message is included).
      FileNotFoundError: if the destination's folder does not exist.
    """
    path = Path(path)
    if not fps > 0:
        raise VideoError(f"{path}: fps must be positive, got {fps}")
    if not 1 <= quality <= 10:
        raise VideoError(f"{path}: quality must be within [1, 10], got {quality}")
    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise VideoError(f"{path}: no frames to write")
    first = _to_uint8_frame(first, path, 0)
    shape = first.shape
    height, width = padded_size(shape[0], shape[1])
    count = 0
    with atomic_path(path) as temp:
        writer = imageio_ffmpeg.write_frames(
            str(temp),
            (width, height),
            fps=fps,
            quality=quality,
            codec="libx264",
            macro_block_size=1,
            output_params=["-f", "mp4", "-movflags", "+faststart"],
        )
        try:
            try:
                writer.send(None)
                frame = first
                while True:
                    writer.send(_pad_to_even(frame).tobytes())
                    count += 1
                    following = next(iterator, None)
                    if following is None:
                        break
                    frame = _to_uint8_frame(following, path, count)
                    if frame.shape != shape:
                        raise VideoError(
                            f"{path}: frame {count} has shape {frame.shape}, the first {shape}"
                        )
            finally:
                writer.close()
        except (OSError, RuntimeError) as e:
            raise VideoError(f"{path}: ffmpeg failed while encoding: {_ffmpeg_reason(e)}") from e
    return count


def evenly_spaced(count: int, keep: int) -> np.ndarray:
    """Indices of `keep` of `count` items spread evenly, first and last included."""
    if count <= keep:
        return np.arange(count)
    return np.round(np.linspace(0, count - 1, keep)).astype(int)


def _selected_indices(total: int, every: int | None, max_frames: int | None) -> np.ndarray:
    """Frame indices kept: every `every`-th frame, then at most `max_frames` spread evenly."""
    kept = np.arange(0, total, every or 1)
    return kept if max_frames is None else kept[evenly_spaced(len(kept), max_frames)]


def read_video_frames(
    path: str | os.PathLike,
    every: int | None = None,
    max_frames: int | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[np.ndarray]:
    """Decodes a video's frames to uint8 RGB arrays, subsampled.

    The file is decoded twice: once to count its frames (nothing is kept), once to
    keep the chosen ones, so memory holds only the frames returned.

    Args:
      path: a video file ffmpeg reads (mp4, mov, webm, ...).
      every: keep frames 0, every, 2 every, ... (None: every frame).
      max_frames: then keep at most this many, spread evenly over those (first and
        last included); None keeps them all.
      max_pixels: refuse frames larger than this (width x height).
      max_bytes: refuse if the frames kept would exceed this many bytes.

    Returns:
      The kept frames in video order, each (H, W, 3) uint8.

    Raises:
      VideoError: if the file is missing, not a video ffmpeg decodes, has no frames,
        its frames exceed `max_pixels` or the kept frames `max_bytes`, or an argument
        is out of range.
    """
    path = Path(path)
    if every is not None and every < 1:
        raise VideoError(f"{path}: every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"{path}: max_frames must be >= 1, got {max_frames}")
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    try:
        total, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
    except (OSError, RuntimeError, StopIteration) as e:
        raise VideoError(f"{path}: not a readable video: {_ffmpeg_reason(e)}") from e
    try:
        width, height = meta["size"]
        if width * height > max_pixels:
            raise VideoError(
                f"{path}: frames of {width}x{height} exceed the limit of {max_pixels:,} "
                "pixels (max_pixels)"
            )
        kept = _selected_indices(total, every, max_frames)
        if len(kept) * width * height * 3 > max_bytes:
            raise VideoError(
                f"{path}: {len(kept)} frames of {width}x{height} exceed {max_bytes:,} bytes "
                "(max_bytes); keep fewer frames"
            )
        wanted = set(kept.tolist())
        frames = []
        for index, data in enumerate(reader):
            if index in wanted:
                frame = np.frombuffer(data, np.uint8)
                if frame.size != width * height * 3:
                    raise VideoError(f"{path}: frame {index} is truncated")
                frames.append(frame.reshape(height, width, 3).copy())
    except (OSError, RuntimeError) as e:
        raise VideoError(f"{path}: ffmpeg failed while decoding: {_ffmpeg_reason(e)}") from e
    finally:
        reader.close()
    if not frames:
        raise VideoError(f"{path}: the video has no frames")
    return frames
