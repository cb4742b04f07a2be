"""Config files outside absl flags (`load_config("configs/tiny.py:arg")`) and dotted keys.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`; the part of the
spec after the first ':' is passed as `arg` (the `ml_collections.config_flags`
convention the entry points use with `--config=configs/x.py[:arg]`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections


def load_config(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """Loads a config file, `path` or `path:arg`.

    Args:
      spec: the file, optionally followed by ':' and the argument of its `get_config`.

    Returns:
      The `ml_collections.ConfigDict` that `get_config(arg)` returns.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it defines no `get_config`.
    """
    path, _, arg = str(spec).partition(":")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{file}: config file not found")
    module_spec = importlib.util.spec_from_file_location(f"_uika_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{file}: defines no get_config(arg=None)")
    return module.get_config(arg or None)


def flat_items(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) pairs of nested mappings, e.g. ("model.vit.dim", 48)."""
    if not isinstance(tree, Mapping):
        yield prefix, tree
        return
    for key, value in tree.items():
        yield from flat_items(value, f"{prefix}.{key}" if prefix else str(key))
