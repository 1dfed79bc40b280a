"""--help / --helpfull on every entry point, and `--config=FILE.py:list` on every config file.

Each CLI case is one process start (imports JAX, compiles nothing); absl exits 1 after
printing its usage (argparse, in launch.local, exits 0), never 2 (a bad flag).
"""
import glob
import os

import pytest

from configs import common
from tests import testlib

# module -> flags its --help must list (its own flags; --helpfull adds the shared ones).
ENTRY_POINTS = {
    "train": ("--config", "--workdir"),
    "sweep": ("--config", "--workdir", "--storage", "--layout"),
    "laws.fit": ("--config", "--csv", "--mapping"),
    "laws.predict": ("--family", "--laws", "--params"),
    "studies.yang2022_mup.study": ("--config", "--workdir"),
    "launch.tpu_vm": ("--config", "--accelerator"),
    "launch.preflight": ("--config", "--topology"),
    "launch.gpu_node": ("--config", "--cuda"),
    "launch.local": ("--num_processes", "--devices_per_process"),
    "benchmarks.optimizer_step": ("--optimizers", "--batch_size"),
    "benchmarks.sweep_throughput": ("--variant", "--k"),
    "benchmarks.ring_attention": ("--length", "--heads"),
    "benchmarks.train_step": ("--variants", "--steps"),
    "benchmarks.reliability_report": ("--record", "--seed"),
}
CONFIG_FILES = sorted(f for f in glob.glob(os.path.join(testlib.ROOT, "configs/*.py"))
                      if os.path.basename(f) not in ("__init__.py", "common.py"))


def _assert_help(proc, expected):
  assert proc.returncode in (0, 1), proc.stderr[-3000:]
  assert "Unknown command line flag" not in proc.stdout + proc.stderr
  for flag in expected:  # absl: "--name:", "--[no]name:"; argparse: "--name N"
    listed = (f"{flag}:", f"--[no]{flag[2:]}:", f"{flag} ")
    assert any(f in proc.stdout for f in listed), (flag, proc.stdout[-3000:])


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_lists_the_flags(module):
  _assert_help(testlib.run_cli(module, "--help", timeout=120), ENTRY_POINTS[module])


def test_helpfull_lists_the_shared_flags_too():
  proc = testlib.run_cli("train", "--helpfull", timeout=120)
  _assert_help(proc, ("--config", "--workdir", "--coordinator_address", "--traceback"))


def test_list_prints_the_variants_and_exits_0(tmp_path):
  proc = testlib.run_cli("train", "--config=configs/lm.py:list",
                         timeout=120)  # no --workdir needed: nothing runs
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = proc.stdout.strip().splitlines()[1:]
  names = [r.split()[0] for r in rows]
  assert names[:2] == ["tiny", "small"] and "ref" in names, proc.stdout
  assert all(len(r.split(None, 1)) == 2 for r in rows), proc.stdout  # each has a description
  assert not list(tmp_path.iterdir())


def test_list_of_a_missing_file_is_one_line_exit_2():
  proc = testlib.run_cli("sweep", "--config", "configs/nope.py:list",
                         timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --config=configs/nope.py:list: cannot list its variants (no such "
      "config file 'configs/nope.py')."]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_variant_of_every_config_is_described(path):
  module = common.load_config_module(path)
  rows = common.list_variants(module)
  assert rows, path
  for name, description in rows:
    assert "not described" not in description, (path, name)
    assert "\n" not in description and len(description) <= 100, (path, name, description)
    module.get_config(name)  # every listed name is a variant get_config accepts
  text = common.format_variants(os.path.relpath(path, testlib.ROOT))
  assert len(text.splitlines()) == len(rows) + 1


def test_variant_string_takes_tuples():
  """A comma inside brackets belongs to the value (issue: grid.seeds=(0,1) split in two)."""
  assert common.parse_arg("tiny,grid.seeds=(0, 1),seq_len=64,x=[1,2]", "cpu") == (
      "tiny", {"grid.seeds": (0, 1), "seq_len": 64, "x": [1, 2]})
  assert common.parse_arg(None, "cpu") == ("cpu", {})
