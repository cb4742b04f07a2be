"""The `uika` console script: one subcommand per module of `uika_jax.tools`.

    uika check DIR [--head-model builtin|PATH] [--params-only]
    uika synth --out DIR --identities N ...

Each subcommand is a module of `uika_jax.tools` that defines `add_arguments(parser)`
and `run(args) -> int` (the exit status), named as the command with "-" for "_"
(`import_vhap.py` is `uika import-vhap`); its docstring's first line is its help.
Modules without these two functions (shared helpers) are not commands.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

import uika_jax.tools


def subcommands() -> dict[str, ModuleType]:
    """Command name -> module, for every subcommand module in `uika_jax.tools`."""
    found = {}
    for info in sorted(pkgutil.iter_modules(uika_jax.tools.__path__), key=lambda i: i.name):
        if info.name == "cli":
            continue
        module = importlib.import_module(f"uika_jax.tools.{info.name}")
        if callable(getattr(module, "add_arguments", None)) and callable(
            getattr(module, "run", None)
        ):
            found[info.name.replace("_", "-")] = module
    return found


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="uika", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in subcommands().items():
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
