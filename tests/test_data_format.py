"""The on-disk dataset format: round trip, validation naming the bad file, parts, resuming."""

import json
import shutil

import numpy as np
import pytest
from data_fixtures import SIZE, frame_pixels, tiny_index, tiny_params, write_tiny_dataset
from PIL import Image

from uika_jax.data.checks import check_dataset
from uika_jax.data.format import (
    INDEX_FILE,
    DatasetFormatError,
    decode_uv,
    encode_uv,
    index_from_json,
    load_index,
    part_index_name,
    write_index,
)
from uika_jax.data.reader import FrameRef, read_frame_files, read_sequence
from uika_jax.data.sources import FolderSource
from uika_jax.data.writer import finish_sequence, sequence_complete
from uika_jax.safe_files import write_npz
from uika_jax.tools.cli import main as uika


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    write_tiny_dataset(root)
    return root


@pytest.fixture
def dataset(clean, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(clean, root)
    return root


def test_round_trip_reads_back_what_was_written(clean):
    index = load_index(clean)
    assert index == tiny_index()
    assert not list(clean.rglob("*.tmp"))
    ref = FrameRef("b", "talk", "left", 2)
    got = read_frame_files(clean, index, ref)
    image, mask, uv, valid = frame_pixels("b", "left", 2)
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["mask"], mask)
    np.testing.assert_array_equal(got["uv_valid"], valid)
    assert np.abs(got["uv"] - np.where(valid[..., None], uv, 0)).max() <= 0.5 / 65534 + 1e-7
    params = read_sequence(clean, index, "b", index.subjects[1].sequences[0])
    np.testing.assert_array_equal(params.pose, tiny_params(index.subjects[1].sequences[0], 1).pose)
    report = check_dataset(clean, fingerprint="synthetic:test:00")
    assert report.ok and report.num_frames == 18, report.summary()


def test_uv_encoding_keeps_the_borders_and_the_invalid_pixels():
    uv = np.array([[[0.0, 1.0], [0.5, 0.25]]], np.float32)
    valid = np.array([[True, False]])
    back, back_valid = decode_uv(encode_uv(uv, valid))
    np.testing.assert_array_equal(back_valid, valid)
    np.testing.assert_allclose(back[0, 0], [0.0, 1.0], atol=1e-7)
    np.testing.assert_array_equal(back[0, 1], [0.0, 0.0])


def _corrupt(root, case):
    """Breaks one thing; returns the text the report must contain and the bad-frame count."""
    seq = root / "a" / "talk"
    if case == "missing frame":
        (seq / "front" / "images" / "000001.png").unlink()
        return "a/talk/front/images/000001.png: missing image", 1
    if case == "unreadable image":
        (seq / "left" / "images" / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return "000000.png: unreadable image", 1
    if case == "mask size":
        Image.fromarray(np.zeros((SIZE, SIZE + 1), np.uint8)).save(seq / "left/masks/000002.png")
        return f"mask is {SIZE + 1}x{SIZE}, expected {SIZE}x{SIZE}", 1
    params = read_sequence(root, load_index(root), "a", tiny_index().subjects[0].sequences[0])
    arrays = params.arrays()
    if case == "nan expression":
        arrays["expression"][1, 2] = np.nan
        text = "'expression' is not finite at [1, 2]"
    elif case == "wrong length":
        arrays["expression"] = arrays["expression"][:, :2]
        text = "'expression' has shape (3, 2), expected (3, 3)"
    elif case == "not a rotation":
        arrays["viewmats"][1, :3, :3] *= 1.1
        text = "camera 'left': viewmat's 3x3 block is not a rotation"
    write_npz(seq / "sequence.npz", arrays)
    return text, 6


@pytest.mark.parametrize(
    "case",
    ["missing frame", "unreadable image", "mask size", "nan expression", "wrong length",
     "not a rotation"],
)  # fmt: skip
def test_check_names_the_file_and_the_problem_and_counts_bad_frames(dataset, case, capsys):
    text, bad = _corrupt(dataset, case)
    report = check_dataset(dataset)
    assert len(report.problems) == 1, report.summary()
    assert text in report.problems[0].message, report.problems[0].message
    assert len(report.bad_frames) == bad
    assert {f.subject for f in report.bad_frames} == {"a"}
    assert uika(["check", str(dataset)]) == 1
    assert text in capsys.readouterr().out


def test_fingerprint_of_another_head_model_is_refused(clean, capsys):
    report = check_dataset(clean, fingerprint="flame2023:flame2023.pkl:0123")
    assert "belong to head model synthetic:test:00, not the configured flame2023" in (
        report.problems[0].message
    )
    assert len(report.bad_frames) == report.num_frames
    assert uika(["check", str(clean), "--head-model", "builtin", "--params-only"]) == 1
    assert "not the configured synthetic:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("edit", "text"),
    [
        (lambda d: d["subjects"][0].update(id="../escape"), "subject id '../escape'"),
        (lambda d: d["subjects"][1].update(id="a"), "subject 'a' listed twice"),
        (lambda d: d["subjects"][0].update(split="holdout"), "split 'holdout'"),
        (lambda d: d.update(version=2), "format version 2"),
        (lambda d: d["subjects"][0]["sequences"][0].update(num_frames=-1), "out of range"),
        (lambda d: d["head_model"].pop("fingerprint"), "head_model: missing 'fingerprint'"),
    ],
)
def test_bad_index_is_refused_naming_the_field(edit, text):
    data = tiny_index().to_json()
    edit(data)
    with pytest.raises(DatasetFormatError, match="dataset.json: .*" + text.replace("(", r"\(")):
        index_from_json(json.loads(json.dumps(data)), "dataset.json")


def test_part_indexes_combine_and_missing_parts_are_named(clean, tmp_path):
    index = tiny_index()
    root = tmp_path / "parts"
    shutil.copytree(clean, root)
    (root / INDEX_FILE).unlink()
    halves = [index.subjects[:2], index.subjects[2:]]
    write_index(
        root, index.__class__(**{**vars(index), "subjects": halves[1]}), part_index_name(1, 3)
    )
    write_index(
        root, index.__class__(**{**vars(index), "subjects": halves[0]}), part_index_name(0, 3)
    )
    with pytest.raises(DatasetFormatError, match=r"parts \[2\] of 3 have no index yet"):
        load_index(root)
    write_index(root, index.__class__(**{**vars(index), "subjects": ()}), part_index_name(2, 3))
    assert [s.id for s in load_index(root).subjects] == ["a", "b", "c"]
    assert check_dataset(root).ok


def test_unfinished_sequence_is_not_complete_and_finishing_checks_the_parameters(dataset):
    index = load_index(dataset)
    entry = index.subjects[0].sequences[0]
    assert sequence_complete(dataset, index, "a", entry)
    (dataset / "a" / "talk" / "left" / "uv" / "000001.npz").unlink()
    assert not sequence_complete(dataset, index, "a", entry)
    (dataset / "a" / "talk" / "sequence.npz").unlink()
    assert not sequence_complete(dataset, index, "a", entry)
    bad = tiny_params(entry, 0)
    bad.pose[0, 0, 0] = np.inf
    with pytest.raises(DatasetFormatError, match="'pose' is not finite"):
        finish_sequence(dataset, index, "a", entry, bad)
    assert not (dataset / "a" / "talk" / "sequence.npz").exists()


def test_folder_source_records_and_skipping_bad_frames(dataset):
    source = FolderSource(dataset)
    assert len(source) == 18 and source.num_skipped == 0
    i = next(
        i for i in range(len(source)) if source.table.ref(i) == FrameRef("c", "talk", "left", 1)
    )
    record = source[i]
    image, _, _, _ = frame_pixels("c", "left", 1)
    np.testing.assert_array_equal(record["image"], image)
    params = tiny_params(tiny_index().subjects[2].sequences[0], 2)
    np.testing.assert_array_equal(record["viewmat"], params.viewmats[1])
    np.testing.assert_array_equal(record["expression"], params.expression[1])
    assert source.table.split[i] == 2  # "c" is a test subject
    _corrupt(dataset, "missing frame")
    with pytest.raises(DatasetFormatError, match=r"skip_bad_frames=True[^\n]*\n.*1 bad frames"):
        FolderSource(dataset)
    source = FolderSource(dataset, skip_bad_frames=True)
    assert len(source) == 17 and source.num_skipped == 1
    assert FrameRef("a", "talk", "front", 1) not in {source.table.ref(i) for i in range(17)}
