"""The synthetic dataset generator: valid format, deterministic, parts, resuming, refusals."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from uika_jax.data.checks import check_dataset
from uika_jax.data.format import INDEX_FILE, load_index
from uika_jax.data.sources import FolderSource
from uika_jax.synthetic.dataset import SynthConfig, generate, identity_splits
from uika_jax.synthetic.head import synthetic_head_model
from uika_jax.tools.cli import main as uika

CONFIG = SynthConfig(identities=3, views=2, sequences=1, frames=2, size=24, hair=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    generate(root, CONFIG, progress=False)
    return root


def test_dataset_is_valid_and_matches_the_builtin_head(made):
    report = check_dataset(made, fingerprint=str(synthetic_head_model().fingerprint))
    assert report.ok, report.summary()
    assert report.num_frames == 3 * 2 * 2
    source = FolderSource(made)
    record = source[0]
    alpha = record["mask"] > 0
    assert alpha.mean() > 0.2 and not alpha.all()  # a head, not an empty or full frame
    assert record["uv_valid"].any() and not (record["uv_valid"] & ~alpha).any()
    # backgrounds differ from one camera to the other and are never one flat colour
    background = record["image"][~alpha]
    assert background.std(0).max() > 3.0


def test_same_seed_same_bytes_and_parts_combine_to_the_whole(made, tmp_path):
    parts = tmp_path / "parts"
    argv = [
        "--identities",
        "3",
        "--views",
        "2",
        "--sequences",
        "1",
        "--frames",
        "2",
        "--size",
        "24",
        "--shard",
        "2/2",
    ]
    assert uika(["synth", "--out", str(parts), *argv]) == 0
    with pytest.raises(Exception, match=r"parts \[0\] of 2 have no index yet"):
        load_index(parts)
    generate(parts, CONFIG, part=0, num_parts=2, progress=False)
    assert not (parts / INDEX_FILE).exists()
    whole = load_index(made)
    combined = load_index(parts)
    assert sorted(combined.subjects, key=lambda s: s.id) == list(whole.subjects)
    for path in made.rglob("*"):
        if path.is_file() and path.suffix in (".png", ".npz"):
            twin = parts / path.relative_to(made)
            assert twin.read_bytes() == path.read_bytes(), path


def test_rerun_redoes_only_unfinished_sequences_and_refuses_another_config(made, tmp_path):
    root = tmp_path / "resume"
    shutil.copytree(made, root)
    index = load_index(root)
    redo = root / index.subjects[1].id / index.subjects[1].sequences[0].id
    (redo / "sequence.npz").unlink()
    (redo / "view1" / "images" / "000001.png").unlink()
    kept = root / index.subjects[0].id / index.subjects[0].sequences[0].id / "sequence.npz"
    os.utime(kept, (1, 1))
    generate(root, CONFIG, progress=False)
    assert kept.stat().st_mtime == 1  # untouched
    assert check_dataset(root).ok
    with pytest.raises(FileExistsError, match="made with"):
        generate(root, SynthConfig(identities=3, views=2, sequences=1, frames=2, size=32))


def test_splits_are_by_identity_exact_and_deterministic():
    config = SynthConfig(identities=40, val_fraction=0.1, test_fraction=0.2, seed=3)
    splits = identity_splits(config)
    assert splits == identity_splits(config)
    assert (splits.count("test"), splits.count("val"), splits.count("train")) == (8, 4, 28)
    other = SynthConfig(identities=40, val_fraction=0.1, test_fraction=0.2, seed=4)
    assert splits != identity_splits(other)
    with pytest.raises(ValueError, match=r"views must be in 1\.\.9"):
        SynthConfig(identities=1, views=10)
    assert np.all(np.isin(splits, ["train", "val", "test"]))


def test_contact_sheet_shows_every_camera_then_mask_and_uv(made, tmp_path):
    out = tmp_path / "sheet.png"
    assert uika(["sheet", str(made), "--out", str(out), "--cell", "20"]) == 0
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (3 * 20, (2 + 2) * 20, 3)  # 3 subjects; 2 cameras, mask, UV
    mask_cell = sheet[:20, 40:60]
    assert mask_cell.min() == 0 and mask_cell.max() == 255
    assert uika(["sheet", str(tmp_path / "none"), "--out", str(out)]) == 2
