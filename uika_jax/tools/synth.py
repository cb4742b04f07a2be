"""Generate the synthetic multi-view head dataset (the built-in procedural head).

    uika synth --out DIR --identities N [--views 9] [--sequences 2] [--frames 16]
        [--size 128] [--seed 0] [--shard K/N] [--workers W] [--supersample 2]
        [--shadows 2] [--no-hair] [--format png|jpg]

Identities x the first --views of the 9 fixed views (yaw, pitch in degrees:
(0, 0), (-25, 0), (25, 0), (0, 15), (0, -15), (-55, 0), (55, 0), (-40, 20),
(40, 20), jittered per identity) x --sequences motion sequences of --frames
frames shared by all views, with masks, ground-truth UV maps, FLAME-format
parameters and cameras, in the dataset format (README). Deterministic by
--seed. --shard K/N writes part K (1-based) of N: run N machines (a job array)
with the same arguments; readers combine the part indexes. A rerun finishes an
interrupted run without redoing finished sequences.
"""

from __future__ import annotations

import argparse
import sys

from uika_jax.synthetic.dataset import SynthConfig, generate


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be K/N, got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k - 1, n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this subcommand's arguments."""
    parser.add_argument("--out", required=True, help="the dataset folder (its parent must exist)")
    parser.add_argument("--identities", type=int, required=True)
    parser.add_argument("--views", type=int, default=9, help="cameras per identity, 1 to 9")
    parser.add_argument("--sequences", type=int, default=2, help="motion sequences per identity")
    parser.add_argument("--frames", type=int, default=16, help="frames per sequence")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="K/N: write part K of N")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    parser.add_argument("--supersample", type=int, default=1, help="anti-aliasing factor")
    parser.add_argument("--shadows", type=int, default=0, help="lights casting shadows (0-4)")
    parser.add_argument("--no-hair", action="store_true", help="render bald heads")
    parser.add_argument("--format", choices=("png", "jpg"), default="png")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)


def run(args: argparse.Namespace) -> int:
    """Generates the dataset (or one part); returns the exit status."""
    try:
        config = SynthConfig(
            identities=args.identities,
            views=args.views,
            sequences=args.sequences,
            frames=args.frames,
            size=args.size,
            seed=args.seed,
            supersample=args.supersample,
            shadow_lights=args.shadows,
            hair=not args.no_hair,
            image_format=args.format,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
        )
        part, num_parts = args.shard
        index = generate(
            args.out,
            config,
            part=part,
            num_parts=num_parts,
            workers=args.workers,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"uika synth: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(index.subjects)} identities, {index.num_frames} frames")
    return 0
