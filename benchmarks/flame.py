"""FLAME forward time at FLAME size, ours (JAX, jitted) beside smplx's LBS (PyTorch).

    python benchmarks/flame.py [--batches 1,64] [--repeats 50] [--runs 6]

Both run on this machine's CPU in the same process, on the same random
FLAME-size model (5023 vertices, 9976 faces, 300 shape + 100 expression
components, 36 pose correctives, 5 joints) and the same inputs. smplx comes
from the `ref` extra (`pip install -e '.[ref]'`); `smplx.lbs.lbs` is the whole
of `smplx.FLAME.forward` except the landmark lookup, which needs FLAME files.
Each run times `--repeats` calls of each and keeps the median; the runs
alternate between the two, and the table prints the median over runs with the
spread (min-max) beside it, for the times and for the per-run speed-up.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from timing import median_ms, spread

from uika_jax.head.lbs import flame_forward
from uika_jax.head.model import HeadModel

NUM_VERTICES, NUM_FACES, NUM_SHAPE, NUM_EXPRESSION, NUM_JOINTS = 5023, 9976, 300, 100, 5


def flame_size_model(seed: int = 0) -> HeadModel:
    """A random model with the official FLAME file's array sizes."""
    rng = np.random.default_rng(seed)
    weights = rng.random((NUM_VERTICES, NUM_JOINTS)).astype(np.float32)
    regressor = rng.random((NUM_JOINTS, NUM_VERTICES)).astype(np.float32)
    dirs = rng.normal(scale=1e-3, size=(NUM_VERTICES, 3, NUM_SHAPE + NUM_EXPRESSION))
    return HeadModel(
        v_template=rng.normal(scale=0.1, size=(NUM_VERTICES, 3)).astype(np.float32),
        faces=rng.integers(0, NUM_VERTICES, (NUM_FACES, 3)).astype(np.int32),
        shapedirs=dirs[..., :NUM_SHAPE].astype(np.float32),
        exprdirs=dirs[..., NUM_SHAPE:].astype(np.float32),
        posedirs=rng.normal(scale=1e-3, size=(NUM_VERTICES, 3, 36)).astype(np.float32),
        j_regressor=regressor / regressor.sum(1, keepdims=True),
        lbs_weights=weights / weights.sum(1, keepdims=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", type=int, default=50, help="calls per run")
    parser.add_argument("--runs", type=int, default=6, help="runs per figure")
    args = parser.parse_args()

    import torch
    from smplx.lbs import lbs as smplx_lbs

    model = jax.device_put(flame_size_model())
    forward = jax.jit(jax.vmap(flame_forward, in_axes=(None, 0, 0, 0)))
    shapedirs = torch.tensor(np.concatenate([model.shapedirs, model.exprdirs], -1))
    posedirs = torch.tensor(np.asarray(model.posedirs).reshape(NUM_VERTICES * 3, -1).T.copy())
    torch_model = {
        "v_template": torch.tensor(np.asarray(model.v_template)),
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": torch.tensor(np.asarray(model.j_regressor)),
        "parents": torch.tensor(model.parents),
        "lbs_weights": torch.tensor(np.asarray(model.lbs_weights)),
    }

    print(f"device: {jax.devices()[0].device_kind}, torch threads: {torch.get_num_threads()}")
    print(f"{'batch':>6} | {'uika_jax ms':>22} | {'smplx ms':>22} | {'speed-up':>19}")
    print("-" * 80)
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(batch)
        betas = rng.normal(size=(batch, NUM_SHAPE + NUM_EXPRESSION)).astype(np.float32)
        pose = rng.normal(scale=0.3, size=(batch, NUM_JOINTS, 3)).astype(np.float32)
        jax_args = [jax.device_put(a) for a in (betas[:, :NUM_SHAPE], betas[:, NUM_SHAPE:], pose)]
        torch_betas, torch_pose = torch.tensor(betas), torch.tensor(pose.reshape(batch, -1))

        def ours_call(a=jax_args):
            jax.block_until_ready(forward(model, *a))

        def smplx_call(torch_betas=torch_betas, torch_pose=torch_pose):
            with torch.no_grad():
                smplx_lbs(torch_betas, torch_pose, **torch_model)

        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(median_ms(ours_call, args.repeats, warmup=2))
            theirs.append(median_ms(smplx_call, args.repeats, warmup=2))
        ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
        print(
            f"{batch:>6} | {spread(ours, '.3f'):>22} | {spread(theirs, '.3f'):>22} | "
            f"{spread(ratios, '.2f', 'x'):>19}"
        )


if __name__ == "__main__":
    main()
