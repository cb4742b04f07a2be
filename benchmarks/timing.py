"""Wall-clock timing shared by the benchmark scripts (imported from beside them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def time_ms(fn: Callable[[], object]) -> float:
    """Wall time of one fn() call in milliseconds."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_ms(fn) for _ in range(repeats))


def spread(values: Sequence[float], fmt: str = ".0f", unit: str = "") -> str:
    """'median (min-max)' of `values`, each formatted with `fmt` and followed by `unit`."""
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:{fmt}}{unit} ({low:{fmt}}-{high:{fmt}})"
