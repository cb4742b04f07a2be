"""The `--head-model` option shared by the subcommands: the built-in head or a FLAME file."""

from __future__ import annotations

import argparse

from uika_jax.head.io import load_head_model
from uika_jax.head.model import HeadModel

BUILTIN = "builtin"


def add_head_model_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """Adds `--head-model` (builtin or a FLAME .pkl/.npz path) and `--uv` (its UV layout)."""
    parser.add_argument(
        "--head-model",
        default=None if not required else BUILTIN,
        help=f"'{BUILTIN}' (the procedural head) or a FLAME .pkl/.npz file",
    )
    parser.add_argument(
        "--uv",
        default=None,
        help="UV layout for a FLAME file (head_template.obj, FLAME_texture.npz)",
    )


def head_model_from_args(args: argparse.Namespace) -> HeadModel | None:
    """The head model `--head-model`/`--uv` name, or None if none was given."""
    if args.head_model is None:
        return None
    if args.head_model == BUILTIN:
        from uika_jax.synthetic.head import synthetic_head_model

        return synthetic_head_model()
    return load_head_model(args.head_model, args.uv)
