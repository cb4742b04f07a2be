"""Check a dataset: every file it lists, each problem with the file it is in.

    uika check DIR [--head-model builtin|PATH [--uv PATH]] [--params-only]

Reads the index, every sequence's parameters and cameras and (unless
--params-only) every frame's image, mask and UV map. Exits 0 when nothing is
wrong, 1 when problems were found (listed, with the number of bad frames, which
training can skip with the pipeline's skip-bad-frames option), 2 when the index
itself is unusable.
"""

from __future__ import annotations

import argparse
import sys

from uika_jax.data.checks import check_dataset
from uika_jax.data.format import DatasetFormatError
from uika_jax.tools.head_option import add_head_model_arguments, head_model_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this subcommand's arguments."""
    parser.add_argument("dir", help="the dataset folder")
    add_head_model_arguments(parser)
    parser.add_argument(
        "--params-only", action="store_true", help="check parameters and cameras, not frames"
    )
    parser.add_argument("--limit", type=int, default=50, help="problems listed at most")


def run(args: argparse.Namespace) -> int:
    """Checks the dataset; prints the report; returns the exit status."""
    model = head_model_from_args(args)
    try:
        report = check_dataset(
            args.dir,
            fingerprint=None if model is None else str(model.fingerprint),
            decode_frames=not args.params_only,
            progress=sys.stderr.isatty(),
        )
    except (FileNotFoundError, DatasetFormatError) as e:
        print(f"uika check: {e}", file=sys.stderr)
        return 2
    print(report.summary(args.limit))
    return 0 if report.ok else 1
