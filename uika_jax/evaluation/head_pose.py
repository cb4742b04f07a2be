"""Head pose from 68 detected landmarks (APD): a landmark embedding on the head model and PnP.

APD compares the head pose of a prediction with that of its ground truth. Each pose
is solved by PnP (OpenCV's `solvePnP`: EPnP, refined by Levenberg-Marquardt) from the
68 dlib landmarks against the head model's corresponding 3D points, and the two are
compared as the angle of their relative rotation, in degrees. Both images share one
camera, so the camera's own rotation cancels.

The 3D points come from a *landmark embedding*: for each iBUG-68 landmark a mesh face
and barycentric coordinates, evaluated on the model's template (`landmark_points`).

* FLAME: the user's embedding file (`read_landmark_embedding`), an `.npz` holding one
  of the layouts of FLAME / DECA: `full_lmk_faces_idx` + `full_lmk_bary_coords`
  (68 points, optionally with a leading axis of 1); `static_lmk_faces_idx` +
  `static_lmk_bary_coords` (iBUG points 17..67) with `dynamic_lmk_faces_idx` +
  `dynamic_lmk_bary_coords` (per-yaw contours 0..16, whose frontal row 0 is used);
  or `lmk_face_idx` + `lmk_b_coords` with 68 points. DECA's `landmark_embedding.npy`
  is a pickled dict, which is never unpickled here: convert your own trusted copy
  once (`CONVERT_HINT`).
* The built-in synthetic head names only a few landmarks (mouth, its corners, the eye
  centres, the brow height: `uika_jax.synthetic.deform.Landmarks`), too few for the
  iBUG-68 layout. Its embedding is therefore measured (`synthetic_landmark_embedding`):
  the neutral template is rendered facing the camera, dlib's 68 landmarks are detected,
  and each landmark's camera ray is intersected with the visible triangle under it.
  Every point is thus where dlib places that landmark on a frontal view of this head;
  the jaw contour (0..16) is a silhouette landmark that moves over the surface as the
  head turns, so only the 51 inner points (`POSE_LANDMARKS`, as FLAME's static
  embedding) enter PnP by default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from uika_jax.evaluation.face_models import detection_image
from uika_jax.head.model import HeadModel
from uika_jax.head.uv_raster import corner_image_uv
from uika_jax.render.mesh_render import render_mesh
from uika_jax.safe_files import NPY_MAGIC, read_npz
from uika_jax.synthetic.albedo import synthetic_albedo
from uika_jax.synthetic.views import BACKGROUND, identity_camera

NUM_LANDMARKS = 68
"""iBUG 300-W landmark count."""

CONTOUR = 17
"""iBUG points 0..16 are the jaw contour."""

POSE_LANDMARKS = tuple(range(CONTOUR, NUM_LANDMARKS))
"""Landmarks used for PnP: the 51 points that do not slide along the silhouette."""

MAX_EMBEDDING_BYTES = 16 * 2**20
"""Cap on the arrays read from an embedding file."""

CONVERT_HINT = (
    "python -c \"import numpy as np; np.savez('landmark_embedding.npz', "
    "**np.load('landmark_embedding.npy', allow_pickle=True).item())\""
)
"""Converts DECA's pickled `landmark_embedding.npy` (run it only on a copy you trust)."""

_LAYOUTS = (
    ("full_lmk_faces_idx", "full_lmk_bary_coords"),
    ("lmk_face_idx", "lmk_b_coords"),
)
_STATIC = ("static_lmk_faces_idx", "static_lmk_bary_coords")
_DYNAMIC = ("dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")


@dataclasses.dataclass(frozen=True)
class LandmarkEmbedding:
    """iBUG-68 landmarks embedded on a mesh.

    Attributes:
      face_ids: (68,) int64 mesh face of each landmark.
      barycentrics: (68, 3) float64 weights of the face's corners (rows sum to 1).
      source: where it came from (a file name, or how it was derived), for reports.
    """

    face_ids: np.ndarray
    barycentrics: np.ndarray
    source: str

    def points(self, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """The 68 landmark positions (68, 3) on a mesh of vertices (V, 3) and faces (F, 3)."""
        faces = np.asarray(faces)
        if self.face_ids.max() >= len(faces):
            raise ValueError(
                f"landmark embedding {self.source} names face {self.face_ids.max()}, "
                f"but the mesh has {len(faces)} faces (another head model's file?)"
            )
        corners = np.asarray(vertices, np.float64)[faces[self.face_ids]]
        return np.einsum("lc,lcd->ld", self.barycentrics, corners)


def _checked_embedding(face_ids: np.ndarray, barycentrics: np.ndarray, source: str):
    face_ids = np.asarray(face_ids).reshape(-1)
    barycentrics = np.asarray(barycentrics, np.float64).reshape(-1, 3)
    if face_ids.shape != (NUM_LANDMARKS,) or barycentrics.shape != (NUM_LANDMARKS, 3):
        raise ValueError(
            f"{source}: a landmark embedding needs {NUM_LANDMARKS} face ids and "
            f"({NUM_LANDMARKS}, 3) barycentrics, got {face_ids.shape} and {barycentrics.shape}"
        )
    if not np.issubdtype(face_ids.dtype, np.integer) and not np.all(face_ids == np.round(face_ids)):
        raise ValueError(f"{source}: face ids are not integers")
    face_ids = face_ids.astype(np.int64)
    if face_ids.min() < 0:
        raise ValueError(f"{source}: negative face id {face_ids.min()}")
    if not np.all(np.isfinite(barycentrics)) or np.abs(barycentrics.sum(1) - 1.0).max() > 1e-3:
        raise ValueError(f"{source}: barycentric rows must be finite and sum to 1")
    return LandmarkEmbedding(face_ids, barycentrics, source)


def read_landmark_embedding(path: str | Path) -> LandmarkEmbedding:
    """Reads a FLAME / DECA landmark embedding `.npz` as untrusted input (module docstring).

    Args:
      path: the `.npz` file.

    Returns:
      The 68-point embedding (contour from the frontal row of a dynamic layout).

    Raises:
      ValueError: if the file is a pickled `.npy`, not an npz, or holds no usable layout.
    """
    path = Path(path)
    with path.open("rb") as f:
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise ValueError(
                f"{path}: a .npy file (DECA's landmark_embedding.npy is a pickled dict, which "
                f"is never unpickled here); convert a copy you trust once with: {CONVERT_HINT}"
            )

    def check_shape(shape: tuple[int, ...]) -> None:
        if len(shape) > 3 or int(np.prod(shape)) > 4 * 79 * NUM_LANDMARKS:
            raise ValueError(f"shape {shape} is not a landmark embedding's")

    keys = {k for layout in (*_LAYOUTS, _STATIC, _DYNAMIC) for k in layout}
    arrays, names = read_npz(
        path, keys, check_shape=check_shape, max_total_bytes=MAX_EMBEDDING_BYTES, origin=str(path)
    )
    for ids_key, bary_key in _LAYOUTS:
        if ids_key in arrays and bary_key in arrays:
            return _checked_embedding(arrays[ids_key], arrays[bary_key], f"{path.name}:{ids_key}")
    if all(k in arrays for k in (*_STATIC, *_DYNAMIC)):
        dyn_ids, dyn_bary = arrays[_DYNAMIC[0]], arrays[_DYNAMIC[1]]
        if (
            dyn_ids.ndim != 2
            or dyn_ids.shape[1] != CONTOUR
            or dyn_bary.shape
            != (
                *dyn_ids.shape,
                3,
            )
        ):
            raise ValueError(
                f"{path}: dynamic contour must be (yaws, {CONTOUR}) ids and (yaws, {CONTOUR}, 3) "
                f"barycentrics, got {dyn_ids.shape} and {dyn_bary.shape}"
            )
        face_ids = np.concatenate([dyn_ids[0], np.asarray(arrays[_STATIC[0]]).reshape(-1)])
        bary = np.concatenate([dyn_bary[0], np.asarray(arrays[_STATIC[1]]).reshape(-1, 3)])
        return _checked_embedding(face_ids, bary, f"{path.name}:static+dynamic")
    raise ValueError(
        f"{path}: no landmark embedding layout found (members {sorted(names)}); expected "
        f"{' or '.join('+'.join(layout) for layout in _LAYOUTS)}, or static + dynamic"
    )


def landmark_points(embedding: LandmarkEmbedding, model: HeadModel) -> np.ndarray:
    """The 68 landmarks (68, 3) on a head model's neutral template (PnP's object points)."""
    return embedding.points(model.v_template, model.faces)


def _ray_barycentrics(corners: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Barycentrics (3,) where the camera ray through the origin meets a triangle's plane."""
    a, b, c = corners
    normal = np.cross(b - a, c - a)
    hit = direction * (normal @ a) / (normal @ direction)
    total = normal @ normal
    weights = (
        np.array([np.cross(c - b, hit - b) @ normal, np.cross(a - c, hit - c) @ normal, 0.0])
        / total
    )
    weights[2] = 1.0 - weights[0] - weights[1]
    weights = np.clip(weights, 0.0, None)
    return weights / weights.sum()


def synthetic_landmark_embedding(
    model: HeadModel, face_models, size: int = 256, seed: int = 0
) -> LandmarkEmbedding:
    """Measures the iBUG-68 embedding of the built-in head (module docstring).

    Args:
      model: the synthetic head model (`synthetic_head_model()`).
      face_models: a `DlibFaceModels`.
      size: render side in pixels (detection runs on it upsampled twice).
      seed: the albedo seed painted on the template.

    Returns:
      The embedding on `model`'s faces.

    Raises:
      RuntimeError: if no face, or a landmark with no mesh nearby, is found.
    """
    shape = np.zeros(model.num_shape, np.float32)
    viewmat, K = identity_camera(model, shape, size)
    render = render_mesh(
        model.v_template,
        model.faces,
        viewmat,
        K,
        size,
        size,
        corner_uv=corner_image_uv(model),
        texture=synthetic_albedo(seed, 256),
        background=BACKGROUND,
    )
    image, scale = detection_image(np.asarray(render.image), 2 * size)
    detected = face_models.landmarks(image)
    if detected is None:
        raise RuntimeError("no face detected on the synthetic head's frontal render")
    pixels = (detected + 0.5) / scale
    triangle_id = np.asarray(render.triangle_id)
    covered = np.argwhere(triangle_id >= 0)
    rotation, translation = np.asarray(viewmat, np.float64)[:3, :3], np.asarray(viewmat)[:3, 3]
    corners_cam = np.asarray(model.v_template, np.float64) @ rotation.T + translation
    faces = np.asarray(model.faces)
    inverse_k = np.linalg.inv(np.asarray(K, np.float64))
    face_ids, barycentrics = [], []
    for x, y in pixels:
        row, column = int(np.floor(y)), int(np.floor(x))
        if not (0 <= row < size and 0 <= column < size) or triangle_id[row, column] < 0:
            nearest = covered[np.argmin(np.square(covered - [y, x]).sum(1))]
            if np.hypot(*(nearest + 0.5 - [y, x])) > 4.0:
                raise RuntimeError(f"landmark at ({x:.1f}, {y:.1f}) px lies off the mesh")
            row, column = nearest
            x, y = column + 0.5, row + 0.5
        face = int(triangle_id[row, column])
        face_ids.append(face)
        direction = inverse_k @ np.array([x, y, 1.0])
        barycentrics.append(_ray_barycentrics(corners_cam[faces[face]], direction))
    return _checked_embedding(
        np.array(face_ids), np.array(barycentrics), "synthetic head (dlib on a frontal render)"
    )


def solve_head_pose(
    landmarks: np.ndarray,
    points: np.ndarray,
    K: np.ndarray,
    indices: tuple[int, ...] = POSE_LANDMARKS,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Solves the head's pose in the camera by PnP (EPnP, then Levenberg-Marquardt).

    Args:
      landmarks: (68, 2) detected image positions (pixel centres at j + 0.5).
      points: (68, 3) the model's corresponding 3D landmarks (`landmark_points`).
      K: (3, 3) intrinsics in the landmarks' pixel units.
      indices: which landmarks to use.

    Returns:
      (rotation (3, 3), translation (3,), RMS reprojection error in pixels): the
      model-to-camera transform.

    Raises:
      ValueError: on wrong shapes or non-finite input.
    """
    import cv2

    landmarks, points = np.asarray(landmarks, np.float64), np.asarray(points, np.float64)
    if landmarks.shape != (NUM_LANDMARKS, 2) or points.shape != (NUM_LANDMARKS, 3):
        raise ValueError(
            f"need (68, 2) landmarks and (68, 3) points, got {landmarks.shape}, {points.shape}"
        )
    if not (np.all(np.isfinite(landmarks)) and np.all(np.isfinite(points))):
        raise ValueError("landmarks or points hold NaN or infinite values")
    chosen = list(indices)
    image_points, object_points = landmarks[chosen], points[chosen]
    camera = np.asarray(K, np.float64)
    _, rvec, tvec = cv2.solvePnP(object_points, image_points, camera, None, flags=cv2.SOLVEPNP_EPNP)
    _, rvec, tvec = cv2.solvePnP(
        object_points, image_points, camera, None, rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE
    )
    projected, _ = cv2.projectPoints(object_points, rvec, tvec, camera, None)
    rms = float(np.sqrt(np.mean(np.square(projected[:, 0] - image_points).sum(1))))
    return cv2.Rodrigues(rvec)[0], tvec[:, 0], rms


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (degrees) of the relative rotation a b^T between two (3, 3) rotations."""
    cosine = 0.5 * (np.trace(np.asarray(a) @ np.asarray(b).T) - 1.0)
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
