"""No readable checkpoint at all, and learning beyond byte statistics.

Exact resume after SIGKILL (five kills at random points), SIGTERM, and the fallback from a
corrupt latest checkpoint (four kinds of damage) are in tests/reliability/.
"""
import json
import math
import os

import pytest

from tests import testlib

CONFIG = "--config=configs/lm.py:tiny,num_steps=40,schedule.warmup_steps=10,checkpoint_every=10,log_every=5,eval_every=20"


def _train(workdir, *extra, check=True):
  return testlib.run_cli("train", CONFIG, f"--workdir={workdir}", *extra,
                         check=check)


def _garble(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
  workdir = str(tmp_path)
  config = CONFIG.replace("num_steps=40", "num_steps=20")  # the same config resumes
  testlib.run_cli("train", config, f"--workdir={workdir}", check=True)
  for step in ("10", "20"):
    _garble(os.path.join(workdir, "checkpoints", step))
  proc = testlib.run_cli("train", config, f"--workdir={workdir}")
  assert proc.returncode == 2
  assert "no readable checkpoint" in proc.stderr.strip().splitlines()[-1]


def test_tiny_learns_beyond_byte_statistics(tmp_path):
  """README main job: tiny ends with eval loss below 0.5 ln 256 (unigram is ~0.59 ln 256)."""
  testlib.run_cli("train", "--config=configs/lm.py:tiny",
                         f"--workdir={tmp_path}", check=True)
  final = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
  assert final["step"] == 400
  assert final["eval_loss"] < 0.5 * math.log(256), final
  assert final["eval_bits_per_byte"] == pytest.approx(final["eval_loss"] / math.log(2), rel=1e-6)
