"""uika_jax.video: mp4 written from a frame stream and read back, subsampled, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from uika_jax.video import VideoError, padded_size, read_video_frames, write_video

FRAMES = 12


def pattern_frame(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """A frame whose red varies across columns, green across rows, and blue with `index`."""
    rows, cols = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = 30 + (cols * 190) // max(width - 1, 1)
    frame[..., 1] = 30 + (rows * 190) // max(height - 1, 1)
    frame[..., 2] = 10 + 20 * index
    return frame


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    count = write_video(path, (pattern_frame(i) for i in range(FRAMES)), fps=10)
    return path, count


def test_round_trip_keeps_count_size_order_and_channels(video):
    path, count = video
    frames = read_video_frames(path)
    assert count == FRAMES
    assert len(frames) == FRAMES
    for index, frame in enumerate(frames):
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        expected = pattern_frame(index)
        # Lossy codec: a few levels of error. Swapped channels give ~60, a neighbour
        # frame (blue off by 20) gives ~7 on average.
        assert mean_abs_error(frame, expected) < 3.0
        assert mean_abs_error(frame, expected[..., ::-1]) > 30.0
        if index + 1 < FRAMES:
            assert mean_abs_error(frame, expected) < mean_abs_error(frame, pattern_frame(index + 1))


def test_writes_atomically_and_leaves_no_temporary_files(video):
    path, _ = video
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"]


def test_failed_stream_leaves_no_file(tmp_path):
    def frames():
        yield pattern_frame(0)
        yield pattern_frame(1, height=32)

    with pytest.raises(VideoError, match="frame 1 has shape"):
        write_video(tmp_path / "bad.mp4", frames())
    assert list(tmp_path.iterdir()) == []


def test_float_frames_match_uint8_and_nan_is_refused(tmp_path):
    floats = [pattern_frame(i).astype(np.float32) / 255.0 for i in range(3)]
    write_video(tmp_path / "f.mp4", floats)
    for index, frame in enumerate(read_video_frames(tmp_path / "f.mp4")):
        assert mean_abs_error(frame, pattern_frame(index)) < 3.0
    floats[1][0, 0, 0] = np.nan
    with pytest.raises(VideoError, match="frame 1 holds NaN"):
        write_video(tmp_path / "nan.mp4", floats)


def test_odd_sizes_are_padded_by_repeating_the_edge(tmp_path):
    frames = [pattern_frame(i, height=33, width=47) for i in range(3)]
    write_video(tmp_path / "odd.mp4", frames)
    back = read_video_frames(tmp_path / "odd.mp4")
    assert padded_size(33, 47) == (34, 48)
    assert back[0].shape == (34, 48, 3)
    for frame, original in zip(back, frames, strict=True):
        assert mean_abs_error(frame[:33, :47], original) < 3.0
        assert mean_abs_error(frame[33, :47], original[32]) < 4.0


def test_subsampling_keeps_the_expected_frames(video):
    path, _ = video
    every_third = read_video_frames(path, every=3)
    assert len(every_third) == 4
    spread = read_video_frames(path, max_frames=4)
    both = read_video_frames(path, every=2, max_frames=3)
    for frames, indices in (
        (every_third, [0, 3, 6, 9]),
        (spread, [0, 4, 7, 11]),
        (both, [0, 4, 10]),
    ):
        assert len(frames) == len(indices)
        for frame, index in zip(frames, indices, strict=True):
            assert mean_abs_error(frame, pattern_frame(index)) < 3.0


def test_bad_inputs_name_the_file(tmp_path, video):
    path, _ = video
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 50)
    with pytest.raises(VideoError, match=r"junk\.mp4: not a readable video"):
        read_video_frames(junk)
    with pytest.raises(VideoError, match=r"missing\.mp4: no such video file"):
        read_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="exceed the limit of 1,000 pixels"):
        read_video_frames(path, max_pixels=1000)
    with pytest.raises(VideoError, match="max_bytes"):
        read_video_frames(path, max_bytes=48 * 64 * 3 * 2)
    with pytest.raises(VideoError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [])
    with pytest.raises(FileNotFoundError):
        write_video(tmp_path / "absent" / "x.mp4", [pattern_frame(0)])
