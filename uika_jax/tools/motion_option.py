"""The `--motion` option shared by the avatar tools: a FLAME parameter sequence to drive with.

MOTION is one of

  - a sequence of our dataset format (`uika_jax.data.format`): its `sequence.npz`
    or the SUBJECT/SEQUENCE folder that holds it (only the FLAME parameters are
    read: shape, expression, pose, translation; the cameras are not used);
  - a VHAP export folder (the one holding `transforms.json`), read by
    `uika_jax.data.vhap` (`read_export`, `read_flame_param`): its timesteps in
    order, pose rows global = rotation, neck, jaw, left eye, right eye; a static
    offset is ignored (driving applies no per-vertex offset);
  - `demo:NAME`, a built-in motion of the synthetic motion library
    (`uika_jax.synthetic.motion`, NAME one of `MOTION_KINDS`), `--frames` long
    (seed `--motion-seed`) at the video's frame rate. On the built-in head it moves
    the named expressions; on any other head model the expression stays zero and
    only the pose moves, and the kinds that move nothing else (blinks, brows) are
    refused.

`--frames N` is the demo motion's length; for a file it keeps the first N frames.

Coefficient counts are matched to the head model: a motion with fewer expression
or shape coefficients than the model is padded with zeros (exact: the missing
components are zero), one with more keeps the model's count of leading components
(lossy when the dropped ones are non-zero; a warning says how many were dropped).
Every error names the file or the argument at fault.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from uika_jax.data.format import INDEX_FILE, POSE_ROWS, SEQUENCE_FILE
from uika_jax.data.reader import MAX_SEQUENCE_ELEMENTS, check_sequence_shape
from uika_jax.data.vhap import (
    SPLIT_TRANSFORMS,
    TRANSFORMS_FILE,
    fit_coefficients,
    read_export,
    read_flame_param,
)
from uika_jax.head.lbs import FlameParams
from uika_jax.head.model import HeadModel
from uika_jax.safe_files import read_npz
from uika_jax.synthetic.head import NUM_EXPRESSION
from uika_jax.synthetic.motion import MOTION_KINDS, motion_sequence, usable_kinds

DEMO_PREFIX = "demo:"
DEFAULT_DEMO_FRAMES = 100
"""Length of a demo motion when `--frames` is not given (4 s at 25 fps)."""

VHAP_POSE_KEYS = ("rotation", "neck_pose", "jaw_pose", "left_eye", "right_eye")
"""`read_flame_param`'s keys of the pose rows, in `POSE_ROWS` order."""

_LOG = logging.getLogger(__name__)


class MotionError(ValueError):
    """A motion that cannot be used; the message names the file or argument."""


def add_motion_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Adds `--motion`, `--frames` and `--motion-seed` (see the module docstring)."""
    parser.add_argument(
        "--motion",
        required=required,
        metavar="MOTION",
        help="a dataset sequence (its sequence.npz or SUBJECT/SEQUENCE folder), a VHAP export "
        f"folder, or a built-in motion {DEMO_PREFIX}NAME with NAME one of: "
        f"{', '.join(MOTION_KINDS)}",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        metavar="N",
        help=f"a demo motion's length (default {DEFAULT_DEMO_FRAMES}); for a file, use its "
        "first N frames",
    )
    parser.add_argument(
        "--motion-seed", type=int, default=0, help="the seed of a demo motion (default 0)"
    )


def _fit(values: np.ndarray, count: int, what: str, origin: str) -> np.ndarray:
    """Coefficients (..., n) padded with zeros or truncated to `count`, with a warning if lossy."""
    n = values.shape[-1]
    if n > count and np.any(values[..., count:]):
        dropped = float(np.abs(values[..., count:]).max())
        _LOG.warning(
            "%s: %s has %d coefficients, the head model %d: the last %d are dropped "
            "(largest |value| %.3g)",
            origin, what, n, count, n - count, dropped,
        )  # fmt: skip
    return fit_coefficients(values, count, "fit", what, Path(origin)).astype(np.float32)


def _params(
    head: HeadModel,
    shape: np.ndarray,
    expression: np.ndarray,
    pose: np.ndarray,
    translation: np.ndarray,
    origin: str,
) -> FlameParams:
    """`FlameParams` (F, ...) with the coefficient counts fitted to `head`, checked."""
    frames = pose.shape[0]
    if head.num_joints != len(POSE_ROWS):
        raise MotionError(
            f"{origin}: the motion has {len(POSE_ROWS)} pose rows {POSE_ROWS}, the head model "
            f"{head.num_joints} joints"
        )
    shape = _fit(np.broadcast_to(shape, (frames, shape.shape[-1])), head.num_shape, "shape", origin)
    return FlameParams(
        shape=shape,
        expression=_fit(expression, head.num_expression, "expression", origin),
        pose=pose.astype(np.float32),
        translation=translation.astype(np.float32),
    )


def read_sequence_motion(path: Path, head: HeadModel) -> FlameParams:
    """The FLAME parameters of a dataset sequence's `sequence.npz` (module docstring).

    Raises:
      MotionError: naming the file, if it is unreadable, lacks an array, or has
        inconsistent shapes or non-finite values.
    """
    keys = ("shape", "expression", "pose", "translation")
    raw, _ = read_npz(
        path,
        keys,
        check_shape=check_sequence_shape,
        max_total_bytes=4 * MAX_SEQUENCE_ELEMENTS,
        error=MotionError,
    )
    missing = [k for k in keys if k not in raw]
    if missing:
        raise MotionError(f"{path}: missing {', '.join(missing)} (not a sequence.npz?)")
    frames = raw["pose"].shape[0] if raw["pose"].ndim == 3 else 0
    expected = {
        "shape": (None,),
        "expression": (frames, None),
        "pose": (frames, len(POSE_ROWS), 3),
        "translation": (frames, 3),
    }
    for key, want in expected.items():
        got = raw[key].shape
        if (
            frames < 1
            or len(got) != len(want)
            or any(w not in (None, g) for w, g in zip(want, got, strict=True))
        ):
            shown = tuple("n" if w is None else w for w in want)
            raise MotionError(f"{path}: '{key}' has shape {got}, expected {shown} (F >= 1)")
        if raw[key].dtype.kind != "f" or not np.all(np.isfinite(raw[key])):
            raise MotionError(f"{path}: '{key}' is not finite floats")
    return _params(
        head, raw["shape"], raw["expression"], raw["pose"], raw["translation"], str(path)
    )


def read_vhap_motion(folder: Path, head: HeadModel) -> FlameParams:
    """The FLAME parameters of a VHAP export's timesteps, in order (module docstring).

    Raises:
      FileNotFoundError, VhapExportError: from `uika_jax.data.vhap`, naming the file.
    """
    export = read_export(folder)
    frames = [read_flame_param(export.flame_params[t]) for t in export.timesteps]
    origin = str(folder)
    sizes = {p["expr"].shape[0] for p in frames}
    if len(sizes) != 1:
        raise MotionError(f"{folder}: the timesteps' 'expr' sizes differ: {sorted(sizes)}")
    return _params(
        head,
        frames[0]["shape"],
        np.stack([p["expr"] for p in frames]),
        np.stack([[p[key] for key in VHAP_POSE_KEYS] for p in frames]),
        np.stack([p["translation"] for p in frames]),
        origin,
    )


def demo_motion(
    name: str, head: HeadModel, num_frames: int, *, fps: float = 25.0, seed: int = 0
) -> FlameParams:
    """A built-in motion of the synthetic library, for `head` (module docstring).

    Raises:
      MotionError: naming the argument, for an unknown or unusable name, or F < 1.
    """
    named = head.fingerprint.source == "synthetic" and head.num_expression == NUM_EXPRESSION
    kinds = usable_kinds(named)
    if name not in kinds:
        why = "unknown" if name not in MOTION_KINDS else "moves only named expressions, which"
        suffix = "" if name not in MOTION_KINDS else " this head model does not have"
        raise MotionError(
            f"--motion {DEMO_PREFIX}{name}: {why}{suffix}; built-in motions: "
            f"{', '.join(DEMO_PREFIX + k for k in kinds)}"
        )
    if num_frames < 1 or seed < 0:
        raise MotionError(f"--frames must be >= 1 and --motion-seed >= 0, got {num_frames}, {seed}")
    motion = motion_sequence(
        name,
        num_frames,
        seed,
        num_expression=head.num_expression,
        fps=fps,
        named_expressions=named,
    )
    return _params(
        head,
        np.zeros(head.num_shape, np.float32),
        motion.expression,
        motion.pose,
        motion.translation,
        f"--motion {DEMO_PREFIX}{name}",
    )


def load_motion(
    spec: str,
    head: HeadModel,
    *,
    frames: int | None = None,
    fps: float = 25.0,
    seed: int = 0,
) -> FlameParams:
    """The motion MOTION names, for `head`, with leading dim (F,) (module docstring).

    Args:
      spec: the `--motion` value.
      head: the head model it drives (its coefficient counts and joints).
      frames: a demo motion's length; for a file, keep its first `frames` frames.
      fps: a demo motion's frame rate.
      seed: a demo motion's seed.

    Returns:
      `FlameParams` of float32 NumPy arrays: shape (F, S), expression (F, E),
      pose (F, J, 3), translation (F, 3), S, E and J the head model's.

    Raises:
      MotionError, FileNotFoundError: naming the file or argument at fault (a VHAP
        export's own errors are `uika_jax.data.vhap.VhapExportError`, a ValueError).
    """
    if frames is not None and frames < 1:
        raise MotionError(f"--frames must be >= 1, got {frames}")
    if spec.startswith(DEMO_PREFIX):
        return demo_motion(
            spec[len(DEMO_PREFIX) :], head, frames or DEFAULT_DEMO_FRAMES, fps=fps, seed=seed
        )
    path = Path(spec)
    if path.is_dir() and any((path / n).is_file() for n in (TRANSFORMS_FILE, *SPLIT_TRANSFORMS)):
        params = read_vhap_motion(path, head)
    elif path.is_dir() and (path / SEQUENCE_FILE).is_file():
        params = read_sequence_motion(path / SEQUENCE_FILE, head)
    elif path.is_file():
        params = read_sequence_motion(path, head)
    elif path.is_dir() and (path / INDEX_FILE).is_file():
        raise MotionError(
            f"--motion {spec}: a whole dataset; name one sequence, DIR/SUBJECT/SEQUENCE"
        )
    elif path.is_dir():
        raise MotionError(
            f"--motion {spec}: the folder holds neither {SEQUENCE_FILE} (a dataset sequence) "
            f"nor {TRANSFORMS_FILE} (a VHAP export)"
        )
    else:
        raise MotionError(
            f"--motion {spec}: no such file or folder (nor a built-in motion "
            f"{DEMO_PREFIX}NAME, NAME one of {', '.join(MOTION_KINDS)})"
        )
    if frames is not None:
        params = FlameParams(
            shape=params.shape[:frames],
            expression=params.expression[:frames],
            pose=params.pose[:frames],
            translation=params.translation[:frames],
        )
    return params


def motion_from_args(
    args: argparse.Namespace, head: HeadModel, *, fps: float = 25.0
) -> FlameParams:
    """The motion of `--motion`, `--frames` and `--motion-seed` (see `load_motion`).

    Args:
      args: parsed arguments of a parser given `add_motion_arguments`.
      head: the head model driven.
      fps: a demo motion's frame rate (the video's).
    """
    return load_motion(args.motion, head, frames=args.frames, fps=fps, seed=args.motion_seed)
