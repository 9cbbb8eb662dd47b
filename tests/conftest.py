"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """The team's real datasets at ../shared/data; the test is skipped when they are absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip("../shared/data is absent (a user's clone does not have it)")
  return SHARED_DATA
