"""Packed shards: the same records as the folder, bad records named, resuming, the manifest."""

import io
import json
import pickle
import shutil

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from data_fixtures import SIZE, write_tiny_dataset
from PIL import Image

from uika_jax.data.format import DatasetFormatError
from uika_jax.data.shard_records import encode_record, split_record
from uika_jax.data.shards import (
    MANIFEST_FILE,
    WRITER_OPTIONS,
    ShardSource,
    pack_dataset,
    shard_name,
)
from uika_jax.data.sources import FolderSource
from uika_jax.tools.cli import main as uika

K = 4
NUM_SHARDS = 5  # 18 frames: 4 + 4 + 4 + 4 + 2


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_tiny_dataset(root / "ds")
    result = pack_dataset(root / "ds", root / "out", records_per_shard=K)
    assert (result.num_records, result.num_shards, result.shards_written) == (18, NUM_SHARDS, 5)
    return root / "ds", root / "out"


@pytest.fixture
def shards(packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed[1], out)
    return out


def assert_same_record(got, want):
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_shards_yield_exactly_the_folder_records(packed):
    folder = FolderSource(packed[0])
    source = ShardSource(packed[1])
    assert sorted(p.name for p in packed[1].iterdir()) == sorted(
        [MANIFEST_FILE] + [shard_name(s, NUM_SHARDS) for s in range(NUM_SHARDS)]
    )
    assert len(source) == len(folder) == 18 and source.num_skipped == 0
    assert source.index == folder.index
    for field in ("subjects", "sequences", "cameras"):
        assert getattr(source.table, field) == getattr(folder.table, field)
    for field in ("subject", "sequence", "camera", "frame", "split"):
        np.testing.assert_array_equal(getattr(source.table, field), getattr(folder.table, field))
    for i in range(len(folder)):
        assert_same_record(source[i], folder[i])
    # records stay grouped by sequence; a pickled copy (a grain worker's) and grain read the same
    assert (np.diff(source.table.sequence) >= 0).all()
    order = [17, 3, 8, 0]
    copy = pickle.loads(pickle.dumps(source))
    for got, i in zip(copy.__getitems__(order), order, strict=True):
        assert_same_record(got, folder[i])
    assert_same_record(grain.MapDataset.source(copy)[11], folder[11])


def _replace_record(out, shard, position, make_bad):
    """Rewrites one shard with record `position` replaced by make_bad(good record bytes)."""
    path = out / shard_name(shard, NUM_SHARDS)
    reader = ArrayRecordReader(str(path))
    records = reader.read(list(range(reader.num_records())))
    reader.close()
    records[position] = make_bad(records, position)
    writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
    for record in records:
        writer.write(record)
    writer.close()


def _png(shape):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _with_blob(records, position, **blobs):
    return encode_record(**(split_record(records[position], "test") | blobs))


def _nan_params(blob):
    """The blob with its first expression coefficient (after the 32-byte header) NaN."""
    return blob[:32] + np.float32(np.nan).tobytes() + blob[36:]


BAD_RECORDS = {
    "truncated": (
        lambda r, p: r[p][:-50],
        "the header declares [0-9,]+ bytes, the record has [0-9,]+ .truncated or corrupt",
    ),
    "empty": (lambda r, p: b"", "0 bytes, shorter than a record header"),
    "image size": (
        lambda r, p: _with_blob(r, p, image=_png((SIZE, SIZE + 1, 3))),
        f"image is {SIZE + 1}x{SIZE}, expected {SIZE}x{SIZE}",
    ),
    "mask size": (
        lambda r, p: _with_blob(r, p, mask=_png((SIZE - 1, SIZE))),
        f"mask is {SIZE}x{SIZE - 1}, expected",
    ),
    "params not npz": (
        lambda r, p: _with_blob(r, p, params=b"PK-not-params" * 9),
        "params: not a params blob",
    ),
    "params truncated": (
        lambda r, p: _with_blob(r, p, params=split_record(r[p], "test")["params"][:-4]),
        "params: [0-9,]+ bytes, expected [0-9,]+ .truncated",
    ),
    "params not finite": (
        lambda r, p: _with_blob(r, p, params=_nan_params(split_record(r[p], "test")["params"])),
        "params: not finite",
    ),
    "another record": (lambda r, p: r[p + 1], "holds record 7 .* the manifest expects 6"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_record_names_the_shard_and_the_record(shards, case):
    make_bad, text = BAD_RECORDS[case]
    _replace_record(shards, 1, 2, make_bad)
    source = ShardSource(shards)
    name = shard_name(1, NUM_SHARDS)
    with pytest.raises(
        DatasetFormatError, match=rf"{name}: record 2 \(source record 6\): .*{text}"
    ):
        source[6]
    with pytest.raises(DatasetFormatError, match=rf"{name}: record 2 \(source record 6\)"):
        source.__getitems__([5, 6])
    assert int(source[5]["record"]) == 5 and int(source[7]["record"]) == 7


def test_rerun_rewrites_only_the_missing_shard_and_a_missing_shard_is_refused(
    packed, shards, capsys
):
    missing = shards / shard_name(2, NUM_SHARDS)
    original = missing.read_bytes()
    missing.unlink()
    with pytest.raises(DatasetFormatError, match=rf"lists 1 shards missing .*'{missing.name}'"):
        ShardSource(shards)
    kept = {p.name: p.stat() for p in shards.glob("shard-*")}
    (shards / f".{missing.name}.0badf00d.tmp").write_bytes(b"left by a killed run")
    args = ["pack", str(packed[0]), "--out", str(shards), "--records-per-shard", str(K)]
    assert uika(args) == 0
    assert "18 records in 5 shards (1 written, 4 already there)" in capsys.readouterr().out
    for name, stat in kept.items():
        now = (shards / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert missing.read_bytes() == original
    assert not list(shards.glob(".*tmp")) and len(ShardSource(shards)) == 18
    assert uika([*args[:-1], "5"]) == 1
    assert "holds a pack of another dataset, records-per-shard or set" in capsys.readouterr().err


def test_bad_frames_are_an_error_or_skipped_and_listed(packed, tmp_path):
    dataset = tmp_path / "ds"
    shutil.copytree(packed[0], dataset)
    (dataset / "b" / "talk" / "left" / "masks" / "000001.png").unlink()
    with pytest.raises(DatasetFormatError, match="skip_bad_frames=True"):
        pack_dataset(dataset, tmp_path / "strict", records_per_shard=K)
    assert not (tmp_path / "strict").exists()
    result = pack_dataset(dataset, tmp_path / "out", records_per_shard=K, skip_bad_frames=True)
    assert (result.num_records, result.num_skipped, result.num_shards) == (17, 1, 5)
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["skipped"] == [["b", "talk", "left", 1]]
    folder = FolderSource(dataset, skip_bad_frames=True)
    source = ShardSource(tmp_path / "out")
    assert source.num_skipped == 1
    np.testing.assert_array_equal(source.table.frame, folder.table.frame)
    for i in (9, 10, 16):
        assert_same_record(source[i], folder[i])


@pytest.mark.parametrize(
    ("edit", "text"),
    [
        (lambda m: m["shards"][4].update(num_records=4), "'shards' is .*, expected"),
        (lambda m: m["shards"][0].update(file="../elsewhere"), "'shards' is .*, expected"),
        (lambda m: m.update(skipped=[["a", "talk", "front", 9]]), r"skipped frame .* not in"),
        (lambda m: m.update(records_per_shard=0), "records_per_shard 0 is not a positive int"),
        (lambda m: m["dataset"].update(image_size=0), "dataset: .image_size. = 0 is out of range"),
    ],
)
def test_bad_manifest_is_refused_naming_the_field(shards, edit, text):
    path = shards / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetFormatError, match=rf"{MANIFEST_FILE}: .*{text}"):
        ShardSource(shards)
