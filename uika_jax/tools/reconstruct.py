"""Reconstruct an avatar from photos or a video with a trained run's model.

    uika reconstruct PHOTOS_OR_VIDEO [MORE ...] --ckpt RUN --out avatar.npz
        [--step S] [--max-views N] [--every K] [--coverage PATH]

Inputs: photo files (.png, .jpg), folders of them, and videos (.mp4, .mov, .avi, ...);
a video gives every K-th frame (--every), then at most N frames spread evenly over it.
In each picture dlib's detector finds the largest face, and its head is cropped to the
project's framing (square, centred, crown to chin 70% of the height) at the model's
image size (`uika_jax.tools.photo_inputs`). At most N views are kept, spread evenly
(N: --max-views, at most and by default the model's num_views). Pictures without a
face are skipped with a warning naming them; if none has a face the command fails.

One forward pass of the run's newest (or --step) checkpoint: the views are padded to
the model's num_views with a view mask, so every reconstruction compiles one shape.
Written: the avatar file (`uika_jax.tools.avatar_file`: canonical Gaussians, anchor
binding, head fingerprint, the run's config) and beside it (`--coverage`, default the
avatar's name with .png) a picture of the inputs as framed and the UV maps of what they
observed: the aggregated colour, the coverage (views per texel; 0 = guessed) and the
confidence gamma (`uika_jax.tools.coverage_png`).

Exit status 0 on success; 2 with a one-line message for bad input (an empty folder, an
unreadable file, no face anywhere, a missing run or checkpoint, a head model that does
not match the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from uika_jax.evaluation.face_models import FaceBackendError
from uika_jax.evaluation.trained_model import TrainedModel, load_trained_model, saved_config
from uika_jax.head.io import HeadModelFileError
from uika_jax.head.uv_raster import uv_rasterize
from uika_jax.models.avatar import AvatarOutput
from uika_jax.safe_files import write_png
from uika_jax.tools.avatar_file import (
    Avatar,
    AvatarFileError,
    avatar_from_gaussians,
    write_avatar,
)
from uika_jax.tools.coverage_png import coverage_figure
from uika_jax.tools.photo_inputs import FaceFramer, InputError, describe, frame_inputs
from uika_jax.training.checkpointing import CheckpointMismatchError

USER_ERRORS = (
    InputError,
    OSError,
    CheckpointMismatchError,
    HeadModelFileError,
    AvatarFileError,
    FaceBackendError,
)
"""Errors reported as one line (the message names the file or argument), no traceback:
bad inputs, a missing run or checkpoint, a head model that does not match it, a file
that cannot be written, the face models' package missing."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments (module docstring)."""
    parser.add_argument(
        "inputs", nargs="+", metavar="PHOTOS_OR_VIDEO", help="photos, folders of photos, videos"
    )
    parser.add_argument(
        "--ckpt", required=True, metavar="RUN", help="the run's folder (train.py --workdir)"
    )
    parser.add_argument(
        "--out", required=True, metavar="AVATAR", help="the avatar file to write (.npz)"
    )
    parser.add_argument(
        "--step", type=int, default=None, metavar="S", help="checkpoint step (default newest)"
    )
    parser.add_argument(
        "--max-views",
        type=int,
        default=None,
        metavar="N",
        help="most views used (default and at most the model's num_views)",
    )
    parser.add_argument(
        "--every", type=int, default=None, metavar="K", help="keep every K-th video frame"
    )
    parser.add_argument(
        "--coverage",
        default=None,
        metavar="PATH",
        help="the coverage picture (default: --out with .png)",
    )


def model_batch(views: list[np.ndarray], num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's input for one sample: views padded to `num_views` with a view mask.

    Args:
      views: 1 to num_views framed views, (S, S, 3) uint8.
      num_views: the model's view count.

    Returns:
      (images (1, num_views, S, S, 3) float32 in [0, 1], zero in padded views;
       view_mask (1, num_views) bool, True for the given views).
    """
    if not 1 <= len(views) <= num_views:
        raise ValueError(f"expected 1 to {num_views} views, got {len(views)}")
    stacked = np.stack([np.asarray(v, np.uint8) for v in views]).astype(np.float32) / 255.0
    images = np.zeros((1, num_views, *stacked.shape[1:]), np.float32)
    images[0, : len(views)] = stacked
    view_mask = np.arange(num_views)[None] < len(views)
    return images, view_mask


def reconstruct_views(trained: TrainedModel, views: list[np.ndarray]) -> AvatarOutput:
    """One forward pass of the trained model on framed views (padded to its num_views)."""
    images, view_mask = model_batch(views, int(trained.config.model.num_views))
    return trained.reconstruct_fn()(images, view_mask)


def avatar_of(trained: TrainedModel, output: AvatarOutput) -> Avatar:
    """The avatar file's content for a forward pass's single sample."""
    config = json.loads(trained.config.to_json_best_effort())
    return avatar_from_gaussians(output.gaussians, 0, trained.anchors, trained.fingerprint, config)


def coverage_image(
    trained: TrainedModel, output: AvatarOutput, views: list[np.ndarray], title: str
) -> tuple[np.ndarray, float]:
    """The coverage picture, and the share of the head's texels seen by at least one view."""
    reprojection = output.reprojection
    resolution = int(reprojection.n_views.shape[-1])
    on_layout = np.asarray(uv_rasterize(trained.head, resolution).mask, bool)
    views_per_texel = np.asarray(reprojection.n_views[0])
    seen = float((views_per_texel[on_layout] > 0).mean()) if on_layout.any() else 0.0
    picture = coverage_figure(
        views,
        np.asarray(reprojection.i_aggr[0]),
        views_per_texel,
        np.asarray(reprojection.gamma[0, ..., 0]),
        on_layout,
        title=f"{title}; {100 * seen:.0f}% of the head's texels seen",
    )
    return picture, seen


def _max_views(requested: int | None, model_views: int) -> int:
    if requested is None:
        return model_views
    if not 1 <= requested <= model_views:
        raise InputError(
            f"--max-views {requested}: the model takes 1 to {model_views} views (num_views)"
        )
    return requested


def _reconstruct(args: argparse.Namespace) -> str:
    """The command's work; returns the summary line."""
    run_dir = Path(args.ckpt)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"--ckpt {run_dir}: no such folder (give the --workdir of a train.py run)"
        )
    out = Path(args.out)
    coverage = Path(args.coverage) if args.coverage else out.with_suffix(".png")
    for path, flag in ((out, "--out"), (coverage, "--coverage")):
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{flag} {path}: the folder {path.parent} does not exist")
    if coverage.resolve() == out.resolve():
        raise InputError(
            f"--coverage {coverage} is the avatar file (--out): give the picture another name"
        )
    config = saved_config(run_dir, args.step)
    num_views = int(config.model.num_views)
    max_views = _max_views(args.max_views, num_views)
    framer = FaceFramer(int(config.model.image_size))
    framed = frame_inputs(args.inputs, framer, max_views, args.every)
    if framed.no_face:
        print(
            f"uika reconstruct: warning: no face found in {len(framed.no_face)} picture(s), "
            f"skipped: {describe(framed.no_face)}",
            file=sys.stderr,
        )
    if framed.dropped:
        found = len(framed.views) + len(framed.dropped)
        print(
            f"uika reconstruct: using {len(framed.views)} of {found} faces (at most "
            f"{max_views} views), spread evenly; left out: {describe(framed.dropped)}",
            file=sys.stderr,
        )
    trained = load_trained_model(run_dir, step=args.step)
    views = [view.image for view in framed.views]
    output = reconstruct_views(trained, views)
    avatar = avatar_of(trained, output)
    write_avatar(out, avatar)
    title = f"{len(views)} view(s), {run_dir.name} step {trained.step}"
    picture, seen = coverage_image(trained, output, views, title)
    write_png(coverage, picture)
    return (
        f"wrote {out} ({avatar.num_gaussians} Gaussians from {len(views)} view(s)) and "
        f"{coverage} ({100 * seen:.0f}% of the head's texels seen by a view)"
    )


def run(args: argparse.Namespace) -> int:
    """Runs the command; 0 on success, 2 with a one-line message on bad input."""
    try:
        summary = _reconstruct(args)
    except USER_ERRORS as error:
        print(f"uika reconstruct: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0
