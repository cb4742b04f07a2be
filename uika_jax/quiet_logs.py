"""Quieter logs for the entry points: the INFO lines of orbax and grain are dropped."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

CHATTY_LIBRARIES = ("orbax", "grain")
"""Libraries whose INFO lines (one per checkpoint file or data worker) are dropped."""


class _QuietLibraries(logging.Filter):
    """Drops the INFO lines of `CHATTY_LIBRARIES` (warnings and errors pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        chatty = any(f"/{name}/" in record.pathname for name in CHATTY_LIBRARIES)
        return record.levelno >= logging.WARNING or not chatty


def quiet_library_logs() -> None:
    """Installs the filter on absl's handler (call in an entry point's main)."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
