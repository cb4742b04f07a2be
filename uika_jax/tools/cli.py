"""The `uika` console script: one subcommand per module of `uika_jax.tools`.

    uika check DIR [--head-model builtin|PATH] [--params-only]
    uika synth --out DIR --identities N ...

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`
(the exit status) and a module docstring whose first line is its help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "check": "uika_jax.tools.check",
    "import-vhap": "uika_jax.tools.import_vhap",
    "pack": "uika_jax.tools.pack",
    "sheet": "uika_jax.tools.sheet",
    "synth": "uika_jax.tools.synth",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="uika", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = module.__doc__ or name
        sub = commands.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
