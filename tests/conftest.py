"""Test setup: 8 fake CPU devices, parsed absl flags, hardware markers, oracles.

`UIKA_REQUIRE_ORACLES=1` (set by .ci/run) turns a missing test oracle (torch,
smplx, ...) into an error instead of a skip, so CI cannot pass without them.
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
