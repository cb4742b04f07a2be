"""Converts a FLAME model file to the project's clean `.npz`.

    python -m uika_jax.head.convert generic_model.pkl flame2020.npz --uv head_template.obj
    python -m uika_jax.head.convert flame2023.pkl flame2023.npz --uv FLAME_texture.npz

The input is anything `load_head_model` reads (official FLAME `.pkl`, an `.npz`
of the same keys, or a clean `.npz`). The output holds the `HeadModel` arrays,
the kinematic tree, the UV layout if given and the fingerprint's source and
version, so `load_head_model(OUTPUT)` returns the same model as loading the
input. It is written to a temporary file beside OUTPUT and renamed into place,
so an interrupted run leaves no half-written file. FLAME is licensed: keep the
converted file with your FLAME download, never in this repository.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uika_jax.head.io import NUM_SHAPE_IN_FILE, load_head_model, save_head_model


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the converter.

    Args:
      argv: command-line arguments without the program name; None reads sys.argv.

    Returns:
      The exit status: 0 on success, 1 if the input cannot be read or the output written.
    """
    parser = argparse.ArgumentParser(
        prog="python -m uika_jax.head.convert",
        description="Convert a FLAME model file (.pkl or .npz) to the project's clean .npz.",
    )
    parser.add_argument("input", help="FLAME model: generic_model.pkl, flame2023.pkl, ... or .npz")
    parser.add_argument("output", help="the .npz to write")
    parser.add_argument(
        "--uv", default=None, help="UV layout to embed: head_template.obj or FLAME_texture.npz"
    )
    parser.add_argument(
        "--num_shape_in_file",
        type=int,
        default=NUM_SHAPE_IN_FILE,
        help="identity components before the expression components in shapedirs",
    )
    args = parser.parse_args(argv)
    try:
        model = load_head_model(args.input, args.uv, num_shape_in_file=args.num_shape_in_file)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        path = save_head_model(model, args.output)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {path}: {model.fingerprint}, {model.num_vertices} vertices, "
        f"{len(model.faces)} faces, {model.num_shape} shape + {model.num_expression} expression "
        f"components, {model.num_joints} joints, UV layout: {'yes' if model.has_uv else 'no'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
