"""Drive an avatar with a FLAME motion and write the video (and/or its PNG frames).

    uika drive AVATAR.npz --motion MOTION --out video.mp4 [--frames-dir DIR]
        [--size 512] [--fps 25] [--orbit DEGREES] [--background r,g,b]
        [--head-model builtin|PATH [--uv UV]] [--frames N] [--chunk 8]

MOTION is a dataset sequence, a VHAP export folder or a built-in `demo:NAME`
(`uika_jax.tools.motion_option`). The head model is the one in the avatar's config
(`head.model_path`, empty: the built-in synthetic head) unless `--head-model` names
one; an avatar made with another head model is refused. Each frame is the avatar
posed by `uika_jax.models.avatar.drive` (expression, jaw, neck, eyes, global pose and
translation; shape beta = 0) and rendered by `uika_jax.models.avatar.render`, jitted,
`--chunk` frames a call.

The camera frames the head model's template per the project's face framing (the
template's bounding box centred, its height `HEAD_FRACTION` of the image), aimed at
the template's centre moved by the motion's mean translation; `--orbit DEGREES`
turns it about the vertical axis through that point by DEGREES over the video,
starting in front (360: one full turn).

The rasterizer's intersection capacity is the config's `render.capacity` when set,
else calibrated on frames spread over the motion (`calibrate_capacity`, the config's
`render.capacity_headroom`). A chunk that overflows it is rendered again with a
capacity measured on that chunk; an overflow that remains (a `render.tile_cap` in the
config) is reported on stderr for each chunk and counted in the summary, never
silently dropped. Exit status: 0 on success, 1
if frames were rendered with an overflow, 2 on bad input (a missing or corrupt
avatar, another head model, an unknown motion, a bad option).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from uika_jax.head.anchors import Anchors
from uika_jax.head.lbs import FlameParams
from uika_jax.head.model import HeadModel
from uika_jax.models.avatar import Rendered, drive, render
from uika_jax.models.gaussians import CanonicalGaussians
from uika_jax.render import RasterConfig
from uika_jax.render.camera import framing_camera
from uika_jax.render.capacity import calibrate_capacity
from uika_jax.render.rasterize import overflow_message
from uika_jax.safe_files import write_png
from uika_jax.tools.avatar_file import Avatar, read_avatar
from uika_jax.tools.head_option import add_head_model_arguments, head_model_from_args
from uika_jax.tools.motion_option import add_motion_arguments, motion_from_args
from uika_jax.video import write_video

DEFAULT_BACKGROUND = (1.0, 1.0, 1.0)
"""Behind the avatar when neither `--background` nor the avatar's config sets it."""

CALIBRATION_FRAMES = 8
"""Frames, spread over the motion, on which the rasterizer's capacity is calibrated."""

DEFAULT_HEADROOM = 1.5
"""Capacity headroom when the avatar's config has no `render.capacity_headroom`."""


@dataclasses.dataclass(frozen=True)
class DriveSummary:
    """What a drive rendered.

    Attributes:
      num_frames: frames rendered.
      capacity: the rasterizer's intersection slots at the end.
      rerendered_chunks: chunks rendered again after an overflow.
      overflow_frames: frames still rendered with an overflow (0 unless tile_cap).
    """

    num_frames: int
    capacity: int
    rerendered_chunks: int
    overflow_frames: int


def parse_background(text: str) -> tuple[float, float, float]:
    """'r,g,b' with each in [0, 1] -> a colour tuple.

    Raises:
      ValueError: naming `--background`, for anything else.
    """
    try:
        colour = tuple(float(c) for c in text.split(","))
    except ValueError:
        colour = ()
    if len(colour) != 3 or not all(0.0 <= c <= 1.0 for c in colour):
        raise ValueError(f"--background {text!r}: expected r,g,b with each in [0, 1]")
    return colour


def orbit_cameras(
    head: HeadModel, translation: np.ndarray, size: int, orbit_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame cameras framing the head (module docstring): (viewmats (F, 4, 4), Ks (F, 3, 3)).

    Args:
      head: the head model (its template's bounding box sets centre and height).
      translation: the motion's translations (F, 3).
      size: image side in pixels.
      orbit_deg: total yaw turned over the F frames, starting at 0 (in front).
    """
    vertices = np.asarray(head.v_template, np.float64)
    centre = 0.5 * (vertices.min(0) + vertices.max(0)) + np.mean(translation, axis=0)
    height = float(np.ptp(vertices[:, 1]))
    frames = translation.shape[0]
    cameras = [framing_camera(centre, height, size, orbit_deg * f / frames) for f in range(frames)]
    return np.stack([v for v, _ in cameras]), np.stack([k for _, k in cameras])


@functools.partial(jax.jit, static_argnames=("size", "background", "config"))
def render_driven(
    head: HeadModel,
    anchors: Anchors,
    gaussians: CanonicalGaussians,
    params: FlameParams,
    viewmats: jax.Array,
    Ks: jax.Array,
    *,
    size: int,
    background: tuple[float, float, float],
    config: RasterConfig,
) -> Rendered:
    """`render(drive(...))` of F frames of one avatar, jitted; params and cameras (1, F, ...)."""
    posed = drive(head, anchors, gaussians, params)
    return render(posed, viewmats, Ks, size, size, background=background, config=config)


def _frames_of(params: FlameParams, frames: np.ndarray) -> FlameParams:
    """The parameters of the given frames, with a leading batch of one: (1, len(frames), ...)."""
    return jax.tree.map(lambda x: jnp.asarray(x[frames])[None], params)


def _capacity_for(
    head, anchors, gaussians, params, viewmats, Ks, size: int, base: RasterConfig, headroom: float
) -> RasterConfig:
    """`base` with a capacity calibrated on the given frames (leading dims (1, F))."""
    posed = jax.jit(drive)(head, anchors, gaussians, params)
    return calibrate_capacity(
        posed.means, posed.quats, posed.scales(), posed.opacities(), viewmats[..., None, :, :],
        Ks[..., None, :, :], size, size, headroom=headroom, with_tile_cap=False, base=base,
    )  # fmt: skip


def drive_frames(
    avatar: Avatar,
    head: HeadModel,
    params: FlameParams,
    *,
    size: int,
    orbit_deg: float = 0.0,
    background: tuple[float, float, float] = DEFAULT_BACKGROUND,
    chunk: int = 8,
    progress: bool = False,
    report: list | None = None,
) -> Iterator[np.ndarray]:
    """Renders the avatar driven by `params`, one uint8 (size, size, 3) frame at a time.

    Args:
      avatar: the avatar (checked against `head` by the caller).
      head: its head model.
      params: the motion, leading dim (F,).
      size: image side.
      orbit_deg: see `orbit_cameras`.
      background: RGB in [0, 1].
      chunk: frames a jitted call renders (the last chunk is padded by repeating its
        last frame, so there is one compilation).
      progress: show a tqdm progress bar on stderr.
      report: if given, a `DriveSummary` is appended once every frame is out.

    Yields:
      The frames in order.
    """
    num_frames = int(params.pose.shape[0])
    viewmats, Ks = orbit_cameras(head, np.asarray(params.translation), size, orbit_deg)
    gaussians = avatar.canonical()
    head_j, anchors = jax.tree.map(jnp.asarray, (head, avatar.anchors))
    render_settings = avatar.config.get("render") or {}
    base = RasterConfig(
        backend=render_settings.get("backend", "auto"),
        tile_cap=render_settings.get("tile_cap"),
        warn_on_overflow=False,
    )
    headroom = float(render_settings.get("capacity_headroom") or DEFAULT_HEADROOM)
    if render_settings.get("capacity"):
        config = dataclasses.replace(base, capacity=int(render_settings["capacity"]))
    else:  # a fixed number of frames (repeated for short motions): one compilation
        sample = np.linspace(0, num_frames - 1, CALIBRATION_FRAMES).round().astype(int)
        config = _capacity_for(
            head_j, anchors, gaussians, _frames_of(params, sample),
            jnp.asarray(viewmats[sample])[None], jnp.asarray(Ks[sample])[None], size, base,
            headroom,
        )  # fmt: skip
    rerendered = overflow_frames = 0
    with tqdm(total=num_frames, disable=not progress, desc="drive", unit="frame") as bar:
        for start in range(0, num_frames, chunk):
            count = min(chunk, num_frames - start)
            frames = np.minimum(np.arange(start, start + chunk), num_frames - 1)
            inputs = (
                _frames_of(params, frames),
                jnp.asarray(viewmats[frames])[None],
                jnp.asarray(Ks[frames])[None],
            )
            call = functools.partial(
                render_driven, head_j, anchors, gaussians, *inputs, size=size, background=background
            )
            rendered = call(config=config)
            if overflow_message(jax.device_get(rendered.meta)) is not None:
                measured = _capacity_for(head_j, anchors, gaussians, *inputs, size, base, headroom)
                config = dataclasses.replace(
                    config, capacity=max(int(config.capacity), int(measured.capacity))
                )
                rendered = call(config=config)
                rerendered += 1
                message = overflow_message(jax.device_get(rendered.meta))
                if message is not None:
                    overflow_frames += count
                    print(f"frames {start}-{start + count - 1}: {message}", file=sys.stderr)
            images = np.asarray(rendered.images[0, :count])
            for image in images:
                yield np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
                bar.update(1)
    if report is not None:
        report.append(DriveSummary(num_frames, int(config.capacity), rerendered, overflow_frames))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this subcommand's arguments."""
    parser.add_argument("avatar", help="the avatar file (uika reconstruct's .npz)")
    add_motion_arguments(parser)
    parser.add_argument("--out", default=None, help="the mp4 video to write")
    parser.add_argument(
        "--frames-dir", default=None, help="also (or instead) write the frames as DIR/000000.png..."
    )
    parser.add_argument("--size", type=int, default=512, help="side of the square video")
    parser.add_argument("--fps", type=float, default=25.0, help="frames per second")
    parser.add_argument(
        "--orbit",
        type=float,
        default=0.0,
        metavar="DEGREES",
        help="turn the camera this many degrees about the head over the video (360: once round)",
    )
    parser.add_argument(
        "--background",
        default=None,
        help="r,g,b in [0, 1] (default: the avatar's config render.background, else white)",
    )
    parser.add_argument("--chunk", type=int, default=8, help="frames rendered per jitted call")
    add_head_model_arguments(parser)


def _check_options(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first bad option."""
    if args.out is None and args.frames_dir is None:
        raise ValueError("give --out video.mp4, --frames-dir DIR or both")
    if not 16 <= args.size <= 4096:
        raise ValueError(f"--size {args.size}: expected 16..4096")
    if not 0 < args.fps <= 1000:
        raise ValueError(f"--fps {args.fps}: expected a positive rate (at most 1000)")
    if not 1 <= args.chunk <= 1024:
        raise ValueError(f"--chunk {args.chunk}: expected 1..1024")
    if not np.isfinite(args.orbit):
        raise ValueError(f"--orbit {args.orbit}: expected a number of degrees")
    for option, path in (("--out", args.out), ("--frames-dir", args.frames_dir)):
        folder = None if path is None else Path(path).resolve().parent
        if folder is not None and not folder.is_dir():
            raise ValueError(f"{option} {path}: folder {folder} does not exist")


def run(args: argparse.Namespace) -> int:
    """Drives the avatar and writes the video and/or frames; returns the exit status."""
    try:
        _check_options(args)
        avatar = read_avatar(args.avatar)
        head = avatar.head_model(head_model_from_args(args), origin=args.avatar)
        params = motion_from_args(args, head, fps=args.fps)
        config_background = (avatar.config.get("render") or {}).get("background")
        if args.background is not None:
            background = parse_background(args.background)
        elif config_background is not None:
            background = parse_background(",".join(str(c) for c in config_background))
        else:
            background = DEFAULT_BACKGROUND
    except (FileNotFoundError, ValueError) as e:
        print(f"uika drive: {e}", file=sys.stderr)
        return 2
    report: list[DriveSummary] = []
    frames = drive_frames(
        avatar, head, params, size=args.size, orbit_deg=args.orbit, background=background,
        chunk=args.chunk, progress=sys.stderr.isatty(), report=report,
    )  # fmt: skip
    if args.frames_dir is not None:
        folder = Path(args.frames_dir)
        folder.mkdir(exist_ok=True)
        frames = _saved(frames, folder)
    if args.out is not None:
        write_video(args.out, frames, fps=args.fps)
    else:
        for _ in frames:
            pass
    (summary,) = report
    written = " and ".join(str(p) for p in (args.out, args.frames_dir) if p is not None)
    print(
        f"wrote {written}: {summary.num_frames} frames of {args.size}x{args.size} at "
        f"{args.fps:g} fps, {avatar.num_gaussians} Gaussians (capacity {summary.capacity}, "
        f"{summary.rerendered_chunks} chunks re-rendered after an overflow)"
    )
    if summary.overflow_frames:
        print(
            f"warning: {summary.overflow_frames} frames were rendered with a rasterizer overflow "
            "(see above)",
            file=sys.stderr,
        )
        return 1
    return 0


def _saved(frames: Iterator[np.ndarray], folder: Path) -> Iterator[np.ndarray]:
    """Passes the frames on, writing each to folder/NNNNNN.png first."""
    for index, frame in enumerate(frames):
        write_png(folder / f"{index:06d}.png", frame)
        yield frame
