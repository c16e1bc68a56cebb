"""Test setup: 8 fake CPU devices (set before JAX starts) and the shared-data fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from exlm_jax.data import paths  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real datasets folder; tests that need it skip with the reason when it is absent."""
  root = paths.data_dir()
  if root is None:
    pytest.skip("shared data folder not found: set EXLM_DATA_DIR or place it at ../shared/data")
  return root
