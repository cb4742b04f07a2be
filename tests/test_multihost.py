"""Multi-host training on one machine: 2 processes x 2 CPU devices agree with 1 x 4.

`tests/multihost_worker.py` runs the real train step (`make_train_step`, jitted as the
training loop jits it) of the small network-test UIKA on the global batches of the data
pipeline: two avatar steps (no estimator step: one program fewer to compile in each of the
three processes; tests/test_training.py checks the estimator's batch-wide pixel counts
against micro-batches and the restage through the training loop). Two local processes (gloo
CPU collectives, `uika_jax.training.distributed.initialize`, two fake CPU devices each)
must report the same metrics as each other, and the loss and gradient norm of one
process with four devices reading the same rows, to float32 reduction order (1e-5
relative). The flags and environment of `distributed.initialize` are checked without
starting anything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from network_fixtures import FAST_COMPILE

from uika_jax.synthetic.dataset import SynthConfig, generate
from uika_jax.training import distributed

sys.path.insert(0, str(Path(__file__).parent))
from multihost_worker import DEFAULT_CACHE, SYNTHETIC

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 300  # seconds for all processes; a hang (a process waiting for its peer) fails
ESTIMATOR_STEPS, AVATAR_STEPS = 0, 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], devices: int, out: Path, cache: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        UIKA_TEST_CACHE_DIR=cache,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join(
            [f"--xla_force_host_platform_device_count={devices}"]
            + [f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items()]
        ),
        PYTHONPATH=str(WORKER.parents[1]),
    )
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--out", str(out), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=WORKER.parents[1],
    )


def finish(processes: dict[Path, subprocess.Popen]) -> list[dict]:
    """Waits for every process; the first failure (or the timeout) stops the others."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in processes.values()):
            failed = [out for out, p in processes.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                out = failed[0] if failed else next(iter(processes))
                log = out.with_suffix(".log").read_text()
                pytest.fail(f"{out.stem}: exit {processes[out].poll()}:\n{log[-4000:]}")
            time.sleep(0.2)
        for out, process in processes.items():
            log = out.with_suffix(".log").read_text()
            assert process.returncode == 0, f"{out.stem}: exit {process.returncode}:\n{log[-4000:]}"
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()
    return [json.loads(out.read_text()) for out in processes]


def test_two_processes_see_the_losses_of_one(tmp_path):
    data = tmp_path / "synthetic"
    generate(data, SynthConfig(**SYNTHETIC), progress=False)
    common = ["--data", str(data), "--estimator_steps", str(ESTIMATOR_STEPS)]
    common += ["--avatar_steps", str(AVATAR_STEPS)]
    cache = os.environ.get("UIKA_TEST_CACHE_DIR", DEFAULT_CACHE)
    address = f"127.0.0.1:{free_port()}"
    processes = {}
    for i in range(2):
        out = tmp_path / f"process{i}.json"
        flags = ["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)]
        processes[out] = launch([*common, *flags], 2, out, cache)
    out = tmp_path / "single.json"
    processes[out] = launch([*common, "--data_processes", "2"], 4, out, cache)
    first, second, single = finish(processes)

    for i, result in enumerate((first, second)):
        assert (result["process_index"], result["process_count"]) == (i, 2)
        assert (result["device_count"], result["local_device_count"]) == (4, 2)
    assert (single["process_count"], single["device_count"]) == (1, 4)
    assert first["steps"] == second["steps"], "every process sees the same global metrics"
    stages = ["estimator"] * ESTIMATOR_STEPS + ["avatar"] * AVATAR_STEPS
    for result in (first, single):
        assert [s["stage"] for s in result["steps"]] == stages
    for key in ("loss", "grad_norm"):
        got, want = ([s[key] for s in r["steps"]] for r in (first, single))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
        assert all(np.isfinite(got)) and min(got) > 0, (key, got)
    losses = [s["loss"] for s in first["steps"]]
    assert len(set(losses)) == len(stages), f"the loss changes from step to step: {losses}"
    for s in first["steps"]:
        assert s["skipped_updates"] == 0, s
    for s in first["steps"][ESTIMATOR_STEPS:]:
        assert s["raster/dropped"] == 0, f"the rasterizer overflowed: {s}"


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        distributed.ADDRESS_VAR,
        distributed.NUM_PROCESSES_VAR,
        distributed.PROCESS_ID_VAR,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_values_come_from_flags_else_the_environment(clean_env):
    assert distributed.resolve(None, None, None) == (None, None, None)
    assert distributed.resolve("10.0.0.1:1234", 4, 3) == ("10.0.0.1:1234", 4, 3)
    clean_env.setenv(distributed.ADDRESS_VAR, "host:99")
    clean_env.setenv(distributed.NUM_PROCESSES_VAR, "2")
    clean_env.setenv(distributed.PROCESS_ID_VAR, "1")
    assert distributed.resolve(None, None, None) == ("host:99", 2, 1)
    assert distributed.resolve("other:1", 8, 0) == ("other:1", 8, 0), "flags win"


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (("h:1", 2, 2), {}, "--process_id=2 must be less than --num_processes=2"),
        (("h:1", 2, -1), {}, "--process_id=-1 must be at least 0"),
        (("h:1", 0, 0), {}, "--num_processes=0 must be at least 1"),
        (("h:1", None, 0), {}, "--num_processes missing"),
        (("nohost", 2, 0), {}, "--coordinator_address='nohost' must be host:port"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
        (
            (None, None, None),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
            "JAX_PROCESS_ID=5 must be less than JAX_NUM_PROCESSES=2",
        ),
        (
            (None, None, None),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
            "JAX_PROCESS_ID missing",
        ),
    ],
)
def test_bad_values_are_named(clean_env, flags, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        distributed.initialize(*flags)


def test_a_single_process_starts_nothing(clean_env):
    distributed.initialize()  # nothing given, no cluster here
    distributed.initialize("127.0.0.1:1", 1, 0)
    clean_env.setenv(distributed.NUM_PROCESSES_VAR, "1")
    distributed.initialize()
    import jax

    assert not jax.distributed.is_initialized()
