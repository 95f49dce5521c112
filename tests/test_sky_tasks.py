"""The SkyPilot task files in launch/sky: SkyPilot's own parser reads each,
and its resource check accepts the resources; plus the jax.distributed
arguments a multi-node SkyPilot job gives each process."""

import pathlib

import pytest
from conftest import REPO

from mimdistill.launch_flags import distributed_args

TASKS = sorted((REPO / "launch" / "sky").glob("*.yaml"))
# What the accelerator names may be when SkyPilot's catalog (a download) is
# out of reach: the TPU slices and GPUs the README names.
KNOWN = ("tpu-v4-", "tpu-v5litepod-", "tpu-v5p-", "tpu-v6e-", "H100", "H200", "A100", "L4")


@pytest.mark.parametrize("path", TASKS, ids=[p.name for p in TASKS])
def test_task_file_parses_and_its_resources_validate(path: pathlib.Path, capsys):
  sky = pytest.importorskip("sky", reason="SkyPilot is not installed (pip install -e '.[sky]')")
  task = sky.Task.from_yaml(str(path))
  assert task.run and "--multihost" in task.run and "$WORKDIR" in task.run
  assert task.setup and 'pip install -e ".[gcs]"' in task.setup
  assert task.envs["WORKDIR"].startswith("gs://")
  assert (REPO / task.envs["SCRIPT"]).is_file()
  config_file = task.envs["CONFIG"].split(":")[0]
  assert (REPO / config_file).is_file()
  for resources in task.resources:
    assert resources.use_spot and resources.job_recovery["strategy"] == "FAILOVER"
    (name,) = resources.accelerators
    assert name.startswith(KNOWN), name
    try:
      resources.validate()
    except Exception as e:  # the GPU catalog is fetched from GitHub
      if "catalog" not in capsys.readouterr().out.lower() + str(e).lower() and not isinstance(
        e, OSError
      ):
        raise


def test_distributed_args_from_the_skypilot_environment():
  assert distributed_args({}) == {}
  assert distributed_args({"SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "10.0.0.1"}) == {}
  env = {
    "SKYPILOT_NUM_NODES": "2",
    "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.9\n",
    "SKYPILOT_NODE_RANK": "1",
  }
  assert distributed_args(env) == {
    "coordinator_address": "10.0.0.7:12355",
    "num_processes": 2,
    "process_id": 1,
  }
  with pytest.raises(ValueError, match="SKYPILOT_NODE_IPS lists 1"):
    distributed_args({**env, "SKYPILOT_NODE_IPS": "10.0.0.7"})
