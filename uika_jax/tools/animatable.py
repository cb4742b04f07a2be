"""The animatable package: an avatar with everything another engine needs to drive it.

`uika export --animatable DIR` writes `DIR/avatar_animatable.npz` and `DIR/README.txt`.
The npz holds each Gaussian's canonical attributes and the head model's skinning data
interpolated at its anchor, plus the skeleton, so that another engine reproduces
`uika drive` (`uika_jax.models.avatar.drive`) from it alone with the formulas of
`README_TEXT` (the README). Those formulas are what `uika_jax.head.anchors.deform_anchors`
and `uika_jax.head.lbs` compute; the joint regressor is contracted with the template and
blendshapes in advance (exact, since the joints are linear in them), so that no mesh is
needed.

When the head model is FLAME, the package holds FLAME-derived data under FLAME's
licence; `flame_notice` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from uika_jax.head.anchors import anchor_attributes
from uika_jax.head.model import FLAME_JOINT_NAMES, HeadModel
from uika_jax.safe_files import atomic_write, write_npz
from uika_jax.tools.avatar_file import Avatar

FORMAT, VERSION = "uika-animatable", 1
PACKAGE_NAME = "avatar_animatable.npz"
README_NAME = "README.txt"

ROTATION_CONVENTION = (
    "pose rows are axis-angle vectors (radians; Rodrigues), one per joint in the order of "
    "joint_names; rotation matrices act on column vectors; quaternions are wxyz (Hamilton); "
    "a joint's world transform is its parent's times its local one"
)

README_TEXT = """\
Animatable avatar ({num_gaussians} Gaussians, {num_joints} joints), written by `uika export`
Head model: {fingerprint}
{licence}
The file {package} (NumPy .npz, no pickles; load with numpy.load) holds, for K Gaussians,
J joints, S identity and E expression components:

  canonical_means      (K, 3)       canonical centre mu = anchor position + offset
  anchor_positions     (K, 3)       the anchor on the template surface (template position,
  offsets              (K, 3)       barycentrically interpolated) and the predicted offset
  quats                (K, 4)       canonical rotation q0, wxyz
  log_scales           (K, 3)       log of the scales (unchanged by driving)
  opacity_logits       (K,)         opacity = sigmoid(opacity_logit)
  colors               (K, 3)       RGB in [0, 1]
  lbs_weights          (K, J)       skinning weights W
  shapedirs            (K, 3, S)    identity blendshapes B_s
  exprdirs             (K, 3, E)    expression blendshapes B_e
  posedirs             (K, 3, 9(J-1)) pose correctives B_p
  joints_template      (J, 3)       rest joints of the template, J_T
  joint_shapedirs      (J, 3, S)    joint displacement per identity component, D_s
  joint_exprdirs       (J, 3, E)    joint displacement per expression component, D_e
  parents              (J,)         parent joint (-1: the root); parents precede children
  joint_names          (J,)         {joint_names}
  rotation_convention  str          {rotation_convention}

Per-Gaussian arrays are the head model's per-vertex arrays interpolated with the
barycentric weights of the Gaussian's anchor triangle. Driving parameters of a frame:
identity beta (S' <= S; `uika drive` uses beta = 0), expression psi (E' <= E; the
leading components), pose theta (J, 3) and translation t (3,). Then, with the leading
S' / E' columns of the blendshapes:

  1. Joints:        J = J_T + D_s beta + D_e psi                          (J, 3)
  2. Rotations:     R_j = Rodrigues(theta_j) = I + sin(a)/a K + (1 - cos a)/a^2 K^2,
                    a = |theta_j|, K = the cross-product matrix of theta_j
  3. Kinematic chain (3x4 affine [rotation | translation]):
                    G_root = [R_root | J_root]
                    G_j    = G_parent(j) [R_j | J_j - J_parent(j)]
                    A_j    = [rot(G_j) | trans(G_j) - rot(G_j) J_j]   (skinning transform)
  4. Pose feature:  f = concat over j = 1..J-1 of (R_j - I) flattened row-major  (9(J-1),)
  5. Shaped point:  p_k = mu_k + B_s,k beta + B_e,k psi + B_p,k f
  6. Skinning:      T_k = sum_j W_kj A_j                                  (3x4)
                    x_k = rot(T_k) p_k + trans(T_k) + t                   (posed centre)
  7. Rotation:      R_k = the rotation factor of the polar decomposition of rot(T_k)
                    (U V^T of its SVD; we iterate X <- (X + X^-T)/2 eight times)
                    q_k = quat(R_k) * q0_k (Hamilton product, wxyz; q and -q are the
                    same rotation)
  Scales, opacity and colour do not change with the pose.

Render the posed Gaussians (x_k, q_k, exp(log_scales), sigmoid(opacity_logits), colors)
with any 3D Gaussian splatting rasterizer (OpenCV camera convention).
"""

FLAME_LICENCE = (
    "These are FLAME-derived data (blendshapes, pose correctives, skinning weights and joints "
    "interpolated from the FLAME model {fingerprint}), subject to the FLAME model licence "
    "(https://flame.is.tue.mpg.de/modellicense.html): use and share them only as that "
    "licence allows."
)


def is_flame(head: HeadModel) -> bool:
    """Whether the head model is FLAME (its fingerprint's source starts with "flame")."""
    return head.fingerprint.source.lower().startswith("flame")


def flame_notice(head: HeadModel) -> str | None:
    """The licence notice for FLAME-derived data, or None for another head model."""
    return FLAME_LICENCE.format(fingerprint=head.fingerprint) if is_flame(head) else None


def joint_names(head: HeadModel) -> tuple[str, ...]:
    """FLAME's joint names when the model has FLAME's 5 joints, else joint_0, joint_1, ..."""
    if head.num_joints == len(FLAME_JOINT_NAMES):
        return FLAME_JOINT_NAMES
    return tuple(f"joint_{j}" for j in range(head.num_joints))


def animatable_arrays(avatar: Avatar, head: HeadModel) -> dict[str, np.ndarray]:
    """The package's arrays (README_TEXT lists them); `avatar.check_head(head)` first."""
    attributes = anchor_attributes(head, avatar.anchors)
    regressor = np.asarray(head.j_regressor, np.float64)

    def regress(per_vertex: np.ndarray) -> np.ndarray:
        return np.tensordot(regressor, np.asarray(per_vertex, np.float64), axes=1).astype(
            np.float32
        )

    anchor_positions = np.asarray(avatar.anchors.positions, np.float32)
    return {
        "format": np.asarray(FORMAT),
        "version": np.asarray(VERSION, np.int32),
        "fingerprint": np.asarray(str(head.fingerprint)),
        "canonical_means": anchor_positions + avatar.offsets,
        "anchor_positions": anchor_positions,
        "offsets": avatar.offsets,
        "quats": avatar.quats,
        "log_scales": avatar.log_scales,
        "opacity_logits": avatar.opacity_logits,
        "colors": avatar.colors,
        "lbs_weights": attributes["lbs_weights"].astype(np.float32),
        "shapedirs": attributes["shapedirs"].astype(np.float32),
        "exprdirs": attributes["exprdirs"].astype(np.float32),
        "posedirs": attributes["posedirs"].astype(np.float32),
        "joints_template": regress(head.v_template),
        "joint_shapedirs": regress(head.shapedirs),
        "joint_exprdirs": regress(head.exprdirs),
        "parents": np.asarray(head.parents, np.int32),
        "joint_names": np.asarray(joint_names(head)),
        "rotation_convention": np.asarray(ROTATION_CONVENTION),
    }


def readme_text(avatar: Avatar, head: HeadModel) -> str:
    """The README.txt of the package: contents, licence and the driving formulas."""
    notice = flame_notice(head)
    return README_TEXT.format(
        num_gaussians=avatar.num_gaussians,
        num_joints=head.num_joints,
        fingerprint=head.fingerprint,
        licence=f"\nLICENCE: {notice}\n" if notice else "",
        package=PACKAGE_NAME,
        joint_names=", ".join(joint_names(head)),
        rotation_convention=ROTATION_CONVENTION,
    )


def write_animatable(directory: str | os.PathLike, avatar: Avatar, head: HeadModel) -> Path:
    """Writes the package (npz + README.txt) into `directory` (created if missing).

    Returns:
      The npz's path.

    Raises:
      AvatarFileError: if `head` is not the avatar's head model.
    """
    avatar.check_head(head)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    package = folder / PACKAGE_NAME
    write_npz(package, animatable_arrays(avatar, head))
    with atomic_write(folder / README_NAME) as file:
        file.write(readme_text(avatar, head).encode())
    return package
