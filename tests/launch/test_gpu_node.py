"""launch/gpu_node.py: the install, check and run commands of the one-node GPU recipe."""
import pytest

from launch import common
from launch import gpu_node
from tests import testlib


def test_all_steps():
  o = gpu_node.Options(config="configs/lm.py:125m", workdir="/data/w", mesh="fsdp",
                       args=("--config.num_steps=10",))
  install, check, run = gpu_node.commands(o, "all")
  assert install == ["python3", "-m", "pip", "install", "-r", "requirements.txt",
                     f"jax[cuda12]=={common.pinned_version('jax')}"]
  assert check[:4] == ["env", "JAX_PLATFORMS=cuda", "python3", "-c"]
  assert run == ["env", "JAX_PLATFORMS=cuda", "python3", "-m", "train",
                 "--config=configs/lm.py:125m", "--workdir=/data/w",
                 "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.num_steps=10"]


def test_data_mesh_is_the_default_and_config_keeps_the_configs():
  o = gpu_node.Options(config="c.py", workdir="/w")
  assert gpu_node.commands(o, "run")[0][-2:] == ["--config.mesh.data=-1", "--config.mesh.fsdp=1"]
  kept = gpu_node.commands(gpu_node.Options(config="c.py", workdir="/w", mesh="config"), "run")
  assert kept[0][-1] == "--workdir=/w"


@pytest.mark.parametrize("opts, message", [
    (dict(workdir="/w"), "--config is required"), (dict(config="c.py"), "--workdir is required"),
    (dict(config="c.py", workdir="/w", mesh="tensor"), "--mesh='tensor'")])
def test_validation(opts, message):
  with pytest.raises(ValueError, match=message):
    gpu_node.commands(gpu_node.Options(**opts), "all")
  gpu_node.commands(gpu_node.Options(), "install")  # installing needs no config


def test_cli_dry_run():
  proc = testlib.run_cli("launch.gpu_node", "--dry-run", "--python=/nonexistent/python",
                         "--config=configs/lm.py:tiny", "--workdir=/tmp/w", "--",
                         "--config.num_steps=5", timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("/nonexistent/python -m pip install -r requirements.txt 'jax[cuda12]")
  assert lines[-1] == ("env JAX_PLATFORMS=cuda /nonexistent/python -m train "
                       "--config=configs/lm.py:tiny --workdir=/tmp/w "
                       "--config.mesh.data=-1 --config.mesh.fsdp=1 --config.num_steps=5")
  missing = testlib.run_cli("launch.gpu_node", "run", "--dry-run", timeout=120)
  assert missing.returncode == 2
  assert missing.stderr.strip() == ("error: --config is required "
                                    "(e.g. --config=configs/lm.py:125m).")
