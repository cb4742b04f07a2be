"""What `evaluate.py` runs: the protocols, view-count scaling, ablations, or speed.

`evaluate(config, workdir)` dispatches on `eval.mode`:

    metrics    every protocol of `eval.protocol` (`manifest.PROTOCOLS`) on `eval.split`:
               metrics.json, table.md (laid out like the paper's tables), per-sample
               grids (sources | prediction | ground truth | error) and an mp4 per
               driven sequence
    scaling    the same subjects and targets reconstructed from N = `eval.scaling_views`
               sources (up to model.num_views; past the cameras, sources mix views and
               frames): scaling.json, view_scaling.md, view_scaling.png and the PSNR(N_max) -
               PSNR(1) sentence
    ablations  the runs in `eval.ablation_workdirs` on one shared manifest: a row per
               run (named by its config, e.g. "default:no_uv_attention"): ablations.md
               and ablations.json
    speed      reconstruction latency per view count and driving FPS (LBS + render)
               on the default device: speed.json, speed.md

Outputs go to `eval.out` (default WORKDIR/eval-SPLIT). The manifest is
`eval.manifest` when given (reused as it is, so runs and methods are scored on the
same frames; it must hold the requested protocols and be of `eval.split`), else drawn
from the dataset and written to OUT/manifest.json (scaling: OUT/scaling_manifest.json).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import logging

from uika_jax.data.pipeline import open_source
from uika_jax.evaluation import grids, report, scaling_plot
from uika_jax.evaluation.face_metrics import FaceBackends, build_face_backends
from uika_jax.evaluation.image_metrics import ImageMetricEvaluator
from uika_jax.evaluation.manifest import (
    PROTOCOLS,
    Manifest,
    ManifestError,
    SampleSpec,
    draw_manifest,
    read_manifest,
    write_manifest,
)
from uika_jax.evaluation.reenactment import Reenactor
from uika_jax.evaluation.scoring import ProtocolScorer, sample_id
from uika_jax.evaluation.speed import measure_speed
from uika_jax.evaluation.trained_model import TrainedModel, load_trained_model, saved_config
from uika_jax.safe_files import atomic_write, write_json, write_png
from uika_jax.video import write_video

MODES = ("metrics", "scaling", "ablations", "speed")
"""The values of `eval.mode`."""

TABLE_METRICS = (
    "psnr",
    "ssim",
    "ssim_valid",
    "lpips_vgg",
    "lpips_alex",
    "csim",
    "akd",
    "apd",
    "aed",
)
"""The columns of the protocol and ablation tables (n/a where a metric was not measured)."""


def output_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Where an evaluation writes: `eval.out`, or WORKDIR/eval-SPLIT."""
    ev = config.eval
    out = Path(ev.out) if ev.get("out") else Path(workdir) / f"eval-{ev.split}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def protocols_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`eval.protocol`: "all" or comma-separated names from `PROTOCOLS`."""
    text = str(config.eval.protocol)
    names = PROTOCOLS if text == "all" else tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(f"eval.protocol={text!r}: choose 'all' or names from {PROTOCOLS}")
    return names


def dataset_path(config: ml_collections.ConfigDict) -> str:
    """`eval.dataset`, or the run's first data source (its synthetic dataset first)."""
    if config.eval.get("dataset"):
        return str(config.eval.dataset)
    d = config.data
    if float(d.synthetic_weight) > 0:
        return str(d.synthetic_path)
    if d.real_paths:
        return str(d.real_paths[0])
    raise ValueError("no evaluation dataset: set eval.dataset")


def face_backends(trained: TrainedModel) -> FaceBackends | None:
    """The face-model backends `eval` names (None when `eval.face_metrics` is off)."""
    ev = trained.config.eval
    if not ev.face_metrics:
        return None
    return build_face_backends(
        trained.head,
        landmark_embedding=ev.landmark_embedding or None,
        arcface=ev.identity_model or None,
        expression=ev.expression_regressor or None,
    )


def _manifest(
    config: ml_collections.ConfigDict,
    source: Any,
    path: str,
    out: Path,
    *,
    protocols: Sequence[str],
    filename: str = "manifest.json",
    **draw: int,
) -> tuple[Manifest, str]:
    """(the manifest, its file): `eval.manifest` checked, else drawn and written to OUT.

    Raises:
      ManifestError: if a given manifest lacks a requested protocol or is of another split.
    """
    ev = config.eval
    if ev.get("manifest"):
        given = str(ev.manifest)
        manifest = read_manifest(given)
        missing = [p for p in protocols if p not in manifest.protocols]
        if missing:
            raise ManifestError(
                f"{given} has no samples of {missing} (it has {sorted(manifest.protocols)}): "
                "choose those protocols (eval.protocol) or draw a new manifest"
            )
        if manifest.split != str(ev.split):
            raise ManifestError(
                f"{given} holds {manifest.split!r} frames, but eval.split={ev.split!r}"
            )
        if Path(manifest.dataset).resolve() != Path(path).resolve():
            logging.warning(
                "manifest %s was drawn from %s, evaluating %s", given, manifest.dataset, path
            )
        logging.info("reusing manifest %s", given)
        return manifest, given
    manifest = draw_manifest(
        source, dataset=path, split=str(ev.split), protocols=protocols,
        subjects=int(ev.subjects), seed=int(ev.seed), **draw,
    )  # fmt: skip
    write_manifest(out / filename, manifest)
    return manifest, str(out / filename)


def _write_video(reenactor: Reenactor, spec: SampleSpec, path: Path, config) -> int:
    """The sample driven by its first target's whole sequence: prediction | truth | error.

    Self-reenactment renders are composited with the ground-truth masks (the metrics'
    head region); returns the intersections the rasterizer dropped.
    """
    ev = config.eval
    frames = reenactor.frames.camera_frames(spec.targets[0], int(ev.video_frames))
    per_call = len(spec.targets)
    chunks = [frames[i : i + per_call] for i in range(0, len(frames), per_call)]
    chunks[-1] = chunks[-1] + [chunks[-1][-1]] * (per_call - len(chunks[-1]))
    specs = [dataclasses.replace(spec, targets=tuple(c)) for c in chunks]
    predictions, truths, dropped = [], [], 0
    for batch in reenactor.batches(specs):
        shown = batch.predictions if spec.driver else batch.composited_predictions
        predictions.append(shown.reshape(-1, *shown.shape[2:]))
        truths.append(batch.composited_targets.reshape(-1, *shown.shape[2:]))
        dropped += batch.dropped
    prediction = np.concatenate(predictions)[: len(frames)]
    truth = None if spec.driver else np.concatenate(truths)[: len(frames)]
    write_video(path, grids.sequence_frames(prediction, truth), fps=int(ev.video_fps))
    return dropped


def _reenactor(trained: TrainedModel, source: Any) -> Reenactor:
    """One compiled forward pass for every protocol and view count (views padded)."""
    config = trained.config
    return Reenactor(
        trained,
        source,
        batch_size=int(config.eval.batch_size),
        num_views=int(config.model.num_views),
    )


def _limit(setting: int | None, count: int) -> int:
    """A per-protocol picture count setting: None means all `count` samples."""
    return count if setting is None else int(setting)


def run_protocol(
    reenactor: Reenactor,
    protocol: str,
    specs: Sequence[SampleSpec],
    *,
    out: Path,
    image_metrics: ImageMetricEvaluator,
    faces: FaceBackends | None,
    manifest: str,
    name: str | None = None,
    pictures: bool = True,
) -> tuple[report.ProtocolResult, int]:
    """Renders and scores one protocol's samples; writes its grids and videos.

    Returns:
      (the protocol's `ProtocolResult`, named `name` (default: the protocol); the
      intersections the rasterizer dropped, 0 unless its capacity overflowed).
    """
    config = reenactor.config
    ev = config.eval
    scorer = ProtocolScorer(protocol, np.asarray(config.render.background), image_metrics, faces)
    pictures_dir = out / "grids" / protocol
    pictures_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    progress = tqdm.tqdm(total=len(specs), desc=name or protocol, unit="sample", leave=False)
    for batch in reenactor.batches(specs):
        scorer.add(batch)
        progress.update(len(batch.specs))
        for i, spec in enumerate(batch.specs):
            if not pictures or written >= _limit(ev.grids, len(specs)):
                break
            if spec.driver:  # no ground truth: the render as it is
                shown, truth = batch.predictions[i], None
            else:  # the metrics' head region: both composited with the ground-truth mask
                shown, truth = batch.composited_predictions[i], batch.composited_targets[i]
            grid = grids.sample_grid(batch.sources[i], batch.view_mask[i], shown, truth)
            write_png(pictures_dir / f"{written:03d}_{sample_id(spec)}.png", grid)
            written += 1
    progress.close()
    dropped = scorer.dropped
    if pictures:
        videos = out / "videos" / protocol
        videos.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(specs[: _limit(ev.videos, len(specs))]):
            path = videos / f"{i:03d}_{sample_id(spec)}.mp4"
            dropped += _write_video(reenactor, spec, path, config)
    if dropped:
        logging.warning(
            "%s: the rasterizer dropped %d intersections (capacity overflow)", protocol, dropped
        )
    return scorer.result(name or protocol, manifest), dropped


def _info(trained: TrainedModel) -> dict[str, Any]:
    return {
        "workdir": str(trained.workdir),
        "step": trained.step,
        "head_model": trained.fingerprint,
        "config": trained.config.name,
    }


def evaluate_metrics(trained: TrainedModel, out: Path) -> list[report.ProtocolResult]:
    """The `metrics` mode (module docstring)."""
    config = trained.config
    path = dataset_path(config)
    source = open_source(path, fingerprint=trained.fingerprint)
    protocols = protocols_of(config)
    manifest, manifest_path = _manifest(
        config, source, path, out, protocols=protocols,
        num_sources=int(config.eval.num_sources or config.model.num_views),
        num_targets=int(config.eval.num_targets or config.model.num_drive),
    )  # fmt: skip
    image_metrics = ImageMetricEvaluator()
    faces = face_backends(trained)
    reenactor = _reenactor(trained, source)
    results, dropped = [], {}
    for p in protocols:
        result, dropped[p] = run_protocol(
            reenactor, p, manifest.protocols[p], out=out, image_metrics=image_metrics,
            faces=faces, manifest=manifest_path,
        )  # fmt: skip
        results.append(result)
    info = {**_info(trained), "rasterizer_dropped": dropped}
    report.write_metrics_json(out / "metrics.json", results, info=info)
    report.write_markdown_table(
        out / "table.md",
        results,
        row_header="Protocol",
        metrics=TABLE_METRICS,
        title=f"{config.name}, step {trained.step}, {config.eval.split} split",
    )
    return results


def evaluate_scaling(trained: TrainedModel, out: Path) -> dict[str, Any]:
    """The `scaling` mode (module docstring): metrics against the number of sources."""
    config = trained.config
    m = config.model
    views = sorted({int(n) for n in config.eval.scaling_views if 1 <= int(n) <= m.num_views})
    left_out = sorted(int(n) for n in config.eval.scaling_views if int(n) > m.num_views)
    if left_out:
        logging.warning(
            "scaling: %s views exceed model.num_views=%d, left out", left_out, m.num_views
        )
    if not views:
        raise ValueError(
            f"eval.scaling_views {tuple(config.eval.scaling_views)} has no count <= {m.num_views}"
        )
    path = dataset_path(config)
    source = open_source(path, fingerprint=trained.fingerprint)
    manifest, manifest_path = _manifest(
        config, source, path, out, protocols=("self_multi",), filename="scaling_manifest.json",
        num_sources=views[-1], num_targets=int(config.eval.num_targets or m.num_drive),
    )  # fmt: skip
    specs = manifest.protocols["self_multi"]
    image_metrics = ImageMetricEvaluator()
    reenactor = _reenactor(trained, source)
    rows, dropped = [], {}
    for n in views:
        subset = [dataclasses.replace(s, sources=s.sources[:n]) for s in specs]
        row, dropped[n] = run_protocol(
            reenactor, "self_multi", subset, out=out, image_metrics=image_metrics,
            faces=None, manifest=manifest_path, name=f"N={n}", pictures=False,
        )  # fmt: skip
        rows.append(row)
    means = {
        metric: [r.mean(metric) for r in rows]
        for metric in ("psnr", "ssim", "ssim_valid", "lpips_vgg", "lpips_alex")
    }
    short = {n: sum(len(s.sources) < n for s in specs) for n in views}
    note = "; ".join(
        f"N={n}: {k} of {len(specs)} samples had fewer sources" for n, k in short.items() if k
    )
    if note:
        logging.warning("scaling: short sequences: %s", note)
    scaling_plot.write_scaling_report(out, views, means, rows=rows, note=note or None)
    report.write_metrics_json(
        out / "scaling.json",
        rows,
        info={
            **_info(trained),
            "views": views,
            "samples_with_fewer_sources": short,
            "rasterizer_dropped": dropped,
        },
    )
    return {"views": views, "means": means}


def evaluate_ablations(config: ml_collections.ConfigDict, out: Path) -> list[report.ProtocolResult]:
    """The `ablations` mode: each run of `eval.ablation_workdirs` on one shared manifest."""
    workdirs = [str(w) for w in config.eval.ablation_workdirs]
    if not workdirs:
        raise ValueError("eval.mode=ablations needs eval.ablation_workdirs (the runs to compare)")
    protocols = protocols_of(config)
    rows, dropped = [], {}
    manifest = manifest_path = None
    image_metrics = ImageMetricEvaluator()
    faces = None
    for index, workdir in enumerate(workdirs):
        run_config = load_trained_model_config(workdir, config)
        trained = load_trained_model(workdir, run_config)
        if faces is None:
            faces = face_backends(trained)
        path = dataset_path(trained.config)
        source = open_source(path, fingerprint=trained.fingerprint)
        if manifest is None:  # drawn (or read) once: every run on the same frames
            manifest, manifest_path = _manifest(
                trained.config, source, path, out, protocols=protocols,
                num_sources=int(config.eval.num_sources or trained.config.model.num_views),
                num_targets=int(config.eval.num_targets or trained.config.model.num_drive),
            )  # fmt: skip
        reenactor = _reenactor(trained, source)
        for p in protocols:
            name = f"{trained.config.name} ({Path(workdir).name})"
            name = name if len(protocols) == 1 else f"{name} {p}"
            row, dropped[name] = run_protocol(
                reenactor, p, manifest.protocols[p], out=out / "runs" / f"{index}",
                image_metrics=image_metrics, faces=faces, manifest=manifest_path, name=name,
                pictures=False,
            )  # fmt: skip
            rows.append(row)
    report.write_metrics_json(
        out / "ablations.json", rows, info={"workdirs": workdirs, "rasterizer_dropped": dropped}
    )
    report.write_markdown_table(
        out / "ablations.md", rows, row_header="Config", title="Ablations", metrics=TABLE_METRICS
    )
    return rows


def load_trained_model_config(
    workdir: str, config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """A run's own saved config with this evaluation's `eval` block."""
    run_config = saved_config(workdir)
    run_config.eval = config.eval
    return run_config


def evaluate_speed(trained: TrainedModel, out: Path) -> dict[str, Any]:
    """The `speed` mode: reconstruction latency per view count, driving FPS."""
    speed = measure_speed(
        trained.model, trained.config, trained.head, trained.anchors,
        views=tuple(int(n) for n in trained.config.eval.scaling_views),
    )  # fmt: skip
    document = {**_info(trained), **speed.to_dict()}
    write_json(out / "speed.json", document)
    with atomic_write(out / "speed.md") as f:
        f.write(speed.to_markdown().encode())
    return document


def evaluate(
    config: ml_collections.ConfigDict | None, workdir: str | Path, *, step: int | None = None
) -> Path:
    """Runs `eval.mode` on a run (module docstring); returns the output folder.

    Args:
      config: the evaluation config (its `model` and `head` must be the run's); None:
        the run's own saved config.
      workdir: the run's folder.
      step: the checkpoint's step; None: the newest (ablations: each run's newest).
    """
    if config is None:
        config = saved_config(workdir, step)
    if "mode" not in config.eval:
        raise ValueError(
            f"{workdir}: the run's config has no evaluation settings (eval.mode, eval.split, "
            "...): pass --config=configs/<the run's config>.py"
        )
    mode = str(config.eval.mode)
    if mode not in MODES:
        raise ValueError(f"eval.mode={mode!r}: choose from {MODES}")
    out = output_dir(config, workdir)
    if mode == "ablations":
        evaluate_ablations(config, out)
        return out
    trained = load_trained_model(workdir, config, step=step)
    {"metrics": evaluate_metrics, "scaling": evaluate_scaling, "speed": evaluate_speed}[mode](
        trained, out
    )
    return out
