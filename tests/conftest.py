"""Test setup: 8 fake CPU devices (set before JAX is imported anywhere) and
the location of the shared fixtures/data, which a user's clone lacks."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> pathlib.Path:
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} is absent: ../shared (fixtures and data from the "
                "developers' checkout) is not next to this clone")
  return path


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """One TFDS data dir per test session: the embedded dataset is prepared
  once (seconds) and shared by every test that trains."""
  return tmp_path_factory.mktemp("tfds")
