"""The FLAME-format head model: the arrays every head-related stage reads.

A `HeadModel` holds one parametric head in the layout of the official FLAME
files (template, blendshapes, pose correctives, joint regressor, skinning
weights, kinematic tree), plus an optional UV layout. It is a JAX pytree: the
arrays are leaves (pass the model to jitted functions as an argument, never
close over it), the kinematic tree and the fingerprint are static metadata.

Shapes, with V vertices, F faces, J joints, T texture coordinates:

    v_template  (V, 3)         float32, metres, y up, the face looking along +z
    faces       (F, 3)         int32, counter-clockwise seen from outside, 3 distinct vertices
    shapedirs   (V, 3, S)      identity blendshapes
    exprdirs    (V, 3, E)      expression blendshapes
    posedirs    (V, 3, 9(J-1)) pose correctives, driven by (R_j - I) of joints 1..J-1
    j_regressor (J, V)         joints = j_regressor @ shaped vertices
    lbs_weights (V, J)         non-negative, rows sum to 1
    uv_coords   (T, 2) | None  texture coordinates (u, v), v pointing up
    uv_faces    (F, 3) | None  per-face-corner indices into uv_coords (seams)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import jax
import numpy as np

FLAME_JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")


@dataclasses.dataclass(frozen=True)
class ModelFingerprint:
    """Identifies a head model so that avatars and checkpoints refuse a mismatch.

    Attributes:
      source: which model family, e.g. "flame2020", "flame2023", "flame2023_open",
        "synthetic".
      version: a version string within the family (file name or generator version).
      digest: sha256 (hex, first 16 characters) over the model's arrays.
    """

    source: str
    version: str
    digest: str

    def __str__(self) -> str:
        return f"{self.source}:{self.version}:{self.digest}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadModel:
    """A FLAME-format head model (see the module docstring for shapes)."""

    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    exprdirs: np.ndarray
    posedirs: np.ndarray
    j_regressor: np.ndarray
    lbs_weights: np.ndarray
    uv_coords: np.ndarray | None = None
    uv_faces: np.ndarray | None = None
    parents: tuple[int, ...] = dataclasses.field(
        default=(-1, 0, 1, 1, 1), metadata={"static": True}
    )
    fingerprint: ModelFingerprint = dataclasses.field(
        default=ModelFingerprint("unknown", "0", "0"), metadata={"static": True}
    )

    @property
    def num_vertices(self) -> int:
        """Number of mesh vertices V."""
        return self.v_template.shape[0]

    @property
    def num_joints(self) -> int:
        """Number of skinning joints J."""
        return len(self.parents)

    @property
    def num_shape(self) -> int:
        """Number of identity blendshapes S the model holds."""
        return self.shapedirs.shape[-1]

    @property
    def num_expression(self) -> int:
        """Number of expression blendshapes E the model holds."""
        return self.exprdirs.shape[-1]

    @property
    def has_uv(self) -> bool:
        """Whether the model carries a UV layout."""
        return self.uv_coords is not None and self.uv_faces is not None

    def require_uv(self, what: str) -> None:
        """Raises a ValueError naming `what` if the model has no UV layout."""
        if not self.has_uv:
            raise ValueError(
                f"{what} needs a UV layout, but head model {self.fingerprint} has none: pass "
                "uv_path= (head_template.obj or FLAME_texture.npz) to load_head_model()."
            )


def array_digest(arrays: dict[str, np.ndarray]) -> str:
    """Returns a short sha256 over named arrays (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


_VERTEX_AXES = {
    "v_template": 0,
    "shapedirs": 0,
    "exprdirs": 0,
    "posedirs": 0,
    "j_regressor": 1,
    "lbs_weights": 0,
}
"""The axis of each per-vertex array that counts the vertices V."""

NEGATIVE_WEIGHT_TOLERANCE = 1e-6
"""lbs_weights below minus this are refused (weights must be non-negative)."""


def _vertex_count(model: HeadModel, origin: str) -> int:
    """The V most per-vertex arrays agree on; raises naming the arrays that disagree."""
    counts = {
        name: getattr(model, name).shape[axis]
        for name, axis in _VERTEX_AXES.items()
        if getattr(model, name).ndim > axis
    }
    if not counts:
        return -1
    V = collections.Counter(counts.values()).most_common(1)[0][0]  # ties: v_template's count
    outliers = [name for name, count in counts.items() if count != V]
    if outliers:
        agreeing = [name for name in counts if name not in outliers]
        raise ValueError(
            f"{origin}: "
            + ", ".join(
                f"{name} has {counts[name]} vertices (shape {getattr(model, name).shape})"
                for name in outliers
            )
            + f", while {', '.join(agreeing)} have {V}"
        )
    return V


def validate_head_model(model: HeadModel, origin: str) -> HeadModel:
    """Checks shapes, dtypes and values of a head model.

    The vertex count V is what most per-vertex arrays agree on, so an array that
    disagrees is the one named. Refused: mismatched shapes, NaN or infinite
    values (UV coordinates included), empty or out-of-range faces, faces that
    repeat a vertex, negative skinning weights or rows not summing to 1, and a
    kinematic tree that is not rooted and ordered (each parent before its child).

    Args:
      model: the model to check.
      origin: where it came from (a file path or "synthetic"), named in errors.

    Returns:
      The same model.

    Raises:
      ValueError: naming `origin` and the offending array.
    """
    V = _vertex_count(model, origin)
    J = len(model.parents)
    expected = {
        "v_template": (V, 3),
        "shapedirs": (V, 3, None),
        "exprdirs": (V, 3, None),
        "posedirs": (V, 3, 9 * (J - 1)),
        "j_regressor": (J, V),
        "lbs_weights": (V, J),
        "faces": (None, 3),
    }
    for name, shape in expected.items():
        a = getattr(model, name)
        if a.ndim != len(shape) or any(
            s is not None and s != d for s, d in zip(shape, a.shape, strict=False)
        ):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{origin}: {name} has shape {a.shape}, expected {want}")
        if name != "faces" and not np.all(np.isfinite(a)):
            raise ValueError(f"{origin}: {name} contains NaN or infinite values")
    if V <= 0:
        raise ValueError(f"{origin}: v_template has no vertices")
    if model.faces.size == 0:
        raise ValueError(f"{origin}: faces is empty")
    if model.faces.min() < 0 or model.faces.max() >= V:
        raise ValueError(f"{origin}: faces index outside [0, {V})")
    first, second, third = np.asarray(model.faces).T
    degenerate = np.flatnonzero((first == second) | (second == third) | (first == third))
    if degenerate.size:
        i = int(degenerate[0])
        raise ValueError(
            f"{origin}: face {i} is {model.faces[i].tolist()}, which repeats a vertex "
            f"({degenerate.size} of {len(model.faces)} faces do); a face needs three distinct "
            "vertices"
        )
    if model.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(model.parents[1:], 1)):
        raise ValueError(f"{origin}: kinematic tree {model.parents} is not a rooted, ordered tree")
    if model.lbs_weights.min() < -NEGATIVE_WEIGHT_TOLERANCE:
        raise ValueError(
            f"{origin}: lbs_weights has negative entries (min {model.lbs_weights.min():.3g}); "
            "skinning weights must be non-negative"
        )
    if not np.allclose(model.lbs_weights.sum(-1), 1.0, atol=1e-3):
        raise ValueError(f"{origin}: lbs_weights rows do not sum to 1")
    if (model.uv_coords is None) != (model.uv_faces is None):
        raise ValueError(f"{origin}: uv_coords and uv_faces must be given together")
    if model.has_uv:
        if model.uv_faces.shape != model.faces.shape:
            raise ValueError(
                f"{origin}: uv_faces has shape {model.uv_faces.shape}, "
                f"expected the faces' shape {model.faces.shape}"
            )
        if model.uv_coords.ndim != 2 or model.uv_coords.shape[1] != 2:
            raise ValueError(
                f"{origin}: uv_coords has shape {model.uv_coords.shape}, expected (T, 2)"
            )
        if not np.all(np.isfinite(model.uv_coords)):
            raise ValueError(f"{origin}: uv_coords contains NaN or infinite values")
        if model.uv_faces.min() < 0 or model.uv_faces.max() >= model.uv_coords.shape[0]:
            raise ValueError(f"{origin}: uv_faces index outside uv_coords")
    return model
