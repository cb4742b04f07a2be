"""A model file is untrusted input: crafted files are refused fast, cleanly and within a memory cap.

Each hostile file is assembled here from pickle opcodes (or zip and `.npy`
bytes) and loaded by ONE child process, in turn, under an address-space cap of
the child's own baseline (after importing the loader, which imports jax) plus
300 MB. For every file the child reports the exception type, the message and
the load time; the tests assert a `HeadModelFileError` naming the file and the
problem, no crash and under two seconds each. Before the restricted
unpickler's redesign these files segfaulted the loader (a forged numpy dtype,
a tuple nested a million deep as a dict key), allocated gigabytes, spun in
`set()` or escaped as a RecursionError.
"""

import dataclasses
import io
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fake_flame import make_fake_flame_arrays, write_flame_npz, write_flame_pkl

from uika_jax.head.io import HeadModelFileError, load_head_model, save_head_model
from uika_jax.head.pickled import ModelFileLimits

MEMORY_HEADROOM = 300 << 20
"""Address space the child may use beyond its baseline after importing the loader."""
MAX_LOAD_SECONDS = 2.0

# --------------------------------------------------------------------------- pickle opcodes
# Protocol 2 opcodes, strings written as Python 2 wrote them (SHORT_BINSTRING / BINSTRING).


def _str(text: str) -> bytes:
    data = text.encode("latin1")
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<i", len(data)) + data


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _dict(items: dict[str, bytes]) -> bytes:
    return b"}(" + b"".join(_str(key) + value for key, value in items.items()) + b"u"


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _call(function: bytes, *args: bytes) -> bytes:
    return function + _tuple(*args) + b"R"


def _build(obj: bytes, state: bytes) -> bytes:
    return obj + state + b"b"


def _new(module: str, name: str) -> bytes:
    return _global(module, name) + b")\x81"  # EMPTY_TUPLE, NEWOBJ


def _dtype(code: str, order: str, flags: int = 0) -> bytes:
    dtype = _call(_global("numpy", "dtype"), _str(code), b"\x89", b"\x88")
    state = _tuple(_int(3), _str(order), b"NNN", _int(-1), _int(-1), _int(flags))
    return _build(dtype, state)


def _array_with_state(shape: tuple[int, ...], dtype: bytes, data: bytes) -> bytes:
    """numpy's array pickle: `_reconstruct(ndarray, (0,), 'b')`, BUILD with `data` (opcodes)."""
    empty = _call(
        _global("numpy.core.multiarray", "_reconstruct"),
        _global("numpy", "ndarray"),
        _tuple(_int(0)),
        _str("b"),
    )
    state = _tuple(_int(1), _tuple(*map(_int, shape)), dtype, b"\x89", data)
    return _build(empty, state)


def _raw(data: bytes) -> bytes:
    """Raw array data as Python 2 pickled it: a latin-1 str."""
    return _str(data.decode("latin1"))


def _array(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    code = array.dtype.str
    return _array_with_state(array.shape, _dtype(code[1:], code[0]), _raw(array.tobytes()))


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


@pytest.fixture(scope="module")
def base_arrays():
    return make_fake_flame_arrays(num_vertices=8, num_faces=4, seed=0)


def _flame_pickle(arrays, **replaced: bytes) -> bytes:
    """A FLAME dict (float64 like the official files) with some values replaced by opcodes."""
    values = {
        key: _array(value.astype(np.float64) if value.dtype.kind == "f" else value)
        for key, value in arrays.items()
    }
    return _pickle(_dict({**values, **replaced}))


# --------------------------------------------------------------------------- crafted files


def _type_confusion() -> bytes:
    """BUILD forges a void dtype holding an object field whose flags say it holds none.

    `_frombuffer` then trusts the flags and `set` hashes the element: 8 bytes of
    the file read as a PyObject pointer (a segfault, or worse).
    """
    forged = _build(
        _call(_global("numpy", "dtype"), _str("V8"), b"\x89", b"\x88"),
        _tuple(
            _int(3),
            _str("|"),
            b"N",
            _tuple(_str("f")),
            _dict({"f": _tuple(_dtype("O8", "|", flags=63), _int(0))}),
            _int(8),
            _int(1),
            _int(0),
        ),
    )
    buffer = b"C\x08" + b"\x41" * 8  # SHORT_BINBYTES
    array = _call(
        _global("numpy.core.numeric", "_frombuffer"), buffer, forged, _tuple(_int(1)), _str("C")
    )
    return _pickle(_call(_global("__builtin__", "set"), array))


def _npz_with_header(header: dict, data: bytes = b"") -> bytes:
    """A zip with one member, v_template.npy, holding `header` and `data`."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, header)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("v_template.npy", npy.getvalue() + data)
    return archive.getvalue()


def _crafted_files(directory: Path, arrays) -> dict[str, Path]:
    """Writes every crafted file; returns name -> path."""
    self_referencing_ch = (
        _new("chumpy.ch", "Ch") + b"q\x00" + _build(b"", _dict({"x": b"h\x00"}))
    )  # BINPUT 0, then BUILD {'x': BINGET 0}
    csr = _build(
        _new("scipy.sparse._csr", "csr_matrix"),
        _dict(
            {
                "_shape": _tuple(_int(1), _int(250_000_000)),
                "maxprint": _int(50),
                "indptr": _array(np.array([0, 1], np.int32)),
                "indices": _array(np.array([0], np.int32)),
                "data": _array(np.array([1.0])),
            }
        ),
    )
    reconstruct = _global("numpy.core.multiarray", "_reconstruct")
    contents = {
        "type_confusion.pkl": _type_confusion(),
        "ndarray_call.pkl": _flame_pickle(
            arrays,
            shapedirs=_call(_global("numpy", "ndarray"), _tuple(*map(_int, (200000, 3, 401)))),
        ),
        "huge_declared_array.pkl": _flame_pickle(
            arrays,
            shapedirs=_array_with_state((200000, 3, 401), _dtype("f8", "<"), _raw(bytes(8))),
        ),
        "huge_sparse.pkl": _flame_pickle(arrays, J_regressor=csr),
        "set_spin.pkl": _pickle(
            _call(
                _global("__builtin__", "set"),
                _call(reconstruct, _global("numpy", "ndarray"), _tuple(_int(10**7)), _str("b")),
            )
        ),
        "self_referencing_chumpy.pkl": _flame_pickle(arrays, shapedirs=self_referencing_ch),
        "tuple_key.pkl": _pickle(b"}N\x85Ns"),  # {(None,): None}
        "deep_tuple_key.pkl": _pickle(b"}N" + b"\x85" * 1_000_000 + b"Ns"),
        "bytearray_bomb.pkl": b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".",
        "huge_header.npz": _npz_with_header(
            {"descr": "<f8", "fortran_order": False, "shape": (400_000_000, 3)}
        ),
        "short_member.npz": _npz_with_header(
            {"descr": "<f8", "fortran_order": False, "shape": (5023, 3)}, bytes(16)
        ),
        "object_member.npz": _npz_with_header(
            {"descr": "|O", "fortran_order": False, "shape": (2,)}, bytes(16)
        ),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)

    def edited(key, value):
        return {**arrays, key: value}

    weights = arrays["weights"].copy()
    weights[0] = [1.5, -0.5, 0.0, 0.0, 0.0]
    faces = arrays["f"].copy()
    faces[0] = [5, 5, 5]
    kintree = arrays["kintree_table"].astype(np.float64)
    for name, edit in {
        "negative_weights.pkl": edited("weights", weights),
        "degenerate_face.pkl": edited("f", faces),
        "kintree_nan.pkl": edited(
            "kintree_table", np.where([[1, 0, 0, 0, 0], [0] * 5], np.nan, kintree)
        ),
        "kintree_fraction.pkl": edited(
            "kintree_table", kintree + np.array([[0, 0.7, 0.2, 0, 0], [0] * 5])
        ),
        "short_v_template.pkl": edited("v_template", arrays["v_template"][:-1]),
    }.items():
        paths[name] = write_flame_pkl(directory / name, edit, sparse_regressor=False)

    model = load_head_model(write_flame_npz(directory / "valid.npz", arrays))
    uv_coords = np.full((12, 2), 0.5, np.float32)
    uv_coords[3] = np.nan
    uv_faces = np.arange(12, dtype=np.int32).reshape(4, 3)
    paths["nan_uv.npz"] = save_head_model(
        dataclasses.replace(model, uv_coords=uv_coords, uv_faces=uv_faces), directory / "nan_uv.npz"
    )
    paths["a_directory"] = directory / "a_directory"
    paths["a_directory"].mkdir()
    return paths


EXPECTED = {
    "type_confusion.pkl": r"refusing to unpickle: numpy\.dtype\('V8'\)",
    "ndarray_call.pkl": r"refusing to unpickle: calling numpy\.ndarray",
    "huge_declared_array.pkl": r"shape \(200000, 3, 401\) \(240,600,000 elements\) exceeds",
    "huge_sparse.pkl": r"sparse matrix: an array of shape \(1, 250000000\) exceeds",
    "set_spin.pkl": r"numpy _reconstruct other than numpy's own",
    "self_referencing_chumpy.pkl": r"chumpy\.ch\.Ch whose 'x' is itself a chumpy Ch",
    "tuple_key.pkl": r"a dict key that is not a string",
    "deep_tuple_key.pkl": r"more than 100,000 opcodes",
    "bytearray_bomb.pkl": r"a bytearray of 1,099,511,627,776 bytes",
    "huge_header.npz": r"v_template: an array of shape \(400000000, 3\) exceeds",
    "short_member.npz": r"declares shape \(5023, 3\).*holds only 16 bytes",
    "object_member.npz": r"v_template has dtype object",
    "negative_weights.pkl": r"lbs_weights has negative entries",
    "degenerate_face.pkl": r"face 0 is \[5, 5, 5\], which repeats a vertex",
    "kintree_nan.pkl": r"kintree_table holds non-integer values",
    "kintree_fraction.pkl": r"kintree_table holds non-integer values",
    "short_v_template.pkl": r"v_template has 7 vertices \(shape \(7, 3\)\), while shapedirs",
    "nan_uv.npz": r"uv_coords contains NaN",
    "a_directory": r"is a directory",
}

_CHILD = """
import json, resource, sys, time
from uika_jax.head.io import load_head_model

def address_space():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

cap = address_space() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
print(json.dumps({"cap": cap}), flush=True)
for name, path in json.loads(sys.argv[1]).items():
    start = time.perf_counter()
    try:
        load_head_model(path)
        kind, message = "loaded", ""
    except BaseException as e:
        kind, message = type(e).__name__, str(e)
    seconds = time.perf_counter() - start
    print(json.dumps({"name": name, "type": kind, "message": message, "seconds": seconds}),
          flush=True)
"""


@pytest.fixture(scope="module")
def child_outcomes(tmp_path_factory, base_arrays):
    """Loads every crafted file in one capped child: (paths, outcomes, returncode, stderr)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the address-space cap reads /proc/self/status (Linux)")
    paths = _crafted_files(tmp_path_factory.mktemp("crafted"), base_arrays)
    cases = json.dumps({name: str(path) for name, path in paths.items()})
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, cases, str(MEMORY_HEADROOM)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=Path(__file__).parents[1],
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    outcomes = {line["name"]: line for line in lines if "name" in line}
    return paths, outcomes, result.returncode, result.stderr[-2000:]


def test_expectations_cover_every_crafted_file(child_outcomes):
    paths, _, _, _ = child_outcomes
    assert sorted(paths) == sorted(EXPECTED)


def test_child_survives_every_file(child_outcomes):
    _, outcomes, returncode, stderr = child_outcomes
    assert returncode == 0, f"the loader crashed the child (status {returncode}): {stderr}"
    assert sorted(outcomes) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_crafted_file_refused(child_outcomes, name):
    paths, outcomes, returncode, stderr = child_outcomes
    if name not in outcomes:
        pytest.fail(f"the child died before reporting {name} (status {returncode}): {stderr}")
    outcome = outcomes[name]
    message = outcome["message"]
    assert outcome["type"] == "HeadModelFileError", f"{outcome['type']}: {message}"
    assert str(paths[name]) in message
    assert re.search(EXPECTED[name], message), message
    assert "MemoryError" not in message
    assert outcome["seconds"] < MAX_LOAD_SECONDS, outcome


def test_limits_are_configurable(tmp_path, base_arrays):
    pkl = write_flame_pkl(tmp_path / "flame.pkl", base_arrays, sparse_regressor=False)
    npz = write_flame_npz(tmp_path / "flame.npz", base_arrays)
    for path in (pkl, npz):
        assert load_head_model(path).num_vertices == 8
        tight = ModelFileLimits(max_array_elements=8 * 3 * 400 - 1)
        with pytest.raises(HeadModelFileError, match="max_array_elements") as e:
            load_head_model(path, limits=tight)
        assert str(path) in str(e.value)
        with pytest.raises(HeadModelFileError, match="max_file_bytes"):
            load_head_model(path, limits=ModelFileLimits(max_file_bytes=1000))
    with pytest.raises(HeadModelFileError, match="max_total_bytes"):
        load_head_model(npz, limits=ModelFileLimits(max_total_bytes=50_000))


def test_a_string_referenced_many_times_is_charged_each_time(tmp_path):
    """20 arrays over one memoized 100 kB string decode 2 MB: over a 1 MB budget, refused."""
    u1 = _dtype("u1", "|")
    first = _array_with_state((100_000,), u1, _raw(bytes(100_000)) + b"q\x00")  # BINPUT 0
    again = _array_with_state((100_000,), u1, b"h\x00")  # BINGET 0
    path = tmp_path / "flame.pkl"
    path.write_bytes(_pickle(_dict({"a": first, **{f"b{i}": again for i in range(20)}})))
    assert path.stat().st_size < 110_000
    with pytest.raises(HeadModelFileError, match=r"ModelFileLimits\.max_total_bytes") as e:
        load_head_model(path, limits=ModelFileLimits(max_total_bytes=1_000_000))
    assert str(path) in str(e.value)
