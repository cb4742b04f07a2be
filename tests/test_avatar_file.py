"""The avatar file: a round trip, and crafted bad files refused with messages naming the file."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
from avatar_fixtures import builtin_head, head_config, random_avatar
from fake_flame import make_fake_flame_arrays, write_flame_npz

from uika_jax.head.io import load_head_model
from uika_jax.tools.avatar_file import AvatarFileError, read_avatar, write_avatar


@pytest.fixture
def good(tmp_path):
    """(path, avatar) of a valid avatar file on the built-in head."""
    head, anchors = builtin_head()
    avatar = random_avatar(head, anchors, seed=1)
    path = tmp_path / "good.npz"
    write_avatar(path, avatar)
    return path, avatar


def _members(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _rewrite(path, target, **changes) -> None:
    np.savez(target, **{**_members(path), **changes})


def test_round_trip(good):
    path, avatar = good
    back = read_avatar(path)
    for name in ("means", "offsets", "quats", "log_scales", "opacity_logits", "colors"):
        np.testing.assert_array_equal(getattr(back, name), getattr(avatar, name))
        assert getattr(back, name).dtype == np.float32
    for name in ("face_ids", "barycentrics", "texels", "positions"):
        np.testing.assert_array_equal(getattr(back.anchors, name), getattr(avatar.anchors, name))
    assert back.anchors.uv_resolution == avatar.anchors.uv_resolution == 48
    assert back.fingerprint == avatar.fingerprint and back.config == head_config()
    back.check_head(builtin_head()[0])
    canonical = back.canonical()
    assert canonical.means.shape == (1, avatar.num_gaussians, 3)
    np.testing.assert_array_equal(np.asarray(canonical.offsets[0]), avatar.offsets)


def _refused(path, *words) -> str:
    with pytest.raises(AvatarFileError) as error:
        read_avatar(path)
    message = str(error.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


def test_not_an_npz(tmp_path):
    path = tmp_path / "photo.npz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    _refused(path)


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.npz"):
        read_avatar(tmp_path / "nowhere.npz")


def test_wrong_format_string(good, tmp_path):
    _rewrite(good[0], tmp_path / "other.npz", format=np.asarray("uika-checkpoint"))
    _refused(tmp_path / "other.npz", "uika-checkpoint", "uika-avatar")


def test_huge_declared_count_refused_before_allocation(good, tmp_path):
    """A member declaring 10^9 Gaussians (12 GB) but 12 bytes of data: refused, no allocation."""
    members = _members(good[0])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 3)}
    )
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in members.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            data = header.getvalue() + bytes(12) if name == "means" else buffer.getvalue()
            archive.writestr(f"{name}.npy", data)
    tracemalloc.start()
    try:
        _refused(path, "means")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_nan_values(good, tmp_path):
    means = _members(good[0])["means"].copy()
    means[7, 1] = np.nan
    _rewrite(good[0], tmp_path / "nan.npz", means=means)
    _refused(tmp_path / "nan.npz", "means", "NaN")


def test_mismatched_gaussian_counts(good, tmp_path):
    colors = _members(good[0])["colors"][:-1]
    _rewrite(good[0], tmp_path / "short.npz", colors=colors)
    _refused(tmp_path / "short.npz", "colors")


def test_config_not_json(good, tmp_path):
    _rewrite(good[0], tmp_path / "cfg.npz", config_json=np.frombuffer(b"{model: tiny", np.uint8))
    _refused(tmp_path / "cfg.npz", "config_json", "JSON")
    listed = np.frombuffer(json.dumps([1, 2]).encode(), np.uint8)
    _rewrite(good[0], tmp_path / "list.npz", config_json=listed)
    _refused(tmp_path / "list.npz", "JSON object")


def test_another_head_models_fingerprint(good, tmp_path):
    path, _ = good
    flame = load_head_model(
        write_flame_npz(tmp_path / "generic_model.npz", make_fake_flame_arrays(64, 100))
    )
    avatar = read_avatar(path)
    with pytest.raises(AvatarFileError) as error:
        avatar.check_head(flame, origin=str(path))
    assert str(path) in str(error.value) and str(flame.fingerprint) in str(error.value)
    _rewrite(path, tmp_path / "forged.npz", fingerprint=np.asarray("synthetic:0:0000"))
    forged = read_avatar(tmp_path / "forged.npz")
    with pytest.raises(AvatarFileError, match="synthetic:0:0000"):
        forged.check_head(builtin_head()[0], origin=str(tmp_path / "forged.npz"))


def test_face_ids_out_of_range(good, tmp_path):
    head = builtin_head()[0]
    face_ids = _members(good[0])["anchor_face_ids"].copy()
    face_ids[3] = head.faces.shape[0]
    _rewrite(good[0], tmp_path / "faces.npz", anchor_face_ids=face_ids)
    avatar = read_avatar(tmp_path / "faces.npz")
    with pytest.raises(AvatarFileError, match=f"anchor 3 names triangle {head.faces.shape[0]}"):
        avatar.check_head(head, origin=str(tmp_path / "faces.npz"))
    face_ids[3] = -2
    _rewrite(good[0], tmp_path / "negative.npz", anchor_face_ids=face_ids)
    _refused(tmp_path / "negative.npz", "face ids")


def test_pickled_member_refused(good, tmp_path):
    """An object array (which only a pickle can hold) is refused, never unpickled."""
    members = _members(good[0])
    members["config_json"] = np.array([{"head": {}}], dtype=object)
    np.savez(tmp_path / "pickled.npz", **members)
    _refused(tmp_path / "pickled.npz")


def test_texels_outside_the_uv_map(good, tmp_path):
    """A texel with one negative coordinate (it would index from the end) is refused."""
    texels = _members(good[0])["anchor_texels"].copy()
    texels[5] = (texels[5, 0], -1)
    _rewrite(good[0], tmp_path / "texels.npz", anchor_texels=texels)
    _refused(tmp_path / "texels.npz", "texels")
    texels[5] = (48, 0)
    _rewrite(good[0], tmp_path / "row.npz", anchor_texels=texels)
    _refused(tmp_path / "row.npz", "texels")


def test_non_integer_scalars(good, tmp_path):
    _rewrite(good[0], tmp_path / "side.npz", anchor_uv_resolution=np.asarray(np.nan))
    _refused(tmp_path / "side.npz", "anchor_uv_resolution")
    _rewrite(good[0], tmp_path / "version.npz", version=np.asarray(1.5))
    _refused(tmp_path / "version.npz", "version")


def test_ids_beyond_int32_are_refused_not_wrapped(good, tmp_path):
    face_ids = _members(good[0])["anchor_face_ids"].astype(np.int64)
    face_ids[3] = 2**32 + 5  # would wrap to 5 as int32
    _rewrite(good[0], tmp_path / "wide.npz", anchor_face_ids=face_ids)
    _refused(tmp_path / "wide.npz", "anchor face ids", "outside")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"head": "flame.pkl"}, "config head is not a JSON object"),
        ({"head": {"model_path": 7}}, "head.model_path=7"),
        ({"render": {"capacity": 2**40}}, "render.capacity"),
        ({"render": {"tile_cap": 0}}, "render.tile_cap"),
        ({"render": {"capacity_headroom": "lots"}}, "render.capacity_headroom"),
        ({"render": {"background": [1, 2]}}, "render.background"),
    ],
)
def test_config_settings_the_tools_read_are_checked(good, tmp_path, config, message):
    document = np.frombuffer(json.dumps(config).encode(), np.uint8)
    _rewrite(good[0], tmp_path / "config.npz", config_json=document)
    _refused(tmp_path / "config.npz", message)
