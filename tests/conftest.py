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


def _tree_listing(root: pathlib.Path) -> list[tuple[str, int]]:
  return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def tiny_sft_dir(tmp_path_factory):
  """One tiny SFT run, `tiny.lm_config("sft", steps=2)`, trained once per test session for every
  trainer test that starts from an SFT checkpoint (PPO, reward model, evaluation, sampling).
  Its users only read it: a test that wrote into it would change what the others start from, so
  any change is an error at the end of the session."""
  import tiny
  from instructjax.trainers import lm
  workdir = tmp_path_factory.mktemp("tiny_sft")
  lm.train(tiny.lm_config("sft", steps=2), str(workdir))
  before = _tree_listing(workdir)
  yield str(workdir)
  assert _tree_listing(workdir) == before, "a test wrote into the shared tiny SFT run"
