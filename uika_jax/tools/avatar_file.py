"""The avatar file: one reconstructed head, as `uika reconstruct` writes it (`.npz`).

An avatar is K canonical Gaussians, each bound to an anchor on the head model's
template surface, plus what is needed to drive and re-render it:

    format, version       "uika-avatar", 1
    means                 (K, 3) float32  canonical centres (anchor position + offset)
    offsets               (K, 3) float32  the predicted displacement from the anchor
    quats                 (K, 4) float32  unit quaternions, wxyz
    log_scales            (K, 3) float32  log scales
    opacity_logits        (K,)   float32  opacity logits
    colors                (K, 3) float32  RGB in [0, 1]
    anchor_face_ids       (K,)   int32    the template triangle of each anchor
    anchor_barycentrics   (K, 3) float32  its barycentric weights
    anchor_texels         (K, 2) int32    its (row, column) in the UV map
    anchor_positions      (K, 3) float32  its template position
    anchor_uv_resolution  ()     int32    the UV map side the texels index
    fingerprint           str             the head model's fingerprint
    config_json           (n,)   uint8    the run's config, UTF-8 JSON (model, head, render)

Read back, an avatar file is untrusted input: `read_avatar` reads it through
`uika_jax.safe_files.read_npz` (no pickles; every header checked before anything is
allocated), then checks that every array has the documented dtype and a common K,
that the values are finite, the quaternions non-zero, the barycentrics sum to one and
the texels lie in the UV map. Whether the anchors' face ids fit a head model is
checked by `check_head`, which also compares the fingerprints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from uika_jax.head.anchors import Anchors
from uika_jax.head.io import load_head_model
from uika_jax.head.model import HeadModel
from uika_jax.models.gaussians import CanonicalGaussians
from uika_jax.safe_files import MAX_STRING_CHARS, read_npz, write_npz
from uika_jax.synthetic.head import synthetic_head_model

FORMAT, VERSION = "uika-avatar", 1

MAX_GAUSSIANS = 4_000_000
"""The most Gaussians an avatar file may declare (the paper's avatars have about 130K)."""

MAX_CONFIG_BYTES = 1 << 20
"""The largest config an avatar file may carry."""

MAX_CAPACITY = 1 << 28
"""The largest rasterizer capacity (`render.capacity`, `render.tile_cap`) a file may ask for."""

_FLOAT_FIELDS = {
    "means": (3,),
    "offsets": (3,),
    "quats": (4,),
    "log_scales": (3,),
    "opacity_logits": (),
    "colors": (3,),
    "anchor_barycentrics": (3,),
    "anchor_positions": (3,),
}
_INT_FIELDS = {"anchor_face_ids": (), "anchor_texels": (2,)}
_SCALARS = ("format", "version", "fingerprint", "anchor_uv_resolution")
_MEMBERS = (*_FLOAT_FIELDS, *_INT_FIELDS, *_SCALARS, "config_json")


class AvatarFileError(ValueError):
    """An avatar file that cannot be read or does not fit (names the file)."""


@dataclasses.dataclass(frozen=True)
class Avatar:
    """One avatar: canonical Gaussians, their anchors, the head model and the config.

    Attributes:
      means: (K, 3) canonical centres.
      offsets: (K, 3) displacement from each anchor.
      quats: (K, 4) unit quaternions, wxyz.
      log_scales: (K, 3) log scales.
      opacity_logits: (K,) opacity logits.
      colors: (K, 3) RGB in [0, 1].
      anchors: the K anchors the Gaussians are bound to.
      fingerprint: the head model's fingerprint (`str(HeadModel.fingerprint)`).
      config: the config the avatar came from (a JSON dict: model, head, render, ...).
    """

    means: np.ndarray
    offsets: np.ndarray
    quats: np.ndarray
    log_scales: np.ndarray
    opacity_logits: np.ndarray
    colors: np.ndarray
    anchors: Anchors
    fingerprint: str
    config: dict[str, Any]

    @property
    def num_gaussians(self) -> int:
        """K."""
        return int(self.means.shape[0])

    def canonical(self) -> CanonicalGaussians:
        """The Gaussians as a batch of one (`CanonicalGaussians` (1, K, ...)) for `drive`.

        An avatar file keeps only the fused colour, so `pred_colors` is that colour and
        `aggr_colors` / `fusion_weights` are zero.
        """
        batch = lambda x: jnp.asarray(x)[None]  # noqa: E731
        zeros = jnp.zeros((1, self.num_gaussians, 1), jnp.float32)
        return CanonicalGaussians(
            means=batch(self.means),
            quats=batch(self.quats),
            log_scales=batch(self.log_scales),
            opacity_logits=batch(self.opacity_logits),
            colors=batch(self.colors),
            offsets=batch(self.offsets),
            fusion_weights=zeros,
            pred_colors=batch(self.colors),
            aggr_colors=jnp.zeros_like(batch(self.colors)),
        )

    def head_model(self, head: HeadModel | None = None, origin: str = "the avatar") -> HeadModel:
        """`head`, else the head model the config names, checked against the avatar.

        The config's `head.model_path` names a FLAME file; empty: the built-in head.
        `check_head` compares the fingerprints.

        Raises:
          FileNotFoundError: if the config names a model file that is not there.
          AvatarFileError: if the head model is not the avatar's.
        """
        if head is None:
            names = self.config.get("head") or {}
            model_path = names.get("model_path")
            if not model_path:
                head = synthetic_head_model()
            elif not os.path.isfile(model_path):
                raise FileNotFoundError(
                    f"{model_path}: the head model {origin} names (config head.model_path) is "
                    "not there; pass --head-model PATH"
                )
            else:
                head = load_head_model(model_path, names.get("uv_path") or None)
        self.check_head(head, origin)
        return head

    def check_head(self, head: HeadModel, origin: str = "the avatar") -> None:
        """Refuses a head model other than the avatar's (fingerprint and anchor triangles).

        Raises:
          AvatarFileError: naming `origin` and both fingerprints, or the bad triangle.
        """
        if str(head.fingerprint) != self.fingerprint:
            raise AvatarFileError(
                f"{origin} was made with head model {self.fingerprint!r}, but the head model "
                f"given is {str(head.fingerprint)!r}: pass the head model the avatar's "
                "checkpoint was trained with (config head.model_path)"
            )
        faces = int(head.faces.shape[0])
        bad = np.flatnonzero(self.anchors.face_ids >= faces)
        if bad.size:
            raise AvatarFileError(
                f"{origin}: anchor {int(bad[0])} names triangle "
                f"{int(self.anchors.face_ids[bad[0]])}, the head model has {faces}"
            )


def avatar_from_gaussians(
    gaussians: Any, index: int, anchors: Anchors, fingerprint: str, config: dict[str, Any]
) -> Avatar:
    """The avatar of sample `index` of `UIKA`'s canonical Gaussians.

    Args:
      gaussians: `CanonicalGaussians` with arrays (B, K, ...).
      index: the sample.
      anchors: the anchors the model was run with.
      fingerprint: the head model's fingerprint string.
      config: the run's config as a JSON dict.
    """

    def pick(x: Any) -> np.ndarray:
        return np.asarray(x[index], np.float32)

    return Avatar(
        means=pick(gaussians.means),
        offsets=pick(gaussians.offsets),
        quats=pick(gaussians.quats),
        log_scales=pick(gaussians.log_scales),
        opacity_logits=pick(gaussians.opacity_logits),
        colors=pick(gaussians.colors),
        anchors=numpy_anchors(anchors),
        fingerprint=fingerprint,
        config=config,
    )


def numpy_anchors(anchors: Anchors) -> Anchors:
    """The anchors with NumPy arrays of the file's dtypes."""
    return Anchors(
        face_ids=np.asarray(anchors.face_ids, np.int32),
        barycentrics=np.asarray(anchors.barycentrics, np.float32),
        texels=np.asarray(anchors.texels, np.int32),
        positions=np.asarray(anchors.positions, np.float32),
        uv_resolution=int(anchors.uv_resolution),
    )


def write_avatar(path: str | os.PathLike, avatar: Avatar) -> None:
    """Writes `avatar` to `path` atomically (a temporary file renamed over it)."""
    _validate(avatar, str(path))
    config_bytes = json.dumps(avatar.config, sort_keys=True).encode()
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AvatarFileError(f"{path}: the config is {len(config_bytes)} bytes")
    if len(avatar.fingerprint) > MAX_STRING_CHARS:
        raise AvatarFileError(f"{path}: the fingerprint is {len(avatar.fingerprint)} characters")
    a = avatar.anchors
    write_npz(
        path,
        {
            "format": np.asarray(FORMAT),
            "version": np.asarray(VERSION, np.int32),
            "means": avatar.means,
            "offsets": avatar.offsets,
            "quats": avatar.quats,
            "log_scales": avatar.log_scales,
            "opacity_logits": avatar.opacity_logits,
            "colors": avatar.colors,
            "anchor_face_ids": a.face_ids,
            "anchor_barycentrics": a.barycentrics,
            "anchor_texels": a.texels,
            "anchor_positions": a.positions,
            "anchor_uv_resolution": np.asarray(a.uv_resolution, np.int32),
            "fingerprint": np.asarray(avatar.fingerprint),
            "config_json": np.frombuffer(config_bytes, np.uint8),
        },
    )


def _check_declared_shape(name: str, shape: tuple[int, ...]) -> None:
    """Refuses a declared shape before its data is read."""
    if name in _SCALARS:
        if shape != ():
            raise ValueError(f"{name} must be a scalar, it declares shape {shape}")
        return
    if name == "config_json":
        if len(shape) != 1 or shape[0] > MAX_CONFIG_BYTES:
            raise ValueError(f"config_json declares shape {shape} (at most {MAX_CONFIG_BYTES})")
        return
    tail = {**_FLOAT_FIELDS, **_INT_FIELDS}[name]
    if len(shape) != 1 + len(tail) or tuple(shape[1:]) != tail:
        raise ValueError(f"{name} must be (K, {', '.join(map(str, tail)) or ''}), got {shape}")
    if not 1 <= shape[0] <= MAX_GAUSSIANS:
        raise ValueError(f"{name} declares {shape[0]} Gaussians (1 to {MAX_GAUSSIANS:,})")


def read_avatar(path: str | os.PathLike) -> Avatar:
    """Reads and validates an avatar file (module docstring).

    Raises:
      FileNotFoundError: if there is no such file.
      AvatarFileError: naming the file and what is wrong with it.
    """
    origin = os.fspath(path)
    if not os.path.isfile(origin):
        raise FileNotFoundError(f"{origin}: no such avatar file")
    current: list[str] = []

    def check_shape(shape: tuple[int, ...]) -> None:
        _check_declared_shape(current[0], shape)

    arrays: dict[str, np.ndarray] = {}
    per_member_budget = MAX_GAUSSIANS * 4 * 4 + MAX_CONFIG_BYTES
    for name in _MEMBERS:
        current[:] = [name]
        got, _ = read_npz(
            path,
            [name],
            check_shape=check_shape,
            max_total_bytes=per_member_budget,
            string_keys=("format", "fingerprint"),
            error=AvatarFileError,
        )
        if name not in got:
            raise AvatarFileError(f"{origin}: not an avatar file (no member {name!r})")
        arrays[name] = got[name]
    for name in ("version", "anchor_uv_resolution"):
        if arrays[name].dtype.kind not in "iu":
            raise AvatarFileError(f"{origin}: {name} is {arrays[name].dtype}, not integer")
    if str(arrays["format"]) != FORMAT or int(arrays["version"]) != VERSION:
        raise AvatarFileError(
            f"{origin}: format {str(arrays['format'])!r} version {int(arrays['version'])}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    try:
        config = json.loads(bytes(arrays["config_json"]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AvatarFileError(f"{origin}: config_json is not UTF-8 JSON ({error})") from error
    if not isinstance(config, dict):
        raise AvatarFileError(f"{origin}: config_json is not a JSON object")
    _check_config(config, origin)
    for name in _FLOAT_FIELDS:
        if arrays[name].dtype.kind != "f":
            raise AvatarFileError(f"{origin}: {name} is {arrays[name].dtype}, not float")
    for name in _INT_FIELDS:
        if arrays[name].dtype.kind not in "iu":
            raise AvatarFileError(f"{origin}: {name} is {arrays[name].dtype}, not integer")
    for name in _INT_FIELDS:  # before narrowing to int32, which would wrap
        values = arrays[name]
        if values.size and (values.min() < -1 or values.max() > np.iinfo(np.int32).max):
            what = name.replace("_", " ")
            raise AvatarFileError(f"{origin}: {what} hold values outside [-1, 2^31)")
    avatar = Avatar(
        means=np.asarray(arrays["means"], np.float32),
        offsets=np.asarray(arrays["offsets"], np.float32),
        quats=np.asarray(arrays["quats"], np.float32),
        log_scales=np.asarray(arrays["log_scales"], np.float32),
        opacity_logits=np.asarray(arrays["opacity_logits"], np.float32),
        colors=np.asarray(arrays["colors"], np.float32),
        anchors=Anchors(
            face_ids=np.asarray(arrays["anchor_face_ids"], np.int64).astype(np.int32),
            barycentrics=np.asarray(arrays["anchor_barycentrics"], np.float32),
            texels=np.asarray(arrays["anchor_texels"], np.int64).astype(np.int32),
            positions=np.asarray(arrays["anchor_positions"], np.float32),
            uv_resolution=int(arrays["anchor_uv_resolution"]),
        ),
        fingerprint=str(arrays["fingerprint"]),
        config=config,
    )
    _validate(avatar, origin)
    return avatar


def _check_config(config: dict[str, Any], origin: str) -> None:
    """The `head` and `render` settings the tools read: types and bounds."""

    def block(name: str) -> dict[str, Any]:
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise AvatarFileError(f"{origin}: config {name} is not a JSON object")
        return value

    def fail(key: str, value: Any, want: str) -> None:
        raise AvatarFileError(f"{origin}: config {key}={value!r}: expected {want}")

    for key in ("model_path", "uv_path"):
        value = block("head").get(key)
        if value is not None and not isinstance(value, str):
            fail(f"head.{key}", value, "a path or null")
    render = block("render")
    for key in ("capacity", "tile_cap"):
        value = render.get(key)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CAPACITY
        ):
            fail(f"render.{key}", value, f"null or an integer in [1, {MAX_CAPACITY}]")
    headroom = render.get("capacity_headroom")
    if headroom is not None and not (
        isinstance(headroom, (int, float))
        and not isinstance(headroom, bool)
        and 1 <= headroom <= 16
    ):
        fail("render.capacity_headroom", headroom, "null or a number in [1, 16]")
    backend = render.get("backend")
    if backend is not None and not (isinstance(backend, str) and len(backend) <= 64):
        fail("render.backend", backend, "null or a backend name")
    background = render.get("background")
    if background is not None and not (
        isinstance(background, list)
        and len(background) == 3
        and all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in background)
    ):
        fail("render.background", background, "null or three numbers in [0, 1]")


def _validate(avatar: Avatar, origin: str) -> None:
    """Common K, finite values, unit-able quaternions, barycentrics, texels in range."""
    a = avatar.anchors
    fields = {
        **{name: getattr(avatar, name) for name in _FLOAT_FIELDS if not name.startswith("anchor")},
        "anchor_barycentrics": a.barycentrics,
        "anchor_positions": a.positions,
        "anchor_face_ids": a.face_ids,
        "anchor_texels": a.texels,
    }
    k = avatar.means.shape[0]
    for name, array in fields.items():
        tail = {**_FLOAT_FIELDS, **_INT_FIELDS}[name]
        if array.shape != (k, *tail):
            raise AvatarFileError(
                f"{origin}: {name} has shape {array.shape}, expected {(k, *tail)}"
            )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise AvatarFileError(f"{origin}: {name} holds NaN or infinite values")
    if np.any(np.linalg.norm(avatar.quats, axis=-1) < 1e-8):
        raise AvatarFileError(f"{origin}: a quaternion is zero")
    if np.any(a.face_ids < 0):
        raise AvatarFileError(f"{origin}: negative anchor face ids")
    if np.any(np.abs(a.barycentrics.sum(-1) - 1.0) > 1e-3) or np.any(a.barycentrics < -1e-4):
        raise AvatarFileError(f"{origin}: anchor barycentrics do not sum to one")
    side = a.uv_resolution
    made_from_uv = a.texels[:, 0] >= 0
    texels = a.texels[made_from_uv]
    if (
        side < 0
        or np.any(texels < 0)
        or np.any(texels >= side)
        or np.any(a.texels[~made_from_uv] != -1)
    ):
        raise AvatarFileError(f"{origin}: anchor texels outside the {side}^2 UV map")
