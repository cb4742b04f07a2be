"""Data pipeline throughput: samples/s from folders and shards, beside the rate training needs.

    python benchmarks/data.py [--sizes 32,512] [--workers 0,2] [--rounds 3] [--seconds 5]
        [--identities 4] [--frames 3] [--folder DIR]

Writes a dataset per image size in a temporary folder (or reads `--folder`, a
dataset whose image size is the first of `--sizes`): `--identities` identities of
the train split, 9 cameras, `--frames` frames each, png images of smooth colour
fields with mild noise (compressing like renders, not like random pixels), masks
and UV maps, and packs it into ArrayRecord shards (`uika pack`, 64 records a
shard). The files are read through the page cache: the figures are decode and
assembly cost, not disk or network.

Each row runs the whole pipeline (`uika_jax.data.pipeline.Pipeline`, global
batches on one device, images converted to float) with the configuration's
sample shape: "tiny" (configs/tiny.py: buckets (1, 3), N_d = 2, batch 2) at 32,
"paper" (buckets (1, 4, 16), N_d = 8, a host's 8 samples) at 512, each with
0 worker processes (4 reading threads in the main process) and with 2 workers
(4 threads each). After 2 warm-up batches (worker start-up excluded), each of
`--rounds` rounds reads whole batches for at least `--seconds`; the table prints
the median over rounds (min-max) of samples/s and of frames read per second (real
source views plus targets).

"needed" is the rate training consumes, per host, stated as an assumption:

- paper: 150K steps in 2 weeks on 32 GPUs (the paper), a global batch of 32
  (configs/default.py, assumed), 8 GPUs per host: 32 x 150,000 / (14 x 86,400 s)
  / 4 hosts = 0.99 samples/s per host.
- tiny: configs/tiny.py's 200 steps of batch 2 in the about 5 minutes of the
  10-minute CPU main job left to training (assumed): 1.33 samples/s.

A last line times the choice of a sample's frames alone (no pixels) on a
paper-sized sequence, 9 cameras x 13,000 frames: it must stay far below the
reads.

"x needed" is samples/s over that rate (above 1: the pipeline keeps up on this
machine's cores; training hosts have many more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags
from PIL import Image
from timing import spread

from uika_jax.data.format import (
    DatasetIndex,
    HeadModelInfo,
    SequenceEntry,
    SubjectEntry,
    write_index,
)
from uika_jax.data.pipeline import Pipeline, PipelineConfig, open_source
from uika_jax.data.sampling import build_catalogue, draw_frames
from uika_jax.data.shards import pack_dataset
from uika_jax.data.sources import FrameTable
from uika_jax.data.writer import SequenceParams, finish_sequence, write_frame
from uika_jax.render.camera import framing_camera
from uika_jax.sharding import make_mesh

CAMERAS = tuple(f"cam{i}" for i in range(9))
SHAPES = {
    "tiny": dict(buckets=(1, 3), num_drive=2, global_batch_size=2),
    "paper": dict(buckets=(1, 4, 16), num_drive=8, global_batch_size=8),
}
NEEDED = {
    "tiny": 200 * 2 / 300.0,
    "paper": 32 * 150_000 / (14 * 86_400) / 4,
}


def _frame(rng: np.random.Generator, size: int):
    """A smooth colour field with mild noise, an elliptic mask and a UV gradient inside it."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    image = np.clip(smooth + rng.normal(0, 2, smooth.shape), 0, 255).astype(np.uint8)
    y, x = (np.mgrid[:size, :size] + 0.5) / size
    valid = ((x - 0.5) / 0.35) ** 2 + ((y - 0.5) / 0.45) ** 2 < 1
    uv = np.stack([x, y], -1).astype(np.float32)
    return image, (255 * valid).astype(np.uint8), uv, valid


def write_dataset(root: Path, size: int, identities: int, frames: int) -> None:
    """The module docstring's benchmark dataset."""
    head = HeadModelInfo("benchmark:0", 10, 4, 3)
    entry = SequenceEntry("talk", CAMERAS, frames)
    index = DatasetIndex(
        head, size, "png", True,
        tuple(SubjectEntry(f"id{i:03d}", "train", (entry,)) for i in range(identities)),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    cams = [framing_camera(np.zeros(3), 0.22, size, yaw, 0.0) for yaw in np.linspace(-60, 60, 9)]
    for subject in index.subjects:
        for camera in CAMERAS:
            for frame in range(frames):
                image, mask, uv, valid = _frame(rng, size)
                write_frame(root, index, subject.id, "talk", camera, frame,
                            image=image, mask=mask, image_uv=uv, uv_valid=valid)  # fmt: skip
        params = SequenceParams(
            shape=rng.normal(size=4).astype(np.float32),
            expression=rng.normal(size=(frames, 3)).astype(np.float32),
            pose=np.zeros((frames, 5, 3), np.float32),
            translation=np.zeros((frames, 3), np.float32),
            viewmats=np.stack([v for v, _ in cams]).astype(np.float32),
            intrinsics=np.stack([k for _, k in cams]).astype(np.float32),
        )
        finish_sequence(root, index, subject.id, entry, params)
    write_index(root, index)


def measure(source, shape: str, size: int, workers: int, rounds: int, seconds: float) -> dict:
    """Samples/s and frames/s per round of one configuration (module docstring)."""
    config = PipelineConfig(
        image_size=size, workers=workers, read_threads=4, prefetch_batches=4, **SHAPES[shape]
    )
    pipeline = Pipeline([source], config, mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    iterator = iter(pipeline)
    for _ in range(2):
        jax.block_until_ready(next(iterator))
    samples, frames = [], []
    for _ in range(rounds):
        start, count, read = time.perf_counter(), 0, 0
        while (elapsed := time.perf_counter() - start) < seconds:
            batch = jax.block_until_ready(next(iterator))
            count += batch["view_mask"].shape[0]
            read += int(batch["view_mask"].sum()) + batch["target_records"].size
        samples.append(count / elapsed)
        frames.append(read / elapsed)
    return {"samples": samples, "frames": frames, "batch": config.global_batch_size}


def plan_ms(cameras: int = 9, frames: int = 13_000, identities: int = 4) -> list[float]:
    """Milliseconds per draw of 16 sources and 8 targets, per round of 100 draws."""
    per_identity = cameras * frames
    subject = np.repeat(np.arange(identities, dtype=np.int32), per_identity)
    table = FrameTable(
        subjects=tuple(f"id{i}" for i in range(identities)),
        sequences=tuple(f"id{i}/talk" for i in range(identities)),
        cameras=CAMERAS[:cameras],
        subject=subject,
        sequence=subject,
        camera=np.tile(np.repeat(np.arange(cameras, dtype=np.int32), frames), identities),
        frame=np.tile(np.arange(frames, dtype=np.int32), cameras * identities),
        split=np.zeros(len(subject), np.int8),
    )
    catalogue = build_catalogue(
        table, split="train", min_records=9, process_index=0, process_count=1, seed=0, origin=""
    )
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(100):
            draw_frames(catalogue, rng, 16, 8, monocular=bool(i % 2))
        rounds.append(10 * (time.perf_counter() - start))
    return rounds


HEADER = (
    f"{'source':>7} {'shape':>6} {'size':>4} {'workers':>7} {'batch':>5} | "
    f"{'samples/s':>20} {'frames/s':>20} | {'needed':>6} {'x needed':>8}"
)


def row(kind: str, shape: str, size: int, workers: int, res: dict) -> str:
    needed = NEEDED[shape]
    ratio = statistics.median(res["samples"]) / needed
    return (
        f"{kind:>7} {shape:>6} {size:>4} {workers:>7} {res['batch']:>5} | "
        f"{spread(res['samples'], '.1f'):>20} {spread(res['frames'], '.0f'):>20} | "
        f"{needed:>6.2f} {ratio:>7.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,512")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--identities", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="an existing dataset (first size only)")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{os.cpu_count()} CPUs, jax {jax.__version__}; load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)  # fmt: skip
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            shape = "tiny" if size <= 64 else "paper"
            root = args.folder if args.folder and size == sizes[0] else Path(tmp) / f"s{size}"
            if root != args.folder:
                start = time.perf_counter()
                write_dataset(root, size, args.identities, args.frames)
                print(f"wrote {root} in {time.perf_counter() - start:.1f} s", flush=True)
            shards = Path(tmp) / f"shards{size}"
            pack_dataset(root, shards, records_per_shard=64)
            for kind, path in (("folder", root), ("shards", shards)):
                source = open_source(path)
                for count in workers:
                    res = measure(source, shape, size, count, args.rounds, args.seconds)
                    lines.append(row(kind, shape, size, count, res))
                    print(lines[-1], flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end; median over {args.rounds} rounds "
          f"of at least {args.seconds} s (min-max)\n")  # fmt: skip
    print(HEADER + "\n" + "-" * len(HEADER) + "\n" + "\n".join(lines))
    print(f"\nchoosing a sample's frames (16 sources, 8 targets) in a sequence of 9 cameras x "
          f"13,000 frames: {spread(plan_ms(), '.2f', ' ms')}")  # fmt: skip


if __name__ == "__main__":
    main()
