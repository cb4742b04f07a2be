"""What the entry points (train.py, evaluate.py) share: quieter logs, the compilation cache.

`define_compilation_cache_flag()` adds `--compilation_cache` (default
`~/.cache/uika_jax/jax_compilation_cache`; empty: off) and `setup(flag)` turns it on
and drops the INFO lines of orbax and grain (one per checkpoint file or data worker).
"""

from __future__ import annotations

import logging
import os

import jax
from absl import flags
from absl import logging as absl_logging

CHATTY_LIBRARIES = ("orbax", "grain")
"""Libraries whose INFO lines are dropped."""

DEFAULT_COMPILATION_CACHE = os.path.expanduser("~/.cache/uika_jax/jax_compilation_cache")
"""Where compiled programs are kept between runs unless `--compilation_cache` says otherwise."""


class _QuietLibraries(logging.Filter):
    """Drops the INFO lines of `CHATTY_LIBRARIES` (warnings and errors pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        chatty = any(f"/{name}/" in record.pathname for name in CHATTY_LIBRARIES)
        return record.levelno >= logging.WARNING or not chatty


def define_compilation_cache_flag() -> flags.FlagHolder[str]:
    """Defines `--compilation_cache`: reruns skip compiling what they compiled before."""
    return flags.DEFINE_string(
        "compilation_cache",
        DEFAULT_COMPILATION_CACHE,
        "folder of JAX's persistent compilation cache (a rerun or a resumed run skips "
        "compiling); empty: off",
    )


def setup(compilation_cache: str | None) -> None:
    """Quiets the chatty libraries and turns the persistent compilation cache on (if given)."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    if compilation_cache:
        jax.config.update("jax_compilation_cache_dir", compilation_cache)
