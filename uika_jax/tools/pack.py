"""Pack a dataset into ArrayRecord shards: a few large files for a pod's filesystem.

    uika pack DIR --out SHARDS [--records-per-shard K] [--skip-bad-frames]
              [--head-model builtin|PATH [--uv PATH]]

Checks the dataset first (every file decoded; a bad frame is an error, or with
--skip-bad-frames it is left out, counted and listed in the manifest), then writes
record i (one frame with its mask, UV map, parameters and camera, in the order
of the folder source: frames of one identity together) into shard i // K, each
shard under a temporary name then renamed, and SHARDS/shards.json last. A rerun
keeps the finished shards and writes the rest. Training reads either the folder
or the shards (`uika_jax.data.shards.ShardSource`). Exits 0 when packed, 1 when
the dataset check fails or SHARDS holds another pack.
"""

from __future__ import annotations

import argparse
import sys

from uika_jax.data.format import DatasetFormatError
from uika_jax.data.shards import pack_dataset
from uika_jax.tools.head_option import add_head_model_arguments, head_model_from_args

DEFAULT_RECORDS_PER_SHARD = 1024
"""About 0.4 GB shards of 512x512 png frames; every shard file is at least 64 KiB."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this subcommand's arguments."""
    parser.add_argument("dir", help="the dataset folder")
    parser.add_argument("--out", required=True, help="the shard folder (created)")
    parser.add_argument(
        "--records-per-shard",
        type=int,
        default=DEFAULT_RECORDS_PER_SHARD,
        help="K: records (frames) in every shard but the last",
    )
    parser.add_argument(
        "--skip-bad-frames",
        action="store_true",
        help="leave frames that fail the check out (counted, listed in the manifest)",
    )
    add_head_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Packs the dataset; prints what was done; returns the exit status."""
    if args.records_per_shard < 1:
        print(f"uika pack: --records-per-shard must be positive, got {args.records_per_shard}")
        return 1
    model = head_model_from_args(args)
    try:
        result = pack_dataset(
            args.dir,
            args.out,
            records_per_shard=args.records_per_shard,
            fingerprint=None if model is None else str(model.fingerprint),
            skip_bad_frames=args.skip_bad_frames,
            progress=sys.stderr.isatty(),
        )
    except (FileNotFoundError, DatasetFormatError) as e:
        print(f"uika pack: {e}", file=sys.stderr)
        return 1
    kept = result.num_shards - result.shards_written
    print(
        f"{args.out}: {result.num_records} records in {result.num_shards} shards "
        f"({result.shards_written} written, {kept} already there); "
        f"{result.num_skipped} bad frames skipped"
    )
    return 0
