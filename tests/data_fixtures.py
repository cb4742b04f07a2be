"""A tiny dataset in the on-disk format, written by hand (random pixels, plausible cameras)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from uika_jax.data.format import (
    DatasetIndex,
    HeadModelInfo,
    SequenceEntry,
    SubjectEntry,
    write_index,
)
from uika_jax.data.writer import SequenceParams, finish_sequence, write_frame
from uika_jax.render.camera import framing_camera

SIZE = 16
NUM_SHAPE, NUM_EXPRESSION, NUM_VERTICES = 4, 3, 10


def tiny_index(subjects=("a", "b", "c"), frames=3, cameras=("front", "left")) -> DatasetIndex:
    splits = ("train", "train", "test", "val")
    return DatasetIndex(
        head_model=HeadModelInfo("synthetic:test:00", NUM_VERTICES, NUM_SHAPE, NUM_EXPRESSION),
        image_size=SIZE,
        image_format="png",
        has_uv=True,
        subjects=tuple(
            SubjectEntry(s, splits[i % 4], (SequenceEntry("talk", tuple(cameras), frames),))
            for i, s in enumerate(subjects)
        ),
        provenance={"made_by": "tests/data_fixtures.py"},
    )


def tiny_params(entry: SequenceEntry, seed: int) -> SequenceParams:
    rng = np.random.default_rng(seed)
    f, c = entry.num_frames, len(entry.cameras)
    cams = [framing_camera(np.zeros(3), 0.22, SIZE, yaw, 0.0) for yaw in np.linspace(-30, 30, c)]
    return SequenceParams(
        shape=rng.normal(size=NUM_SHAPE).astype(np.float32),
        expression=rng.normal(size=(f, NUM_EXPRESSION)).astype(np.float32),
        pose=0.1 * rng.normal(size=(f, 5, 3)).astype(np.float32),
        translation=0.01 * rng.normal(size=(f, 3)).astype(np.float32),
        viewmats=np.stack([v for v, _ in cams]).astype(np.float32),
        intrinsics=np.stack([k for _, k in cams]).astype(np.float32),
    )


def frame_pixels(subject: str, camera: str, frame: int):
    """Deterministic pixels that identify the frame (so tests can tell frames apart)."""
    seed = zlib.crc32(f"{subject}/{camera}/{frame}".encode())
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[3:13, 4:12] = 255
    uv = rng.uniform(size=(SIZE, SIZE, 2)).astype(np.float32)
    return image, mask, uv, mask > 0


def write_tiny_dataset(root: Path, index: DatasetIndex | None = None) -> DatasetIndex:
    index = index or tiny_index()
    root.mkdir(parents=True, exist_ok=True)
    for i, subject in enumerate(index.subjects):
        for entry in subject.sequences:
            for camera in entry.cameras:
                for frame in range(entry.num_frames):
                    image, mask, uv, valid = frame_pixels(subject.id, camera, frame)
                    write_frame(
                        root, index, subject.id, entry.id, camera, frame,
                        image=image, mask=mask, image_uv=uv, uv_valid=valid,
                    )  # fmt: skip
            finish_sequence(root, index, subject.id, entry, tiny_params(entry, i))
    write_index(root, index)
    return index
