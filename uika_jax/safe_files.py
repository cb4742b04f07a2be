"""Files in and out: atomic writes, and `.npz` archives read as untrusted input.

Everything the project writes (head models, dataset files, images (`write_png`),
checkpoints' side files) goes through `atomic_write`: a temporary file in the destination's
folder, flushed and fsynced, then renamed over the destination, so a reader
never sees a half-written file and an interrupted writer leaves the old file
(or none) in place.

Writers that open their output by name (an ArrayRecord writer) get a temporary
path from `atomic_path` instead, renamed the same way once they are done.

`.npz` archives from outside (head models, dataset parameters, UV maps, the blobs
inside a shard record: a path, bytes or a binary file) are read by `read_npz`:
only the wanted members; each `.npy` header parsed first (format
1.0 or 2.0) and checked (a plain numeric dtype, the caller's shape check, the
declared bytes against the member's uncompressed size and a byte budget) before
its data is read; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
import zipfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of a zip (hence `.npz`) archive."""

NPY_MAGIC = b"\x93NUM"
"""The first bytes of a `.npy` file."""

PLAIN_CODES = frozenset(
    f"{kind}{size}"
    for kind, sizes in (("b", (1,)), ("i", (1, 2, 4, 8)), ("u", (1, 2, 4, 8)), ("f", (2, 4, 8)))
    for size in sizes
)
"""Kind and byte size of the plain numeric dtypes accepted in files from outside."""

PLAIN_DTYPES = frozenset(
    f"{order}{code}" for code in PLAIN_CODES for order in (("|",) if code[1] == "1" else "<>")
)
"""Dtype strings (`numpy.dtype.str`) accepted in files from outside: plain numbers only."""

MAX_STRING_CHARS = 1024
"""Longest unicode scalar `read_npz` accepts in a member named in `string_keys`."""


def _temporary_beside(path: str | os.PathLike) -> tuple[Path, Path]:
    """(the destination, a fresh temporary name in its folder); the folder must exist."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    return path, folder / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _publish(temp: Path, path: Path) -> None:
    """Makes a finished temporary file readable and renames it over the destination."""
    os.chmod(temp, 0o644)
    os.replace(temp, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Opens a temporary file beside `path` for binary writing; renames it over `path` on success.

    The temporary file is removed if the body raises. The rename alone keeps a
    crashed or killed process from leaving a half-written file; `durable` also
    fsyncs the data before the rename, which a power loss needs (a writer of many
    small files may skip it per file and call `os.sync()` before it records them
    as complete, as `uika_jax.data.writer` does).

    Args:
      path: the destination; its folder must exist (it is not created).
      durable: fsync the file before renaming it.

    Yields:
      A binary file object to write to.

    Raises:
      FileNotFoundError: if the destination's folder does not exist.
    """
    path, temp = _temporary_beside(path)
    try:
        with temp.open("xb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        _publish(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, document: object) -> Path:
    """Writes a JSON document (indented, no NaN) atomically; returns the path."""
    path = Path(path)
    text = json.dumps(document, indent=1, allow_nan=False, ensure_ascii=False)
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))
    return path


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes a uint8 (H, W) or (H, W, 3) image as a PNG atomically; returns the path.

    Raises:
      FileNotFoundError: if the folder of `path` does not exist (it is not created).
    """
    path = Path(path)
    with atomic_write(path) as f:
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format="PNG")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that opens files by name.

    When the body returns (the writer closed), the file is fsynced and renamed over
    `path`; if the body raises, the temporary file is removed.

    Args:
      path: the destination; its folder must exist (it is not created).

    Yields:
      The temporary path (nothing exists there yet).

    Raises:
      FileNotFoundError: if the destination's folder does not exist, or the body
        wrote nothing at the temporary path.
    """
    path, temp = _temporary_beside(path)
    try:
        yield temp
        if not temp.is_file():
            raise FileNotFoundError(f"{path}: the writer left no file at {temp}")
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_npz(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    *,
    compress: bool = False,
    durable: bool = True,
):
    """Writes arrays as an `.npz` atomically (no object arrays: they would need pickle).

    Args:
      path: the destination.
      arrays: name -> array of a plain numeric or unicode dtype.
      compress: deflate the members.
      durable: as in `atomic_write`.

    Raises:
      ValueError: if an array has an object dtype.
    """
    for name, value in arrays.items():
        if np.asarray(value).dtype == object:
            raise ValueError(f"{path}: array {name!r} has an object dtype")
    with atomic_write(path, durable=durable) as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def file_magic(path: Path) -> bytes:
    """The first four bytes of a file."""
    with path.open("rb") as f:
        return f.read(4)


NpzSource = str | os.PathLike | bytes | BinaryIO
"""What `read_npz` reads: a file's path, an archive's bytes, or a seekable binary file object."""


def _open_npz(source: NpzSource) -> tuple[bytes, BinaryIO | Path]:
    """(the first four bytes, something `zipfile.ZipFile` opens) of an archive."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data[:4], io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        return file_magic(Path(source)), Path(source)
    start = source.tell()
    magic = source.read(4)
    source.seek(start)
    return magic, source


def _read_member(
    archive: zipfile.ZipFile,
    member: zipfile.ZipInfo,
    key: str,
    origin: str,
    budget: int,
    budget_text: str,
    check_shape: Callable[[tuple[int, ...]], object],
    string_keys: Collection[str],
    error: type[Exception],
) -> np.ndarray:
    """Reads one `.npy` member: its header first, checked, then exactly the declared bytes."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format {version}, expected 1.0 or 2.0")
        string = key in string_keys and dtype.kind == "U" and shape == ()
        if dtype.str not in PLAIN_DTYPES and not (
            string and dtype.itemsize <= 4 * MAX_STRING_CHARS
        ):
            raise error(f"{origin}: {key} has dtype {dtype}, expected a plain numeric type")
        try:
            check_shape(shape)
        except ValueError as e:
            raise error(f"{origin}: {key}: {e}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        available = member.file_size - f.tell()
        if nbytes > available:
            raise error(
                f"{origin}: {key}: its header declares shape {shape} of {dtype} "
                f"({nbytes:,} bytes), the member holds only {max(available, 0):,} bytes of data"
            )
        if nbytes > budget:
            raise error(f"{origin}: its arrays exceed {budget_text}")
        data = f.read(nbytes)
    if len(data) != nbytes:
        raise ValueError(f"{key}: truncated array data ({len(data):,} of {nbytes:,} bytes)")
    order = "F" if fortran_order else "C"
    return np.frombuffer(data, dtype).reshape(shape, order=order)


def read_npz(
    source: NpzSource,
    wanted: Collection[str],
    *,
    check_shape: Callable[[tuple[int, ...]], object],
    max_total_bytes: int,
    max_total_bytes_name: str = "max_total_bytes",
    string_keys: Collection[str] = (),
    error: type[Exception] = ValueError,
    origin: str | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Reads the `wanted` arrays of an untrusted `.npz`; returns them and all its member names.

    Args:
      source: the archive: its path, its bytes, or a seekable binary file object.
      wanted: member names (without `.npy`) to read; others are left unread.
      check_shape: called with each wanted member's declared shape before anything is
        allocated; raises ValueError to refuse it.
      max_total_bytes: cap on the bytes of all arrays read.
      max_total_bytes_name: how the error message names that cap (the setting to change).
      string_keys: members that may hold a unicode scalar (at most `MAX_STRING_CHARS`).
      error: the exception type raised (its message names the file).
      origin: how messages name the archive (default: the path, or "npz bytes").

    Returns:
      (name -> read-only array, names of every `.npy` member).

    Raises:
      `error`: if the file is not a zip archive, a member is refused, or it is corrupt.
    """
    path = origin or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "npz bytes")
    magic, archive_source = _open_npz(source)
    if magic != ZIP_MAGIC:
        raise error(f"{path}: not an .npz archive (no zip signature; corrupt?)")
    arrays: dict[str, np.ndarray] = {}
    budget = max_total_bytes
    budget_text = f"{max_total_bytes:,} bytes ({max_total_bytes_name})"
    try:
        with zipfile.ZipFile(archive_source) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".npy")]
            names = [m.filename[: -len(".npy")] for m in members]
            for name, member in zip(names, members, strict=True):
                if name in wanted:
                    arrays[name] = _read_member(
                        archive,
                        member,
                        name,
                        path,
                        budget,
                        budget_text,
                        check_shape,
                        string_keys,
                        error,
                    )
                    budget -= arrays[name].nbytes
    except error:
        raise
    except Exception as e:
        raise error(
            f"{path}: not a readable .npz (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    return arrays, names
