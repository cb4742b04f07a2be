"""Multi-host (multi-process) start-up: `jax.distributed.initialize` from flags or environment.

Every process of a multi-host run calls `initialize` once, before any JAX computation
(before the first array is made or a device is listed). Where its values come from,
first match wins:

1. Explicit values (the `--coordinator_address`, `--num_processes`, `--process_id`
   flags of `train.py`): all three, or none.
2. The environment: `JAX_COORDINATOR_ADDRESS` (also read by jax itself),
   `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (read only here: jax has no variable for
   these two), each used where no explicit value is given. `JAX_LOCAL_DEVICE_IDS`
   (comma-separated) is left to jax, which reads it itself.
3. A managed cluster that jax detects itself (Cloud TPU pods on GCE or GKE, SLURM,
   Open MPI, Kubernetes with the `kubernetes` package): `jax.distributed.initialize()`
   is called without arguments (values given by 1. or 2. still win) and jax finds the
   coordinator, the process count and this process's id. Detection uses jax's own list
   of cluster environments (`jax._src.clusters`), so this module duplicates none of its
   rules; an environment of one process (a one-task SLURM job, a single-host TPU VM)
   counts as a single process. MPI through `mpi4py` is opt-in in jax and is not
   detected: give the values explicitly there.

A single process (nothing given and no cluster detected, or one process in all) is
left alone: `initialize` returns without starting the distributed runtime.

Multi-process CPU (the tests: several local processes with fake CPU devices): the
processes' CPU devices need cross-process collectives. Where the platform is the CPU
(`JAX_PLATFORMS` / `jax_platforms` unset or listing "cpu" first), `initialize` sets
`jax_cpu_collectives_implementation` to "gloo" before initialising (jax 0.10.2's
default already; set anyway so an older default of none cannot silently leave every
process computing alone), unless "mpi" or another implementation was chosen.

Typical use, at the top of a training entry point:

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id)
    mesh = make_mesh(config.sharding.mesh_shape)      # now sees every process's devices
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
from absl import logging

ADDRESS_VAR = "JAX_COORDINATOR_ADDRESS"
"""Environment variable of the coordinator's `host:port` (process 0's), also read by jax."""

NUM_PROCESSES_VAR = "JAX_NUM_PROCESSES"
"""Environment variable of the number of processes."""

PROCESS_ID_VAR = "JAX_PROCESS_ID"
"""Environment variable of this process's id, 0 .. num_processes - 1."""

_FLAGS = {
    "coordinator_address": ADDRESS_VAR,
    "num_processes": NUM_PROCESSES_VAR,
    "process_id": PROCESS_ID_VAR,
}


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _check_address(address: str, origin: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{origin}={address!r} must be host:port (e.g. 10.0.0.1:1234), with the "
            "port in 1..65535"
        )


def detected_cluster() -> str | None:
    """The managed multi-process cluster jax would initialise from by itself, if any.

    Returns:
      The name of jax's cluster environment class (e.g. "SlurmCluster",
      "GceTpuCluster"), or None when none is present (or this jax has no such list).
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - a jax without the (private) cluster list
        return None
    for env in getattr(ClusterEnv, "_cluster_types", ()):
        if getattr(env, "opt_in_only_method", False):
            continue
        if env.is_env_present():
            return env.__name__
    return None


def _cluster_process_count(name: str) -> int | None:
    from jax._src.clusters import ClusterEnv

    for env in ClusterEnv._cluster_types:
        if env.__name__ == name:
            try:
                return int(env.get_process_count())
            except Exception:
                return None
    return None


def _cpu_platform() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    first = platforms.split(",")[0].strip().lower() if platforms else ""
    return first in ("", "cpu")


def _use_gloo_on_cpu() -> None:
    if not _cpu_platform():
        return
    current = jax.config.jax_cpu_collectives_implementation
    if current in (None, "", "none", "gloo"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    else:
        logging.info("CPU collectives: keeping %r (not gloo)", current)


def resolve(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> tuple[str | None, int | None, int | None]:
    """The explicit values, completed from the environment and checked.

    Args:
      coordinator_address: `host:port` of process 0's coordinator, or None.
      num_processes: the number of processes, or None.
      process_id: this process's id, or None.

    Returns:
      (coordinator_address, num_processes, process_id), each None where neither the
      argument nor its environment variable gives it.

    Raises:
      ValueError: naming the flag or variable: some but not all values given (without a
        detected cluster to complete them), a malformed address or integer, fewer than
        one process, or a process id outside 0 .. num_processes - 1.
    """
    explicit = {
        "coordinator_address": coordinator_address or None,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < len(explicit):
        missing = [f"--{k}" for k in explicit if explicit[k] is None]
        raise ValueError(
            f"{', '.join('--' + k for k in given)} given but {', '.join(missing)} missing: "
            "give --coordinator_address, --num_processes and --process_id together "
            f"(or none, and set {ADDRESS_VAR}, {NUM_PROCESSES_VAR}, {PROCESS_ID_VAR})"
        )
    origin = {k: f"--{k}" for k in explicit}
    if not given:
        origin = dict(_FLAGS)
        explicit = {
            "coordinator_address": os.environ.get(ADDRESS_VAR, "").strip() or None,
            "num_processes": _int_from_env(NUM_PROCESSES_VAR),
            "process_id": _int_from_env(PROCESS_ID_VAR),
        }
    address, count, index = explicit.values()
    if address is not None:
        _check_address(address, origin["coordinator_address"])
    if count is not None and count < 1:
        raise ValueError(f"{origin['num_processes']}={count} must be at least 1")
    if index is not None and index < 0:
        raise ValueError(f"{origin['process_id']}={index} must be at least 0")
    if count is not None and index is not None and index >= count:
        raise ValueError(
            f"{origin['process_id']}={index} must be less than "
            f"{origin['num_processes']}={count} (ids run from 0 to {count - 1})"
        )
    present = [k for k, v in zip(explicit, (address, count, index), strict=True) if v is not None]
    partial = present and len(present) < 3 and (count is None or count > 1)
    if partial and detected_cluster() is None:
        missing = [origin[k] for k in explicit if k not in present]
        raise ValueError(
            f"{', '.join(origin[k] for k in present)} set but {', '.join(missing)} "
            "missing, and no cluster (TPU pod, SLURM, Open MPI) was detected to "
            "supply them: set all three"
        )
    return address, count, index


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> None:
    """Joins this process to a multi-process run (module docstring); no-op for one process.

    Call once, before any JAX computation.

    Args:
      coordinator_address: `host:port` of process 0's coordinator (the `--coordinator_address`
        flag); None: `JAX_COORDINATOR_ADDRESS` or a detected cluster.
      num_processes: the number of processes (`--num_processes`); None: `JAX_NUM_PROCESSES`
        or a detected cluster.
      process_id: this process's id, 0 .. num_processes - 1 (`--process_id`); None:
        `JAX_PROCESS_ID` or a detected cluster.
      local_device_ids: the local devices this process uses (None: all of them, or
        `JAX_LOCAL_DEVICE_IDS`, which jax reads).

    Raises:
      ValueError: on missing or bad values, naming the flag or environment variable
        (`resolve`).
      RuntimeError: if the distributed runtime is already running, or jax refuses to
        start it (e.g. a computation ran before), with jax's reason.
    """
    address, count, index = resolve(coordinator_address, num_processes, process_id)
    cluster = None
    if address is None and count is None and index is None:
        cluster = detected_cluster()
        if cluster is None:
            logging.info("distributed: a single process (no coordinator given or detected)")
            return
        if _cluster_process_count(cluster) == 1:
            logging.info("distributed: %s of one process, not initialising", cluster)
            return
    elif count == 1:
        logging.info("distributed: a single process (num_processes = 1), not initialising")
        return
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialised in this process")
    _use_gloo_on_cpu()
    kwargs = {
        "coordinator_address": address,
        "num_processes": count,
        "process_id": index,
        "local_device_ids": local_device_ids,
    }
    logging.info(
        "distributed: initialising%s: %s",
        f" from {cluster}" if cluster else "",
        {k: v for k, v in kwargs.items() if v is not None},
    )
    try:
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    except RuntimeError as error:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({error}); call uika_jax.training."
            "distributed.initialize before any JAX computation, once per process"
        ) from error
    logging.info(
        "distributed: process %d of %d, %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Waits until every process has reached the barrier `name`; no-op for one process.

    A barrier of the coordination service (its key-value store, not a device
    collective), so it has no deadline but `timeout_s`. Use it before the first
    cross-process computation when processes may arrive far apart (one compiling or
    generating data while the others wait): gloo's CPU collectives give a process only
    30 s to find its peers when a collective first runs.

    Args:
      name: the barrier's id, the same on every process, used once.
      timeout_s: seconds to wait for the others.

    Raises:
      jax.errors.JaxRuntimeError: if the others do not arrive within `timeout_s`.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:  # multi-process without jax.distributed (e.g. a TPU pod runtime)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))
