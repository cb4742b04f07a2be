"""FLAME-format model io: official-style pickles, npz, UV layouts, convert CLI, refusals."""

import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_oracle
from fake_flame import make_fake_flame_arrays, write_flame_npz, write_flame_pkl

from uika_jax.head import convert
from uika_jax.head.io import HeadModelFileError, load_head_model, load_uv_layout
from uika_jax.head.model import ModelFingerprint
from uika_jax.head.safe_pickle import load_restricted_pickle

SMALL = {"num_vertices": 300, "num_faces": 500}


@pytest.fixture(scope="module")
def small_arrays():
    return make_fake_flame_arrays(**SMALL, seed=1)


def _assert_matches(model, arrays):
    np.testing.assert_array_equal(model.v_template, arrays["v_template"])
    np.testing.assert_array_equal(model.faces, arrays["f"].astype(np.int32))
    np.testing.assert_array_equal(model.shapedirs, arrays["shapedirs"][..., :300])
    np.testing.assert_array_equal(model.exprdirs, arrays["shapedirs"][..., 300:])
    np.testing.assert_array_equal(model.posedirs, arrays["posedirs"])
    np.testing.assert_array_equal(model.j_regressor, arrays["J_regressor"])
    np.testing.assert_array_equal(model.lbs_weights, arrays["weights"])
    assert model.parents == (-1, 0, 1, 1, 1)
    for name in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights"):
        assert getattr(model, name).dtype == np.float32, name
    assert model.faces.dtype == np.int32


def _globals(path):
    """The (module, name) globals a pickle file references."""
    ops = list(pickletools.genops(Path(path).read_bytes()))
    return {tuple(arg.split(" ")) for op, arg, _ in ops if op.name == "GLOBAL"}


def test_official_style_pkl_round_trip(tmp_path):
    require_oracle("scipy")
    arrays = make_fake_flame_arrays(seed=0)
    path = write_flame_pkl(tmp_path / "generic_model.pkl", arrays)
    assert {
        ("chumpy.ch", "Ch"),
        ("scipy.sparse.csc", "csc_matrix"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("__builtin__", "set"),
    } <= _globals(path)
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules
    model = load_head_model(path)
    _assert_matches(model, arrays)
    assert (model.num_vertices, model.num_shape, model.num_expression) == (5023, 300, 100)
    assert model.fingerprint.source == "flame2020"
    assert model.fingerprint.version == "generic_model.pkl"
    assert not model.has_uv
    assert "chumpy" not in sys.modules


@pytest.mark.parametrize(
    "options",
    [
        {"python2": True, "protocol": 0},
        {"python2": True, "protocol": 1},
        {"python2": True, "protocol": 2, "chumpy": ("v_template", "shapedirs", "posedirs")},
        {"python2": False, "protocol": 0},
        {"python2": False, "protocol": 2},
        {"python2": False, "protocol": 4},
        {"python2": False, "protocol": 5, "chumpy": False, "sparse_regressor": False},
        {"python2": True, "protocol": 2, "chumpy": False, "sparse_regressor": False},
    ],
)
def test_pkl_variants_round_trip(tmp_path, small_arrays, options):
    if options.get("sparse_regressor", True):
        require_oracle("scipy")
    path = write_flame_pkl(tmp_path / "flame2023.pkl", small_arrays, **options)
    model = load_head_model(path)
    _assert_matches(model, small_arrays)
    assert model.fingerprint.source == "flame2023"


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickled_arrays_keep_dtype_byte_order_and_memory_order(tmp_path, protocol):
    values = np.arange(24.0).reshape(2, 3, 4)
    arrays = {
        "big_endian_fortran": np.asfortranarray(values.astype(">f8")),
        "int16": values.astype("<i2"),
        "uint8_transposed": values.astype(np.uint8).T,
        "bool": values > 5,
        "scalar": np.float32(2.5),
    }
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol))
    loaded = load_restricted_pickle(path, str(path))
    assert sorted(loaded) == sorted(arrays)
    for key, value in arrays.items():
        array = loaded[key].to_array(key)
        assert array.dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(array, value)


def test_raw_npz_round_trip(tmp_path, small_arrays):
    path = write_flame_npz(tmp_path / "FLAME2023_Open.npz", small_arrays)
    model = load_head_model(path)
    _assert_matches(model, small_arrays)
    assert model.fingerprint.source == "flame2023_open"
    # Same arrays from a plain-numpy pickle give the same digest.
    pkl_model = load_head_model(
        write_flame_pkl(tmp_path / "x.pkl", small_arrays, chumpy=False, sparse_regressor=False)
    )
    assert pkl_model.fingerprint.digest == model.fingerprint.digest
    assert pkl_model.fingerprint.source == "flame"


def test_num_shape_in_file(tmp_path, small_arrays):
    path = write_flame_npz(tmp_path / "flame.npz", small_arrays)
    model = load_head_model(path, num_shape_in_file=350)
    assert (model.num_shape, model.num_expression) == (350, 50)
    with pytest.raises(ValueError, match=r"400 components.*num_shape_in_file=400") as e:
        load_head_model(path, num_shape_in_file=400)
    assert str(path) in str(e.value)


def _write_obj(path, faces, uv_faces, uv_coords, num_vertices):
    lines = ["# test template", *(f"v {i * 1e-3} 0 0" for i in range(num_vertices))]
    lines += [f"vt {u:.9g} {v:.9g}" for u, v in uv_coords]
    lines += ["vn 0 0 1"]
    lines += [
        "f " + " ".join(f"{a + 1}/{b + 1}/1" for a, b in zip(face, uv_face, strict=True))
        for face, uv_face in zip(faces, uv_faces, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _uv_layout(arrays, seed=0):
    rng = np.random.default_rng(seed)
    num_faces = len(arrays["f"])
    uv_coords = rng.random((num_faces + 7, 2)).astype(np.float32)
    uv_faces = rng.integers(0, len(uv_coords), (num_faces, 3)).astype(np.int32)
    return uv_coords, uv_faces


def test_uv_from_obj_and_texture_npz(tmp_path, small_arrays):
    model_path = write_flame_npz(tmp_path / "generic_model.npz", small_arrays)
    uv_coords, uv_faces = _uv_layout(small_arrays)
    obj = _write_obj(tmp_path / "head_template.obj", small_arrays["f"], uv_faces, uv_coords, 300)
    texture = tmp_path / "FLAME_texture.npz"
    np.savez(texture, vt=uv_coords.astype(np.float64), ft=uv_faces.astype(np.int64), mean=[0.5])
    plain = load_head_model(model_path)
    for uv_path in (obj, texture):
        model = load_head_model(model_path, uv_path=uv_path)
        assert model.has_uv
        np.testing.assert_array_equal(model.uv_coords, uv_coords)
        np.testing.assert_array_equal(model.uv_faces, uv_faces)
        assert model.uv_coords.dtype == np.float32 and model.uv_faces.dtype == np.int32
        assert model.fingerprint.digest != plain.fingerprint.digest


def test_uv_obj_face_mismatch(tmp_path, small_arrays):
    model_path = write_flame_npz(tmp_path / "flame.npz", small_arrays)
    uv_coords, uv_faces = _uv_layout(small_arrays)
    faces = small_arrays["f"].copy()
    faces[7] = faces[7][::-1]
    obj = _write_obj(tmp_path / "other.obj", faces, uv_faces, uv_coords, 300)
    with pytest.raises(ValueError, match=r"do not match the model's faces.*face 7") as e:
        load_head_model(model_path, uv_path=obj)
    assert str(obj) in str(e.value)
    short = _write_obj(tmp_path / "short.obj", faces[:-1], uv_faces[:-1], uv_coords, 300)
    with pytest.raises(ValueError, match="499 faces, the model has 500"):
        load_uv_layout(short, small_arrays["f"])
    no_vt = tmp_path / "no_vt.obj"
    no_vt.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match=r"no_vt.obj:4: cannot parse"):
        load_uv_layout(no_vt, np.array([[0, 1, 2]]))


def test_convert_cli_round_trip(tmp_path, small_arrays, capsys):
    require_oracle("scipy")
    source = write_flame_pkl(tmp_path / "flame2023_no_jaw.pkl", small_arrays)
    uv_coords, uv_faces = _uv_layout(small_arrays)
    texture = tmp_path / "FLAME_texture.npz"
    np.savez(texture, vt=uv_coords, ft=uv_faces)
    out = tmp_path / "out" / "flame2023.npz"
    out.parent.mkdir()
    assert convert.main([str(source), str(out), "--uv", str(texture)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert os.listdir(out.parent) == ["flame2023.npz"]
    direct = load_head_model(source, uv_path=texture)
    converted = load_head_model(out)
    assert converted.fingerprint == direct.fingerprint
    assert converted.fingerprint == ModelFingerprint(
        "flame2023", "flame2023_no_jaw.pkl", direct.fingerprint.digest
    )
    for name in ("v_template", "faces", "shapedirs", "exprdirs", "posedirs", "j_regressor"):
        np.testing.assert_array_equal(getattr(converted, name), getattr(direct, name))
    np.testing.assert_array_equal(converted.lbs_weights, direct.lbs_weights)
    np.testing.assert_array_equal(converted.uv_coords, uv_coords)
    np.testing.assert_array_equal(converted.uv_faces, uv_faces)
    assert converted.parents == direct.parents
    with np.load(out, allow_pickle=False) as npz:
        assert str(npz["fingerprint_source"]) == "flame2023"
    # Converting the clean npz again is the identity; a bad input writes nothing.
    again = tmp_path / "out" / "again.npz"
    assert convert.main([str(out), str(again)]) == 0
    assert load_head_model(again).fingerprint == direct.fingerprint
    assert convert.main([str(tmp_path / "missing.pkl"), str(tmp_path / "out" / "x.npz")]) == 1
    assert "missing.pkl" in capsys.readouterr().err
    assert sorted(os.listdir(out.parent)) == ["again.npz", "flame2023.npz"]


class _Evil:
    def __init__(self, function, *args):
        self.reduce = (function, args)

    def __reduce__(self):
        return self.reduce


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_refuses_code_execution(tmp_path, attack):
    target = tmp_path / "pwned"
    command = f"touch {target}"
    evil = {
        "os.system": _Evil(os.system, command),
        "builtins.eval": _Evil(eval, f"__import__('os').system({command!r})"),
        "subprocess.Popen": _Evil(subprocess.Popen, ["touch", str(target)]),
    }[attack]
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": evil}, protocol=4))
    with pytest.raises(ValueError, match="forbidden global") as e:
        load_head_model(path)
    names = {"os.system": ("os.system", "posix.system")}.get(attack, (attack,))
    assert any(name in str(e.value) for name in names), str(e.value)
    assert str(path) in str(e.value)
    assert not target.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        # A chumpy expression class: only chumpy could evaluate it.
        (b"\x80\x02cchumpy.reordering\nSelect\n)\x81.", "chumpy.reordering.Select"),
        # copy_reg._reconstructor may only build the stand-ins from object.
        (b"ccopy_reg\n_reconstructor\n(cnumpy\ndtype\ncnumpy\ndtype\nS'f8'\ntR.", "_reconstructor"),
        # BUILD applies only to the inert stand-ins, never to what a global hands out.
        (b"\x80\x02c_codecs\nencode\nN}X\x09\x00\x00\x00_functionK\x01s\x86b.", "BUILD on _codecs"),
    ],
)
def test_refuses_misuse_of_allowed_globals(tmp_path, payload, match):
    path = tmp_path / "flame.pkl"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as e:
        load_head_model(path)
    assert str(path) in str(e.value)


def test_loader_needs_neither_chumpy_nor_scipy(tmp_path, small_arrays):
    require_oracle("scipy")
    path = write_flame_pkl(tmp_path / "generic_model.pkl", small_arrays)
    code = (
        "import sys\n"
        "import uika_jax.head.model\n"  # jax first: it may import scipy itself
        "for name in ('chumpy', 'chumpy.ch', 'scipy', 'scipy.sparse'): sys.modules[name] = None\n"
        "from uika_jax.head.io import load_head_model\n"
        f"model = load_head_model({str(path)!r})\n"
        "print(model.num_shape, model.num_expression, float(model.j_regressor.sum()))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["300", "100"]


def _corrupt(kind, tmp_path, arrays):
    if kind == "truncated pickle":
        data = (tmp_path / "ok.pkl").read_bytes()
        return ("flame.pkl", data[: len(data) // 2])
    if kind == "truncated npz":
        data = write_flame_npz(tmp_path / "ok.npz", arrays).read_bytes()
        return ("flame.npz", data[: len(data) // 2])
    if kind == "random bytes":
        return ("flame.pkl", np.random.default_rng(0).bytes(4096))
    if kind == "random npz":
        return ("flame.npz", np.random.default_rng(1).bytes(4096))
    if kind == "list":
        return ("flame.pkl", pickle.dumps([1, 2, 3], protocol=2))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("truncated pickle", "not a readable pickle"),
        ("truncated npz", "not a readable .npz"),
        ("random bytes", "not a readable pickle"),
        ("random npz", "not an .npz archive"),
        ("list", "holds a list, expected a dict"),
    ],
)
def test_corrupt_files(tmp_path, small_arrays, kind, match):
    write_flame_pkl(tmp_path / "ok.pkl", small_arrays, chumpy=True, sparse_regressor=False)
    name, data = _corrupt(kind, tmp_path, small_arrays)
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match) as e:
        load_head_model(path)
    assert str(path) in str(e.value)


def _edited(arrays, key, value):
    return {**arrays, key: value}


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a: {k: v for k, v in a.items() if k != "v_template"}, "missing v_template"),
        (
            lambda a: _edited(a, "v_template", np.where(np.eye(300, 3), np.nan, a["v_template"])),
            "v_template contains NaN",
        ),
        (lambda a: _edited(a, "posedirs", a["posedirs"][..., :35]), r"posedirs has shape"),
        (lambda a: _edited(a, "f", a["f"] + 300), "faces index outside"),
        (lambda a: _edited(a, "weights", a["weights"] * 2), "do not sum to 1"),
        (lambda a: _edited(a, "shapedirs", a["shapedirs"][..., :300]), "300 components"),
    ],
)
def test_bad_contents(tmp_path, small_arrays, edit, match):
    arrays = edit(small_arrays)
    path = tmp_path / "flame2023.pkl"
    write_flame_pkl(path, arrays, sparse_regressor=False)
    with pytest.raises(ValueError, match=match) as e:
        load_head_model(path)
    assert str(path) in str(e.value)


def test_missing_files(tmp_path, small_arrays):
    with pytest.raises(FileNotFoundError, match="not found") as e:
        load_head_model(tmp_path / "nope.pkl")
    assert str(tmp_path / "nope.pkl") in str(e.value)
    model_path = write_flame_npz(tmp_path / "flame.npz", small_arrays)
    with pytest.raises(FileNotFoundError, match=r"head_template\.obj"):
        load_head_model(model_path, uv_path=tmp_path / "head_template.obj")
    with pytest.raises(ValueError, match="not a FLAME texture file: missing vt, ft") as e:
        load_head_model(model_path, uv_path=model_path)
    assert isinstance(e.value, HeadModelFileError)
