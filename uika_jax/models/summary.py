"""Parameter counts of a config's model, per module, trainable vs frozen, built abstractly.

    python -m uika_jax.models.summary --config=configs/default.py
    python -m uika_jax.models.summary --config=configs/tiny.py:no_uv_attention

The model is built with `nnx.eval_shape` (no weight is allocated, so the paper
configuration counts in seconds on a CPU). Trainable weights are `nnx.Param`, frozen
ones `FrozenParam`; a ViT shared by the correspondence estimator and the dual encoder
is counted once (under `correspondence/vit`). The last line is the README table row
`| name | trainable | frozen |`, named after the config and its ablation (e.g.
`tiny:no_uv_attention`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from uika_jax.config import load_config
from uika_jax.models.avatar import UIKA
from uika_jax.models.frozen import FrozenParam


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of one model.

    Attributes:
      trainable: total `nnx.Param` elements.
      frozen: total `FrozenParam` elements.
      modules: (module path, trainable, frozen) per module, two levels deep.
    """

    trainable: int
    frozen: int
    modules: tuple[tuple[str, int, int], ...]


def abstract_model(config: ml_collections.ConfigDict) -> UIKA:
    """The config's model built with `nnx.eval_shape` (ShapeDtypeStruct weights).

    Only shapes are made, so the initial Gaussian scale's anchor spacing (a value, not
    a shape) is a stand-in that satisfies the config's range checks.
    """
    gaussians = config.model.get("gaussians") or {}
    in_spacings = gaussians.get("init_scale_in_spacings") or 1
    spacing = gaussians.get("max_scale", 0.01) / (2 * in_spacings)
    return nnx.eval_shape(
        lambda: UIKA.from_config(config, rngs=nnx.Rngs(0), anchor_spacing=spacing)
    )


def _module_path(path: tuple, depth: int) -> str:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return "/".join(keys[:depth])


def count_parameters(model: nnx.Module, depth: int = 2) -> ParameterCounts:
    """Counts `nnx.Param` and `FrozenParam` elements of a (possibly abstract) model."""
    totals = collections.defaultdict(lambda: [0, 0])
    for column, kind in enumerate((nnx.Param, FrozenParam)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, kind)):
            totals[_module_path(path, depth)][column] += math.prod(leaf.shape)
    modules = tuple((name, t, f) for name, (t, f) in sorted(totals.items()))
    return ParameterCounts(
        trainable=sum(t for _, t, _ in modules),
        frozen=sum(f for _, _, f in modules),
        modules=modules,
    )


def table_row(name: str, counts: ParameterCounts) -> str:
    """The README row `| name | trainable | frozen |` (counts with thousands separators)."""
    return f"| {name} | {counts.trainable:,} | {counts.frozen:,} |"


def format_summary(name: str, counts: ParameterCounts) -> str:
    """A per-module table and the README row."""
    width = max(len(m) for m, _, _ in counts.modules) if counts.modules else 6
    lines = [f"{'module':<{width}}  {'trainable':>13}  {'frozen':>13}"]
    lines += [f"{m:<{width}}  {t:>13,}  {f:>13,}" for m, t, f in counts.modules]
    lines.append(f"{'total':<{width}}  {counts.trainable:>13,}  {counts.frozen:>13,}")
    lines.append("")
    lines.append(table_row(name, counts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the parameter counts of `--config`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/x.py[:arg]")
    parser.add_argument("--depth", type=int, default=2, help="module path depth of the table")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    print(format_summary(config.name, count_parameters(abstract_model(config), args.depth)))


if __name__ == "__main__":
    main()
