"""What the training tests share: a tiny run's config, training runs in subprocesses, and
one finished run per test session.

Runs go through `uika_jax.training.loop.train` in a fresh Python process (this file's
`__main__`) on one CPU device: a SIGKILL or SIGTERM then hits a real run, and every run
compiles the same programs, which the persistent compilation cache (tests/conftest.py's
directory) holds for the next. `shared_run` trains one run per test session, shared by
the pytest-xdist workers through a lock on their common temporary folder: the tests of
the loop, and those of evaluate.py, read its workdir.

The subprocess can stop at a step (`pause_before_save`): when the loop saves that step's
checkpoint (its metrics are logged), it waits for the earlier checkpoints to be written,
creates `PAUSED_FILE` in the workdir and waits (for SIGTERM, or up to `PAUSE_S` seconds)
before saving, so a test can kill or preempt it at a known point.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections
from network_fixtures import FAST_COMPILE, small_config

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

ESTIMATOR_STEPS, AVATAR_STEPS = 2, 3
TOTAL_STEPS = ESTIMATOR_STEPS + AVATAR_STEPS

PAUSED_FILE = "paused"
"""Created in the workdir by a paused subprocess."""

PAUSE_S = 120.0
"""The longest a paused subprocess waits."""

RESULT_PREFIX = "RUN_RESULT "
"""The subprocess's last stdout line: this prefix and the `RunResult` as JSON."""

SYNTHETIC = dict(
    identities=8, views=3, sequences=1, frames=4, size=32, seed=0, hair=False,
    val_fraction=0.25, test_fraction=0.125,
)  # fmt: skip
"""The tiny synthetic dataset: 8 identities (2 val, 1 test), 3 views of 4 frames at 32^2."""


def tiny_train_config(data_root: str | Path, **overrides: Any) -> ml_collections.ConfigDict:
    """`network_fixtures.small_config()` as a run of 2 estimator and 3 avatar steps.

    Args:
      data_root: the folder of the synthetic dataset (generated there when missing).
      **overrides: dotted keys with "__" for ".", e.g. `train__checkpoint_every=2`.
    """
    config = small_config()
    config.data.synthetic_path = str(Path(data_root) / "synthetic")
    config.data.synthetic = ml_collections.ConfigDict(SYNTHETIC)
    config.data.read_threads = 1
    config.optim.batch_size = 2
    config.optim.steps = AVATAR_STEPS
    config.optim.warmup_steps = 1
    config.estimator_optim.steps = ESTIMATOR_STEPS
    config.estimator_optim.warmup_steps = 1
    config.loss.lpips = 0.0
    config.train.log_every = 1
    config.train.checkpoint_every = 1
    config.train.keep_checkpoints = TOTAL_STEPS
    config.eval.every = 1_000  # at step 0 and at the end only
    config.eval.identities = 2
    config.eval.batch_size = 2
    config.eval.lpips = False
    for key, value in overrides.items():
        *parents, name = key.split("__")
        block = config
        for parent in parents:
            block = block[parent]
        block[name] = value
    return config


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        ["--xla_force_host_platform_device_count=1"]
        + [f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items()]
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    cache = os.environ.get(
        "UIKA_TEST_CACHE_DIR", os.path.expanduser("~/.cache/uika_jax/jax_compilation_cache")
    )
    env["UIKA_TEST_CACHE_DIR"] = cache
    return env


def start_run(
    data_root: Path, workdir: Path, *, pause_before_save: int | None = None, **overrides: Any
) -> subprocess.Popen:
    """Starts training `tiny_train_config(data_root, **overrides)` in `workdir` in a new
    process (stdout and stderr to `workdir/../<name>.log`)."""
    spec = dict(
        data_root=str(data_root), workdir=str(workdir), overrides=overrides,
        pause_before_save=pause_before_save,
    )  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir.parent / f"{workdir.name}.log", "a", encoding="utf-8")  # noqa: SIM115
    with log:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
            cwd=ROOT, env=_subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def log_of(workdir: Path) -> str:
    """The subprocess output of the runs in `workdir` so far."""
    path = workdir.parent / f"{workdir.name}.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def finish(process: subprocess.Popen, workdir: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Waits for a run; its `RunResult` as a dict (asserting exit code 0)."""
    code = process.wait(timeout)
    output = log_of(workdir)
    assert code == 0, f"training exited with {code}:\n{output[-6000:]}"
    results = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert results, f"no result line:\n{output[-6000:]}"
    return json.loads(results[-1][len(RESULT_PREFIX) :])


def wait_paused(process: subprocess.Popen, workdir: Path, timeout: float = 300.0) -> None:
    """Waits until a run started with `pause_before_save` has paused."""
    deadline = time.monotonic() + timeout
    while not (workdir / PAUSED_FILE).exists():
        if process.poll() is not None:
            raise AssertionError(
                f"the run exited ({process.returncode}) before pausing:\n{log_of(workdir)[-6000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run did not pause in {timeout} s")
        time.sleep(0.05)
    (workdir / PAUSED_FILE).unlink()


def run(data_root: Path, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """Trains to the end in a subprocess; the `RunResult` as a dict."""
    return finish(start_run(data_root, workdir, **overrides), workdir)


@dataclasses.dataclass(frozen=True)
class SharedRun:
    """The session's finished run of `tiny_train_config(data_root)`.

    Attributes:
      data_root: holds the synthetic dataset (`data_root/synthetic`).
      workdir: the run's folder (checkpoints of every step, metrics.jsonl, ...).
      result: its `RunResult` as a dict.
    """

    data_root: Path
    workdir: Path
    result: dict[str, Any]

    def config(self, **overrides: Any) -> ml_collections.ConfigDict:
        """The run's config (with overrides)."""
        return tiny_train_config(self.data_root, **overrides)


def shared_run(tmp_path_factory, worker_id: str) -> SharedRun:
    """Trains the session's run once for every xdist worker (the body of a session fixture).

    Do not write into its folders: copy what a test changes.
    """
    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "uika_shared_run"
    root.mkdir(exist_ok=True)
    workdir, done = root / "run", root / "result.json"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            result = run(root, workdir)
            done.write_text(json.dumps(result), encoding="utf-8")
    return SharedRun(root, workdir, json.loads(done.read_text(encoding="utf-8")))


def _pause_at(step: int, workdir: Path) -> None:
    """Makes `Checkpointer.save` of `step`, once earlier saves are written, pause first
    (module docstring)."""
    from uika_jax.training.checkpointing import Checkpointer, PreemptionFlag

    save = Checkpointer.save

    def paused_save(self, saved_step, *args, **kwargs):
        if int(saved_step) == step:
            self.wait_until_finished()
            (workdir / PAUSED_FILE).touch()
            flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            if isinstance(flag, PreemptionFlag):
                flag.wait(PAUSE_S)
            else:
                time.sleep(PAUSE_S)
        save(self, saved_step, *args, **kwargs)

    Checkpointer.save = paused_save


def main(argv: list[str]) -> None:
    """The subprocess: trains the run of the JSON spec in argv[1] (`start_run`)."""
    import jax
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    cache = os.environ.get("UIKA_TEST_CACHE_DIR")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from uika_jax.training.loop import train

    spec = json.loads(argv[1])
    workdir = Path(spec["workdir"])
    if spec["pause_before_save"] is not None:
        _pause_at(int(spec["pause_before_save"]), workdir)
    config = tiny_train_config(spec["data_root"], **spec["overrides"])
    result = train(config, workdir)
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    main(sys.argv)
