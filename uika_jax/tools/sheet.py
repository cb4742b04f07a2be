"""Draw a dataset's contact sheet: a row per subject, a column per camera, then mask and UV.

    uika sheet DIR --out sheet.png [--subjects 6] [--frame 0] [--cell 96] [--split train]

For each of the first --subjects subjects (of --split, if given): its first
sequence's frame --frame from every camera, then the first camera's foreground
mask and its ground-truth UV map (u red, v green, black where not valid; when
the dataset has UV maps). Reads through the validating readers, so a sheet of a
broken dataset fails with the reader's message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from uika_jax.data.format import DatasetFormatError, load_index
from uika_jax.data.reader import FrameRef, read_frame_files
from uika_jax.safe_files import atomic_write


def contact_sheet(
    root: str | Path, subjects: int = 6, frame: int = 0, cell: int = 96, split: str | None = None
) -> np.ndarray:
    """The sheet (module docstring) as an (H, W, 3) uint8 image."""
    index = load_index(root)
    chosen = (index.subjects if split is None else index.split(split))[:subjects]
    if not chosen:
        raise DatasetFormatError(f"{root}: no subjects{'' if split is None else f' in {split}'}")
    columns = max(len(s.sequences[0].cameras) for s in chosen) + 1 + index.has_uv
    rows = []
    for subject in chosen:
        entry = subject.sequences[0]
        t = min(frame, entry.num_frames - 1)
        cells = []
        for c, camera in enumerate(entry.cameras):
            files = read_frame_files(root, index, FrameRef(subject.id, entry.id, camera, t))
            cells.append(files["image"])
            if c == 0:
                extra = [np.repeat(files["mask"][..., None], 3, -1)]
                if index.has_uv:
                    uv = np.concatenate([files["uv"], np.zeros_like(files["uv"][..., :1])], -1)
                    extra.append(np.round(uv * 255).astype(np.uint8))
        cells += [np.zeros_like(cells[0])] * (columns - len(entry.cameras) - len(extra)) + extra
        resized = [
            np.asarray(Image.fromarray(x).resize((cell, cell), Image.BICUBIC)) for x in cells
        ]
        rows.append(np.concatenate(resized, 1))
    return np.concatenate(rows, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this subcommand's arguments."""
    parser.add_argument("dir", help="the dataset folder")
    parser.add_argument("--out", required=True, help="the PNG to write (its folder must exist)")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--cell", type=int, default=96, help="cell side in pixels")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None)


def run(args: argparse.Namespace) -> int:
    """Writes the sheet; returns the exit status."""
    try:
        sheet = contact_sheet(args.dir, args.subjects, args.frame, args.cell, args.split)
        with atomic_write(args.out) as f:
            Image.fromarray(sheet).save(f, format="PNG")
    except (FileNotFoundError, DatasetFormatError) as e:
        print(f"uika sheet: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {sheet.shape[1]}x{sheet.shape[0]}")
    return 0
