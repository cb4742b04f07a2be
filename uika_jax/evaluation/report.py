"""Evaluation results on disk: `metrics.json` and a markdown table laid out like the paper's.

One `ProtocolResult` is one row of a table: a method, a protocol (monocular or
multi-view x self- or cross-reenactment) or an ablation config, scored on the
samples of one manifest. It holds every sample's value of every metric it has; a
value of None is a sample the metric could not score (a face the detector did not
find), which is counted, never dropped: the mean is over the scored samples, and
`counts` and the detection rate say how many those were.

`metrics.json` (written atomically by `write_metrics_json`, read back and checked by
`read_metrics_json`):

    {"format": "uika-eval-metrics/1",
     "region": HEAD_REGION_NOTE,
     "info": {...},                      # the caller's (checkpoint, config, device...)
     "protocols": {NAME: {"manifest": "manifests/self_mono.json" | null,
                          "samples": 40,
                          "means": {"psnr": 23.1, "aed": null, ...},
                          "counts": {"psnr": 40, "csim": 38, ...},
                          "detection_rates": {"csim": 0.95, ...},
                          "backends": {"psnr": "...", "csim": "dlib ResNet ...", ...},
                          "per_sample": {"ids": [...], "psnr": [...], "csim": [..., null]}}}}

`markdown_table` lays the rows out with one column per metric and an arrow on each
header (up: higher is better), "n/a" where a row lacks a metric, and a footnote that
says the metrics are on the head region and names each column's backend and each
row's detection rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uika_jax.safe_files import atomic_write, write_json

METRICS_FORMAT = "uika-eval-metrics/1"
"""The `format` field of metrics.json."""

HEAD_REGION_NOTE = (
    "Metrics are on the head region: prediction and ground truth are composited onto "
    "the same background with the ground-truth mask, and each image metric averages "
    "over the whole composited image."
)
"""What every table's footnote and metrics.json say about the region the metrics cover."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """How a metric is shown: its column label, direction and decimals."""

    label: str
    higher_is_better: bool
    decimals: int

    @property
    def header(self) -> str:
        """The column header: label and arrow (up: higher is better)."""
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("PSNR", True, 2),
    "ssim": MetricSpec("SSIM", True, 4),
    "ssim_valid": MetricSpec("SSIM (VALID)", True, 4),
    "lpips_vgg": MetricSpec("LPIPS (VGG)", False, 4),
    "lpips_alex": MetricSpec("LPIPS (Alex)", False, 4),
    "csim": MetricSpec("CSIM", True, 3),
    "akd": MetricSpec("AKD", False, 2),
    "apd": MetricSpec("APD", False, 3),
    "aed": MetricSpec("AED", False, 3),
}
"""The known metrics in table order; a metric not listed here is shown with 4 decimals."""


def metric_spec(name: str) -> MetricSpec:
    """The spec of a metric; an unknown one gets its name, 4 decimals and no direction claim."""
    return METRICS.get(name, MetricSpec(name, True, 4))


@dataclasses.dataclass(frozen=True)
class ProtocolResult:
    """One table row: per-sample metric values of one method/protocol/config on one manifest.

    Attributes:
      name: the row's label (unique within a report).
      sample_ids: one id per sample (e.g. "subject/sequence/frame").
      values: metric -> one value per sample; None (or NaN) where the metric could not
        score the sample (a failed detection). A metric left out is "n/a".
      backends: metric -> what computed it (the footnote names it).
      detection_rates: metric -> share of samples in [0, 1] whose detection succeeded,
        for metrics that need a detector.
      manifest: the manifest file the samples came from, or None.
    """

    name: str
    sample_ids: tuple[str, ...]
    values: Mapping[str, Sequence[float | None]]
    backends: Mapping[str, str] = dataclasses.field(default_factory=dict)
    detection_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
    manifest: str | None = None

    def __post_init__(self) -> None:
        samples = len(self.sample_ids)
        cleaned = {}
        for metric, column in self.values.items():
            column = [_finite_or_none(metric, v) for v in column]
            if len(column) != samples:
                raise ValueError(
                    f"{self.name}: metric {metric!r} has {len(column)} values for {samples} samples"
                )
            cleaned[metric] = tuple(column)
        for metric, rate in self.detection_rates.items():
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(
                    f"{self.name}: detection rate of {metric!r} is {rate}, not in [0, 1]"
                )
        object.__setattr__(self, "sample_ids", tuple(str(i) for i in self.sample_ids))
        object.__setattr__(self, "values", cleaned)

    def count(self, metric: str) -> int:
        """Samples the metric scored (0 when the row lacks it)."""
        return sum(v is not None for v in self.values.get(metric, ()))

    def mean(self, metric: str) -> float | None:
        """The metric's mean over the samples it scored; None when it scored none."""
        scored = [v for v in self.values.get(metric, ()) if v is not None]
        return math.fsum(scored) / len(scored) if scored else None


def _finite_or_none(metric: str, value: Any) -> float | None:
    """A per-sample value as a float, NaN as None; infinities are refused."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise ValueError(f"metric {metric!r} has an infinite value")
    return value


def _metric_order(results: Sequence[ProtocolResult]) -> list[str]:
    """The metrics any row has: known ones in table order, then the others by name."""
    present = {m for r in results for m in r.values}
    return [m for m in METRICS if m in present] + sorted(present - METRICS.keys())


def _protocol_record(result: ProtocolResult) -> dict[str, Any]:
    metrics = list(result.values)
    return {
        "manifest": result.manifest,
        "samples": len(result.sample_ids),
        "means": {m: result.mean(m) for m in metrics},
        "counts": {m: result.count(m) for m in metrics},
        "detection_rates": {m: float(r) for m, r in result.detection_rates.items()},
        "backends": dict(result.backends),
        "per_sample": {
            "ids": list(result.sample_ids),
            **{m: list(result.values[m]) for m in metrics},
        },
    }


def _unique_names(results: Sequence[ProtocolResult]) -> None:
    names = [r.name for r in results]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"row names must be unique, repeated: {repeated}")


def write_metrics_json(
    path: str | os.PathLike,
    results: Sequence[ProtocolResult],
    *,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `metrics.json` (module docstring) atomically.

    Args:
      path: the file to write (its folder must exist).
      results: the rows, names unique.
      info: JSON-serialisable facts about the run (checkpoint step, config, device).

    Returns:
      The path written.
    """
    _unique_names(results)
    document = {
        "format": METRICS_FORMAT,
        "region": HEAD_REGION_NOTE,
        "info": dict(info or {}),
        "protocols": {r.name: _protocol_record(r) for r in results},
    }
    return write_json(path, document)


def read_metrics_json(path: str | os.PathLike) -> tuple[list[ProtocolResult], dict[str, Any]]:
    """Reads a `metrics.json` back (an untrusted file: its structure is checked).

    Returns:
      (the rows in file order, the `info` mapping).

    Raises:
      ValueError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable metrics.json ({error})") from error
    if not isinstance(document, dict) or document.get("format") != METRICS_FORMAT:
        raise ValueError(f"{path}: not a metrics.json of format {METRICS_FORMAT!r}")
    protocols = document.get("protocols")
    if not isinstance(protocols, dict):
        raise ValueError(f"{path}: 'protocols' must be an object")
    results = []
    for name, record in protocols.items():
        try:
            per_sample = dict(record["per_sample"])
            ids = per_sample.pop("ids")
            results.append(
                ProtocolResult(
                    name=name,
                    sample_ids=tuple(ids),
                    values=per_sample,
                    backends={str(k): str(v) for k, v in record["backends"].items()},
                    detection_rates=dict(record["detection_rates"]),
                    manifest=record["manifest"],
                )
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"{path}: protocol {name!r} is malformed ({error!r})") from error
    info = document.get("info", {})
    return results, info if isinstance(info, dict) else {}


def _cell(result: ProtocolResult, metric: str) -> str:
    mean = result.mean(metric)
    return "n/a" if mean is None else f"{mean:.{metric_spec(metric).decimals}f}"


def footnote_line(results: Sequence[ProtocolResult], metric: str) -> str:
    """A table's footnote line for one column: backend, rows' detection rates, rows lacking it.

    `- CSIM ↑: dlib ResNet embedding; detection rate (of the frames compared): self 95.0%
    (38/40 samples scored).` A sample is scored when any of its frames was detected.
    """
    spec = metric_spec(metric)
    backends: dict[str, list[str]] = {}
    for r in results:
        if metric in r.values or metric in r.backends:
            backends.setdefault(r.backends.get(metric, "backend not stated"), []).append(r.name)
    if not backends:
        backend_text = "not measured"
    elif len(backends) == 1:
        backend_text = next(iter(backends))
    else:
        backend_text = "; ".join(f"{b} ({', '.join(rows)})" for b, rows in backends.items())
    parts = [backend_text]
    rates = [
        f"{r.name} {100.0 * float(r.detection_rates[metric]):.1f}% "
        f"({r.count(metric)}/{len(r.sample_ids)} samples scored)"
        for r in results
        if metric in r.detection_rates
    ]
    if rates:
        parts.append("detection rate (of the frames compared): " + ", ".join(rates))
    missing = [r.name for r in results if metric not in r.values or r.count(metric) == 0]
    if missing:
        parts.append("n/a for " + ", ".join(missing))
    return f"- {spec.header}: " + "; ".join(parts) + "."


def markdown_table(
    results: Sequence[ProtocolResult],
    *,
    metrics: Sequence[str] | None = None,
    row_header: str = "Method",
    title: str | None = None,
) -> str:
    """The paper-style table of the rows' means, with arrows, n/a and the footnote.

    Args:
      results: the rows, in order.
      metrics: the columns, in order; None: every metric a row has, in `METRICS` order.
        A column no row has is all "n/a" (the footnote says so).
      row_header: the first column's header ("Method", "Protocol", "Config").
      title: an optional heading line above the table.

    Returns:
      Markdown text ending in a newline.
    """
    _unique_names(results)
    columns = list(metrics) if metrics is not None else _metric_order(results)
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join([row_header] + [metric_spec(m).header for m in columns]) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * len(columns)) + "|")
    for r in results:
        lines.append(
            "| " + " | ".join([r.name.replace("|", "\\|")] + [_cell(r, m) for m in columns]) + " |"
        )
    lines += ["", HEAD_REGION_NOTE, ""]
    lines += [footnote_line(results, m) for m in columns]
    return "\n".join(lines) + "\n"


def write_markdown_table(
    path: str | os.PathLike, results: Sequence[ProtocolResult], **kwargs: Any
) -> Path:
    """Writes `markdown_table(results, **kwargs)` to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(markdown_table(results, **kwargs).encode("utf-8"))
    return path
