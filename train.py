"""Trains UIKA: `python train.py --config=configs/tiny.py --workdir=runs/tiny`.

The config file's `get_config(arg)` gives every setting (`--config=configs/default.py:arg`
selects an ablation); single values are overridden on the command line, type-checked,
e.g. `--config.optim.steps=1000 --config.train.log_every=10`. A run resumes from the
newest checkpoint in its workdir. Several hosts: start one process per host with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the JAX_*
environment variables; TPU pods and SLURM are detected). The logic is in
`uika_jax.training.loop`.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from uika_jax import entry_point
from uika_jax.training import distributed
from uika_jax.training.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "the config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's folder (checkpoints, logs)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "multi-host: the coordinator's host:port"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: the process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_CACHE = entry_point.define_compilation_cache_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    """Initialises the processes and trains the run of --config in --workdir."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    entry_point.setup(_CACHE.value)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    result = train(_CONFIG.value, _WORKDIR.value)
    logging.info("stopped at step %d%s", result.step, " (preempted)" if result.preempted else "")


if __name__ == "__main__":
    app.run(main)
