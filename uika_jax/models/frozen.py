"""`FrozenParam`: the NNX variable type of frozen pretrained weights.

Trainable weights are `nnx.Param`; the optimizer is built with
`nnx.Optimizer(model, tx, wrt=nnx.Param)` and gradients are taken with
`nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))`. A `FrozenParam` is not an
`nnx.Param` (both derive from `nnx.Variable` only), so frozen weights never enter
the differentiated state, the optimizer state or a gradient-norm clip: they are
constants of the loss. Checkpoints still hold them, as any `nnx.state(model)` does.

Modules that may either load pretrained weights or train from scratch take a
`param_type` argument (`FrozenParam` or `nnx.Param`).
"""

from __future__ import annotations

from flax import nnx


class FrozenParam(nnx.Variable):
    """A pretrained weight that is never trained (not an `nnx.Param`).

    Filter it with `nnx.state(model, FrozenParam)`; it carries the same metadata
    (logical axis names in `out_sharding`) as a `nnx.Param` would.
    """


ParamType = type[nnx.Variable]
"""The type of a module's weights: `FrozenParam` (pretrained, frozen) or `nnx.Param`."""
