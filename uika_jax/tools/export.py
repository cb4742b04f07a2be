"""Export an avatar as a 3D Gaussian splat file (gsplat's PLY, .splat, compressed PLY).

    uika export avatar.npz --ply out.ply [--format ply|splat|ply_compressed]
                           [--frame K --motion MOTION] [--animatable DIR]

The splat file holds the canonical Gaussians, or with `--frame K` those posed for
frame K of a motion (as `uika drive` poses them). `--format ply` (the default) is the
standard 3DGS PLY, byte for byte what gsplat 1.5.3's `export_splats(format="ply")`
writes, which common splat viewers open; `splat` is antimatter15's format and
`ply_compressed` SuperSplat's. `--animatable DIR` also writes a package (npz +
README.txt) with the skinning weights, blendshapes and skeleton that another engine
needs to drive the avatar without this code; when the head model is FLAME, those are
FLAME-derived data under FLAME's licence, and the command says so.

The head model is the one in the avatar's config (head.model_path; the built-in head
when empty), or `--head-model`; it must be the one the avatar was made with.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from uika_jax.head.model import HeadModel
from uika_jax.tools.animatable import flame_notice, write_animatable
from uika_jax.tools.avatar_file import Avatar, read_avatar
from uika_jax.tools.head_option import add_head_model_arguments, head_model_from_args
from uika_jax.tools.motion_option import add_motion_arguments, motion_from_args
from uika_jax.tools.splat_formats import FORMATS, write_splats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options (module docstring)."""
    parser.add_argument("avatar", help="the avatar file (.npz) `uika reconstruct` wrote")
    parser.add_argument("--ply", "--out", dest="out", help="the splat file to write")
    parser.add_argument("--format", choices=FORMATS, default="ply", help="the splat format")
    parser.add_argument(
        "--frame",
        type=int,
        default=None,
        help="pose the Gaussians for this frame of --motion (default: canonical)",
    )
    parser.add_argument(
        "--animatable", metavar="DIR", help="also write the animatable package into DIR"
    )
    add_motion_arguments(parser, required=False)
    add_head_model_arguments(parser)


def posed_splats(
    avatar: Avatar, head: HeadModel, args: argparse.Namespace
) -> tuple[np.ndarray, np.ndarray]:
    """(means (K, 3), quats (K, 4)) of frame `args.frame` of the motion, as `drive` poses them."""
    import jax

    from uika_jax.models.avatar import drive

    params = motion_from_args(args, head)
    frames = int(np.shape(params.pose)[0])
    if not 0 <= args.frame < frames:
        raise ValueError(f"--frame {args.frame} is outside the motion's {frames} frames")
    one = dataclasses.replace(
        params,
        **{
            field.name: np.asarray(getattr(params, field.name))[args.frame][None, None]
            for field in dataclasses.fields(params)
        },
    )
    posed = jax.jit(drive)(head, avatar.anchors, avatar.canonical(), one)
    return np.asarray(posed.means[0, 0]), np.asarray(posed.quats[0, 0])


def run(args: argparse.Namespace) -> int:
    """Writes the splat file and, with --animatable, the package; returns the exit status."""
    if args.out is None and args.animatable is None:
        print(
            "uika export: give --ply OUT (the splat file) and/or --animatable DIR", file=sys.stderr
        )
        return 2
    if (args.frame is None) != (args.motion is None):
        print("uika export: --frame K and --motion MOTION go together", file=sys.stderr)
        return 2
    try:
        avatar = read_avatar(args.avatar)
        head = avatar.head_model(head_model_from_args(args), origin=args.avatar)
        if args.out is not None:
            if args.frame is None:
                means, quats = avatar.means, avatar.quats
                pose = "canonical"
            else:
                means, quats = posed_splats(avatar, head, args)
                pose = f"frame {args.frame}"
            size = write_splats(
                args.out,
                args.format,
                means,
                avatar.log_scales,
                quats,
                avatar.opacity_logits,
                avatar.colors,
            )
            print(
                f"wrote {args.out}: {avatar.num_gaussians} Gaussians ({pose}), "
                f"{args.format}, {size:,} bytes"
            )
        if args.animatable is not None:
            package = write_animatable(args.animatable, avatar, head)
            print(f"wrote {package} and {Path(args.animatable) / 'README.txt'}")
            notice = flame_notice(head)
            if notice:
                print(f"NOTE: {notice}")
    except (OSError, ValueError) as error:
        print(f"uika export: {error}", file=sys.stderr)
        return 1
    return 0
