"""Test setup: 8 fake CPU devices, a persistent compilation cache, absl flags, markers, oracles.

`UIKA_REQUIRE_ORACLES=1` (set by .ci/run) turns a missing test oracle (torch,
smplx, ...) into an error instead of a skip, so CI cannot pass without them.

Compiled programs are cached on disk outside the clone, in
`$UIKA_TEST_CACHE_DIR` (default `~/.cache/uika_jax/jax_compilation_cache`), so
a second run of the suite skips most XLA compilation; set it to an empty
string to turn the cache off.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib

import jax
import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

_CACHE_DIR = os.environ.get(
    "UIKA_TEST_CACHE_DIR", os.path.expanduser("~/.cache/uika_jax/jax_compilation_cache")
)
if _CACHE_DIR:
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def require_oracle(module_name: str):
    """Imports an oracle module; skips the test if missing, fails under UIKA_REQUIRE_ORACLES=1."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        if os.environ.get("UIKA_REQUIRE_ORACLES") == "1":
            pytest.fail(f"oracle {module_name!r} is required (UIKA_REQUIRE_ORACLES=1): {e}")
        pytest.skip(f"oracle {module_name!r} not installed (pip install -e '.[ref]')")


def pytest_collection_modifyitems(config, items):
    platforms = {d.platform for d in jax.devices()}
    for marker in ("gpu", "tpu"):
        if marker not in platforms:
            skip = pytest.mark.skip(reason=f"needs a {marker.upper()}")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)
