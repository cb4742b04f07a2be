"""Does an off-the-shelf face detector see faces in the synthetic dataset's near-frontal frames?

    python benchmarks/synthetic_faces.py --data DIR [--upsample 256] [--max-yaw 30]
    python benchmarks/synthetic_faces.py --identities 24 --size 128 [--frames 4]

Reads a dataset in the project's format (or generates one with `uika synth`'s
generator into a temporary folder), takes every frame whose face is turned at
most --max-yaw degrees from the camera (the head's forward axis, turned by the
frame's global and neck rotations, against the camera's from its viewmat: yaw
about the camera's vertical axis), upsamples it to
--upsample pixels (bicubic) and runs dlib's HOG frontal face detector
(`dlib-bin`, weights shipped with it; the ref extra). A detection counts only
if its box's centre lies inside the frame's foreground mask (a face found in
the background is a miss). Prints the detection rate per view and overall,
and per sequence kind.
"""

from __future__ import annotations

import argparse
import collections
import math
import tempfile

import numpy as np
from PIL import Image

from uika_jax.data.checks import iter_frames
from uika_jax.data.format import load_index
from uika_jax.data.reader import read_image, read_mask, read_sequence
from uika_jax.head.rotations import axis_angle_to_matrix


def face_yaw_deg(viewmat: np.ndarray, pose: np.ndarray) -> float:
    """Yaw of the face seen by a camera: 0 when the head looks straight into it.

    The face's forward axis (+z of the head model) turned by the global and neck
    rotations, in camera space (OpenCV: the camera looks along +z, so a face
    looking into the camera points along -z); yaw about the camera's vertical axis.
    """
    rotations = np.asarray(axis_angle_to_matrix(pose[:2]), np.float64)
    forward = rotations[0] @ rotations[1] @ np.array([0.0, 0.0, 1.0])
    x, _, z = viewmat[:3, :3] @ forward
    return math.degrees(math.atan2(x, -z))


def measure(root: str, upsample: int, max_yaw: float) -> None:
    import dlib

    detector = dlib.get_frontal_face_detector()
    index = load_index(root)
    entries = {(s.id, q.id): q for s in index.subjects for q in s.sequences}
    params = {key: read_sequence(root, index, key[0], q) for key, q in entries.items()}
    hits, totals = collections.Counter(), collections.Counter()
    for ref in iter_frames(index):
        entry = entries[(ref.subject, ref.sequence)]
        camera = entry.cameras.index(ref.camera)
        sequence = params[(ref.subject, ref.sequence)]
        yaw = face_yaw_deg(sequence.viewmats[camera], sequence.pose[ref.frame])
        if abs(yaw) > max_yaw:
            continue
        image = read_image(ref.path(root, "image", index.image_format), index.image_size)
        mask = read_mask(ref.path(root, "mask", index.image_format), index.image_size)
        big = np.asarray(Image.fromarray(image).resize((upsample, upsample), Image.BICUBIC))
        scale = index.image_size / upsample
        found = False
        for box in detector(big, 0):
            cx = int((box.left() + box.right()) / 2 * scale)
            cy = int((box.top() + box.bottom()) / 2 * scale)
            inside = 0 <= cx < index.image_size and 0 <= cy < index.image_size
            found |= inside and mask[cy, cx] > 127
        kind = ref.sequence.split("_", 1)[-1]
        for key in (f"view {ref.camera}", f"kind {kind}", "all"):
            totals[key] += 1
            hits[key] += found
    print(f"dlib HOG frontal detector, frames with |yaw| <= {max_yaw} deg, upsampled to {upsample}")
    print(f"{'group':<24} {'frames':>7} {'found':>7} {'rate':>7}")
    for key in sorted(totals, key=lambda k: (k == "all", k)):
        print(f"{key:<24} {totals[key]:>7} {hits[key]:>7} {hits[key] / totals[key]:>7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a dataset folder; else one is generated")
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upsample", type=int, default=256)
    parser.add_argument("--max-yaw", type=float, default=30.0)
    args = parser.parse_args()
    if args.data:
        measure(args.data, args.upsample, args.max_yaw)
        return
    from uika_jax.synthetic.dataset import SynthConfig, generate

    config = SynthConfig(
        identities=args.identities, frames=args.frames, size=args.size, seed=args.seed
    )
    with tempfile.TemporaryDirectory() as folder:
        generate(f"{folder}/synth", config)
        measure(f"{folder}/synth", args.upsample, args.max_yaw)


if __name__ == "__main__":
    main()
