"""The data of a training run: its sources (generating the synthetic one if missing), its pipeline.

A config's `data` block names the sources:

    synthetic_path, synthetic_weight   the synthetic dataset (`uika synth`); when its
                                       weight is above 0, `prepare_sources` generates it
                                       from `data.synthetic` (identities, views,
                                       sequences, frames, size, seed, ...: `SynthConfig`
                                       fields) where frames are missing, so it also
                                       finishes one an interrupted run left, and refuses
                                       a folder made with other settings
    real_paths, real_weights           folders of the dataset format or `uika pack`
                                       shard sets, with their mixing weights

On several processes only process 0 generates; the others wait for it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from absl import logging

from uika_jax import sharding
from uika_jax.data.augment import AugmentConfig
from uika_jax.data.pipeline import Pipeline, PipelineConfig
from uika_jax.synthetic.dataset import SynthConfig, generate
from uika_jax.training import distributed

DATA_WAIT_SECONDS = 24 * 3600.0
"""How long the other processes wait for process 0 to generate the synthetic dataset."""


def prepare_sources(config: ml_collections.ConfigDict) -> tuple[list[str], list[float]]:
    """The run's source paths and mixing weights, generating the synthetic data if needed.

    Args:
      config: the run's config (`data`).

    Returns:
      (paths, weights), the synthetic source first when its weight is above 0.

    Raises:
      ValueError: if no source has a positive weight, or paths and weights disagree.
    """
    d = config.data
    real_paths, real_weights = list(d.real_paths or ()), [float(w) for w in d.real_weights or ()]
    if len(real_paths) != len(real_weights):
        raise ValueError(
            f"data.real_paths ({len(real_paths)}) and data.real_weights ({len(real_weights)}) "
            "need one weight per path"
        )
    paths, weights = [], []
    if float(d.synthetic_weight) > 0:
        path = Path(d.synthetic_path)
        synth = SynthConfig(**dict(d.synthetic))
        if jax.process_index() == 0:
            # Renders only what is missing; refuses a folder made with other settings.
            logging.info("synthetic dataset in %s (%s)", path, synth)
            path.parent.mkdir(parents=True, exist_ok=True)
            generate(path, synth, progress=True)
        distributed.barrier("synthetic dataset ready", timeout_s=DATA_WAIT_SECONDS)
        paths.append(str(path))
        weights.append(float(d.synthetic_weight))
    paths += real_paths
    weights += real_weights
    if not paths or max(weights) <= 0:
        raise ValueError(
            "no training data: data.synthetic_weight is 0 and data.real_paths is empty "
            "(the no_synthetic_data ablation needs --config.data.real_paths=... and "
            "--config.data.real_weights=...)"
        )
    return paths, weights


def pipeline_config(
    config: ml_collections.ConfigDict, weights: list[float], num_steps: int
) -> PipelineConfig:
    """The `PipelineConfig` of a run (the config's model, optim and data blocks)."""
    d, m = config.data, config.model
    return PipelineConfig(
        image_size=m.image_size,
        num_drive=m.num_drive,
        global_batch_size=int(config.optim.batch_size),
        buckets=tuple(d.buckets),
        monocular_probability=float(d.monocular_probability),
        mixing_weights=tuple(weights),
        split="train",
        seed=int(config.train.seed),
        num_steps=num_steps,
        workers=int(d.workers),
        read_threads=int(d.read_threads),
        augment=AugmentConfig() if d.augment else None,
    )


def open_pipeline(
    config: ml_collections.ConfigDict,
    paths: list[str],
    weights: list[float],
    *,
    fingerprint: str,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    num_steps: int,
) -> Pipeline:
    """The training pipeline over the run's sources (checked against the head model)."""
    if tuple(config.data.buckets)[-1] != config.model.num_views:
        raise ValueError(
            f"data.buckets {tuple(config.data.buckets)} must end at model.num_views "
            f"{config.model.num_views}"
        )
    return Pipeline.open(
        paths,
        pipeline_config(config, weights, num_steps),
        fingerprint=fingerprint,
        mesh=mesh,
        rules=rules,
    )
