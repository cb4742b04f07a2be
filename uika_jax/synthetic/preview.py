"""A contact sheet of the built-in synthetic head: identities x expressions x views.

    python -m uika_jax.synthetic.preview --out head.png [--identities 6 --size 256]

Rows are identities (shape coefficients from `identity_coefficients(seed)`,
albedo from `synthetic_albedo(seed)`); columns are views and expressions
(`COLUMNS`): frontal, three-quarter left and right, profile, then a smile, a
surprise with the jaw open, a pucker seen from the right, and a turned head with the
eyes looking aside. Every image uses the project's face framing
(`uika_jax.render.camera.framing_camera`) and the mesh renderer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from uika_jax.safe_files import write_png
from uika_jax.synthetic.albedo import synthetic_albedo
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.synthetic.views import render_identity


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the contact sheet.

    Attributes:
      name: label.
      expression: an `expression_preset` name.
      yaw_deg: camera orbit about +y (positive: from the subject's left, +x).
      neck: axis-angle of the neck joint.
      gaze: axis-angle of both eye joints.
    """

    name: str
    expression: str = "neutral"
    yaw_deg: float = 0.0
    neck: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gaze: tuple[float, float, float] = (0.0, 0.0, 0.0)


COLUMNS = (
    Column("frontal"),
    Column("three_quarter_left", yaw_deg=35.0),
    Column("three_quarter_right", yaw_deg=-35.0),
    Column("profile", yaw_deg=90.0),
    Column("smile", "smile"),
    Column("surprise_jaw_open", "surprise"),
    Column("pucker", "pucker", yaw_deg=-25.0),
    Column("turned_head", "talk", yaw_deg=20.0, neck=(0.15, 0.45, 0.1), gaze=(0.0, -0.3, 0.0)),
)


def make_contact_sheet(
    identities: int = 6,
    size: int = 256,
    first_seed: int = 0,
    columns: tuple[Column, ...] = COLUMNS,
) -> np.ndarray:
    """Renders the contact sheet (identities rows x len(columns) columns).

    Args:
      identities: number of rows; row i shows seed first_seed + i.
      size: side of each cell in pixels.
      first_seed: seed of the first row.
      columns: the `Column`s to render.

    Returns:
      (identities * size, len(columns) * size, 3) uint8 image.
    """
    model = synthetic_head_model()
    rows = []
    for seed in range(first_seed, first_seed + identities):
        texture = synthetic_albedo(seed, 256)
        cells = [
            np.asarray(
                render_identity(
                    model,
                    seed,
                    expression=c.expression,
                    yaw_deg=c.yaw_deg,
                    neck=c.neck,
                    gaze=c.gaze,
                    size=size,
                    texture=texture,
                ).image
            )
            for c in columns
        ]
        rows.append(np.concatenate(cells, axis=1))
    return np.round(np.concatenate(rows, axis=0) * 255.0).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--identities", type=int, default=6, help="rows (identity seeds)")
    parser.add_argument("--size", type=int, default=256, help="pixels per cell")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first row")
    args = parser.parse_args(argv)
    if args.identities < 1 or args.size < 16 or args.first_seed < 0:
        parser.error("--identities must be >= 1, --size >= 16 and --first-seed >= 0")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        parser.error(f"--out {args.out}: folder {folder} does not exist")
    write_png(args.out, make_contact_sheet(args.identities, args.size, args.first_seed))
    print(f"wrote {args.out}: {args.identities} identities x {len(COLUMNS)} columns")


if __name__ == "__main__":
    main()
