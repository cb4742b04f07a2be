r"""Evaluates a trained run: `python evaluate.py --workdir=runs/tiny`.

The run's own config (saved with its checkpoint) is the default; `--config=configs/x.py`
and overrides change evaluation settings only (a model or head model other than the
checkpoint's is refused, naming the keys), e.g.

    python evaluate.py --workdir=runs/tiny --config.eval.split=val \
        --config.eval.protocol=self_mono,cross_mono
    python evaluate.py --workdir=runs/tiny --config.eval.mode=scaling
    python evaluate.py --workdir=runs/tiny --config.eval.mode=speed
    python evaluate.py --workdir=runs/full --config.eval.mode=ablations \
        --config.eval.ablation_workdirs="('runs/full', 'runs/no_uv_attention')"
    python evaluate.py --workdir=runs/b --config.eval.manifest=runs/a/eval-test/manifest.json

Modes, protocols and outputs (metrics.json, table.md, grids, videos, the scaling plot,
the ablation table, speed): `uika_jax.evaluation.runner`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from uika_jax import entry_point
from uika_jax.evaluation.runner import evaluate
from uika_jax.evaluation.trained_model import saved_config

_WORKDIR = flags.DEFINE_string("workdir", None, "the trained run's folder")
_STEP = flags.DEFINE_integer("step", None, "the checkpoint's step (default: the newest)")
_CACHE = entry_point.define_compilation_cache_flag()
flags.mark_flags_as_required(["workdir"])


def _argument(argv: list[str], name: str) -> str | None:
    """The value of `--name=VALUE` or `--name VALUE` in argv, before absl parses it."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def define_config_flag(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """`--config`: a config file when one is given, else the run's saved config.

    absl parses `--config.a.b=value` overrides against the flag's config, so the flag
    must hold the run's saved config before parsing when no file is named.
    """
    workdir = _argument(argv, "workdir")
    if _argument(argv, "config") is not None or workdir is None:
        config_flags.DEFINE_config_file(
            "config", None, "the config file", lock_config=True, flag_values=flag_values,
            sys_argv=argv,
        )  # fmt: skip
        return
    config_flags.DEFINE_config_dict(
        "config", saved_config(workdir), "the run's saved config", flag_values=flag_values,
        sys_argv=argv,
    )  # fmt: skip


def main(argv: list[str]) -> None:
    """Evaluates the run in --workdir with --config's evaluation settings."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    entry_point.setup(_CACHE.value)
    out = evaluate(flags.FLAGS.config, _WORKDIR.value, step=_STEP.value)
    logging.info("evaluation written to %s", out)


if __name__ == "__main__":
    define_config_flag(sys.argv)
    app.run(main)
