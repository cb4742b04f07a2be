"""The synthetic multi-view head dataset: the built-in head, rendered in the dataset format.

The paper rendered 7,500+ identities x 9 fixed views x 13,000+ frames with
SphereHead and LivePortrait; those generators and weights are not available
offline, so this renders the built-in procedural head instead. Per identity
(a seed: shape, albedo, hair): `sequences` motion sequences of `frames` frames
from the procedural motion library (`uika_jax.synthetic.motion`), each seen by
the identity's jittered rig of the first `views` of the 9 fixed views
(`uika_jax.synthetic.rig`), lit and set before a background per sequence
(`uika_jax.synthetic.lighting`, `uika_jax.synthetic.backgrounds`), rendered with
masks and ground-truth UV maps (`uika_jax.synthetic.frame`) and written in the
format of `uika_jax.data.format` with the FLAME-format parameters and cameras.

Deterministic by seed: identity i's seed, its split, its sequences' kinds,
motions, lights and backgrounds all derive from (seed, i), so any part of the
dataset can be regenerated alone. Splits are by identity: a permutation of all
identities by the seed puts the first round(N test_fraction) in test, the next
round(N val_fraction) in val. `part`/`num_parts` gives part k of N identities
i = k, k + N, ... and writes its own part index; readers combine the parts.
A rerun skips the sequences already complete (`uika_jax.data.writer`).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from uika_jax.data.format import (
    INDEX_FILE,
    PART_INDEX_GLOB,
    DatasetIndex,
    HeadModelInfo,
    SequenceEntry,
    SubjectEntry,
    part_index_name,
    read_json,
    write_index,
)
from uika_jax.data.writer import SequenceParams, finish_sequence, sequence_complete, write_frame
from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import HeadModel
from uika_jax.synthetic.backgrounds import background_image
from uika_jax.synthetic.frame import (
    ExtraMeshes,
    FrameOptions,
    FrameParams,
    Scene,
    make_identity,
    render_frames,
)
from uika_jax.synthetic.hair import hair_mesh, pose_hair
from uika_jax.synthetic.head import GENERATOR_VERSION, synthetic_head_model
from uika_jax.synthetic.lighting import sample_lights
from uika_jax.synthetic.motion import motion_sequence, sample_sequence_kinds
from uika_jax.synthetic.rig import FIXED_VIEWS, fixed_view_rig

CAPACITY_RETRIES = 3
"""Times a sequence is re-rendered with twice the rasterizer capacity after an overflow."""


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """What `generate` makes.

    Attributes:
      identities: number of identities N.
      views: cameras per identity, the first `views` of `rig.FIXED_VIEWS` (1 to 9).
      sequences: motion sequences per identity.
      frames: frames per sequence.
      size: image side in pixels.
      seed: the dataset's seed.
      supersample: anti-aliasing samples per pixel along each axis (1: off).
      shadow_lights: lights casting soft shadows (0: off).
      hair: render hair (render-only geometry, not in the UV maps).
      image_format: "png" or "jpg".
      val_fraction: fraction of identities in the val split.
      test_fraction: fraction of identities in the test split.
      fps: frame rate of the motions (10: a 16-frame clip spans 1.6 s; 16-frame clips
        move visibly in 82-100% of cases per kind at 12.5 fps, 50-88% at 25).
    """

    identities: int
    views: int = 9
    sequences: int = 2
    frames: int = 16
    size: int = 128
    seed: int = 0
    supersample: int = 1
    shadow_lights: int = 0
    hair: bool = True
    image_format: str = "png"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    fps: float = 10.0

    def __post_init__(self):
        problems = []
        if self.identities < 1:
            problems.append(f"identities must be >= 1, got {self.identities}")
        if not 1 <= self.views <= len(FIXED_VIEWS):
            problems.append(f"views must be in 1..{len(FIXED_VIEWS)}, got {self.views}")
        if self.sequences < 1 or self.frames < 1:
            problems.append(f"sequences and frames must be >= 1: {self.sequences}, {self.frames}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if self.image_format not in ("png", "jpg"):
            problems.append(f"image_format must be png or jpg, got {self.image_format!r}")
        fractions = (self.val_fraction, self.test_fraction)
        if min(fractions) < 0 or sum(fractions) > 1:
            problems.append("val_fraction and test_fraction must be >= 0 and sum to <= 1")
        if problems:
            raise ValueError("SynthConfig: " + "; ".join(problems))

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera ids, one per view."""
        return tuple(f"view{c}" for c in range(self.views))


def _derived_seed(*keys: int) -> int:
    """A non-negative 31-bit seed from integer keys (stable across runs and machines)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] & 0x7FFFFFFF)


def identity_seed(config: SynthConfig, i: int) -> int:
    """The seed of identity i (its shape, albedo, hair, rig, motions, scenes)."""
    return _derived_seed(config.seed, i, 0x1D)


def subject_id(i: int) -> str:
    """The subject id of identity i."""
    return f"id{i:06d}"


def identity_splits(config: SynthConfig) -> list[str]:
    """The split of every identity (module docstring)."""
    order = np.random.default_rng([config.seed, 0x5B117]).permutation(config.identities)
    n_test = round(config.identities * config.test_fraction)
    n_val = round(config.identities * config.val_fraction)
    splits = ["train"] * config.identities
    for rank, i in enumerate(order):
        splits[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits


def sequence_kinds(config: SynthConfig, i: int) -> tuple[str, ...]:
    """The motion kinds of identity i's sequences."""
    return sample_sequence_kinds(identity_seed(config, i), config.sequences)


def subject_entry(config: SynthConfig, i: int, split: str) -> SubjectEntry:
    """Identity i's index entry."""
    return SubjectEntry(
        subject_id(i),
        split,
        tuple(
            SequenceEntry(f"{j:02d}_{kind}", config.cameras, config.frames)
            for j, kind in enumerate(sequence_kinds(config, i))
        ),
    )


def dataset_index(
    config: SynthConfig, model: HeadModel, identities: list[int] | None = None
) -> DatasetIndex:
    """The index of the whole dataset, or of some identities (a part)."""
    splits = identity_splits(config)
    chosen = range(config.identities) if identities is None else identities
    return DatasetIndex(
        head_model=HeadModelInfo(
            str(model.fingerprint), model.num_vertices, model.num_shape, model.num_expression
        ),
        image_size=config.size,
        image_format=config.image_format,
        has_uv=True,
        subjects=tuple(subject_entry(config, i, splits[i]) for i in chosen),
        provenance={
            "generator": "uika synth",
            "head_generator_version": GENERATOR_VERSION,
            "config": dataclasses.asdict(config),
            "views_yaw_pitch_deg": [list(v) for v in FIXED_VIEWS[: config.views]],
        },
    )


@jax.jit
def _posed_vertices(model, shape, expression, pose, translation):
    return jax.vmap(lambda e, p, t: flame_forward(model, shape, e, p, t)[0])(
        expression, pose, translation
    )


def _render_sequence(model, config, i, j, kind, identity, hair, viewmats, Ks):
    """Renders one sequence: (Frame with (T, C) axes, its motion)."""
    seed = identity_seed(config, i)
    motion = motion_sequence(
        kind,
        config.frames,
        _derived_seed(seed, j, 0x30),
        num_expression=model.num_expression,
        fps=config.fps,
    )
    backgrounds = np.stack(
        [
            background_image(_derived_seed(seed, j, c, 0xB6), config.size)
            for c in range(config.views)
        ]
    )
    scene = Scene(sample_lights(_derived_seed(seed, j, 0x11)), backgrounds)
    params = FrameParams(motion.expression, motion.pose, motion.translation)
    extras = None
    if hair is not None:
        posed = _posed_vertices(
            model, identity.shape, motion.expression, motion.pose, motion.translation
        )
        vertices, faces, colours = pose_hair(hair, posed)
        extras = ExtraMeshes(vertices, faces, colours)
    capacity = FrameOptions().capacity_per_pixel
    for _ in range(CAPACITY_RETRIES + 1):
        options = FrameOptions(
            size=config.size,
            supersample=config.supersample,
            shadow_lights=config.shadow_lights,
            capacity_per_pixel=capacity,
        )
        frames = render_frames(model, identity, params, viewmats, Ks, scene, options, extras)
        if not np.asarray(frames.overflow).any():
            return jax.device_get(frames), motion
        capacity *= 2
    raise RuntimeError(
        f"identity {i} sequence {j}: the mesh rasterizer overflowed even at "
        f"{capacity / 2} slots per pixel"
    )


def generate_identity(root: Path, config: SynthConfig, index: DatasetIndex, i: int) -> int:
    """Renders and writes identity i's unfinished sequences; returns the frames written."""
    model = synthetic_head_model()
    subject = subject_entry(config, i, "train")
    todo = [
        (j, entry)
        for j, entry in enumerate(subject.sequences)
        if not sequence_complete(root, index, subject.id, entry)
    ]
    if not todo:
        return 0
    seed = identity_seed(config, i)
    identity = make_identity(model, seed)
    hair = hair_mesh(model, seed) if config.hair else None
    viewmats, Ks = fixed_view_rig(
        model, np.asarray(identity.shape), config.size, seed, views=FIXED_VIEWS[: config.views]
    )
    written = 0
    for j, entry in todo:
        kind = entry.id.split("_", 1)[1]
        frames, motion = _render_sequence(model, config, i, j, kind, identity, hair, viewmats, Ks)
        for t in range(config.frames):
            for c, camera in enumerate(entry.cameras):
                write_frame(
                    root, index, subject.id, entry.id, camera, t,
                    image=frames.image[t, c], mask=frames.alpha[t, c],
                    image_uv=frames.image_uv[t, c], uv_valid=frames.uv_valid[t, c],
                )  # fmt: skip
        params = SequenceParams(
            shape=np.asarray(identity.shape, np.float32),
            expression=motion.expression,
            pose=motion.pose,
            translation=motion.translation,
            viewmats=viewmats,
            intrinsics=Ks,
        )
        finish_sequence(root, index, subject.id, entry, params)
        written += config.frames * config.views
    return written


def part_identities(config: SynthConfig, part: int, num_parts: int) -> list[int]:
    """Identities of part `part` (0-based) of `num_parts`: i = part, part + num_parts, ..."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part must be in 0..{num_parts - 1}, got {part}")
    return list(range(part, config.identities, num_parts))


def _worker(task):
    root, config, index, i = task
    return generate_identity(root, config, index, i)


def _results(tasks, workers: int) -> Iterator[int]:
    if workers <= 1:
        yield from map(_worker, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_worker, tasks)


def generate(
    out: str | Path,
    config: SynthConfig,
    *,
    part: int = 0,
    num_parts: int = 1,
    workers: int = 1,
    progress: bool = True,
) -> DatasetIndex:
    """Generates (or finishes) the dataset, or one part of it; writes its index last.

    Args:
      out: the dataset folder (created if missing; its parent must exist).
      config: what to make.
      part: this part's number (0-based).
      num_parts: how many parts the identities are split into (machines of a job array).
      workers: processes rendering identities in parallel (1: this process).
      progress: show a progress bar (frames).

    Returns:
      The index written (`dataset.json`, or this part's part index).

    Raises:
      FileExistsError: if `out` holds a dataset made with another configuration.
    """
    root = Path(out)
    if not root.parent.is_dir():
        raise FileNotFoundError(f"{root}: its folder {root.parent} does not exist")
    root.mkdir(exist_ok=True)
    model = synthetic_head_model()
    identities = part_identities(config, part, num_parts)
    index = dataset_index(config, model, identities)
    _refuse_other_config(root, config)
    tasks = [(root, config, index, i) for i in identities]
    total = len(identities) * config.sequences * config.frames * config.views
    with tqdm(total=total, disable=not progress, desc="synth", unit="frame") as bar:
        rendered = 0
        for written in _results(tasks, workers):
            rendered += written
            bar.update(config.sequences * config.frames * config.views)
            bar.set_postfix(rendered=rendered)
    name = INDEX_FILE if num_parts == 1 else part_index_name(part, num_parts)
    write_index(root, index, name)
    return index


def _refuse_other_config(root: Path, config: SynthConfig) -> None:
    """Refuses to mix two configurations in one folder (a rerun must use the same one)."""
    for path in [root / INDEX_FILE, *root.glob(PART_INDEX_GLOB)]:
        if not path.is_file():
            continue
        try:
            stored = read_json(path)["provenance"]["config"]
        except (ValueError, KeyError, TypeError):
            raise FileExistsError(f"{path}: not a synthetic dataset index") from None
        if stored != dataclasses.asdict(config):
            raise FileExistsError(
                f"{path}: {root} holds a dataset made with {stored}; use another folder "
                "or the same configuration"
            )
