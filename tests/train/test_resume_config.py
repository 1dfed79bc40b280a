"""Resuming a workdir checks the config against the one that wrote its checkpoints.

A changed field is refused in one line (exit 2) naming it, before any restore; a change
declared in config.resume_allow_changes is recorded in config_history.jsonl and the run
continues.
"""
import json
import os
import shutil

import pytest

from tests import testlib

CONFIG = ("--config=configs/lm.py:tiny,num_steps=4,checkpoint_every=2,log_every=2,"
          "eval_every=0")
FAST = ("--config.schedule.warmup_steps=1",)


def _train(workdir, *extra, config=CONFIG, check=False):
  return testlib.run_cli("train", config, f"--workdir={workdir}", *FAST, *extra,
                         check=check)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 4-step run; tests copy it (the refusals must leave it untouched)."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  _train(workdir, check=True)
  return workdir


def _copy(src, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(src, dst)
  return dst


def _assert_refused(proc, field, workdir):
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(lines) <= 3, lines
  assert "Traceback" not in proc.stdout + proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert f"config.{field}:" in last, last
  assert "resume_allow_changes" in last, last
  with open(os.path.join(workdir, "config.json")) as f:  # not overwritten
    return last, json.load(f)


def test_changed_num_steps_is_refused_in_one_line(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  proc = _train(workdir, config=CONFIG.replace("num_steps=4", "num_steps=6"))
  last, saved = _assert_refused(proc, "num_steps", workdir)
  assert "6 in this run, 4 in" in last, last
  assert saved["num_steps"] == 4
  assert not os.path.exists(os.path.join(workdir, "config_history.jsonl"))


def test_changed_model_is_refused_before_restore(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  proc = _train(workdir, "--config.model.d_model=128")
  last, saved = _assert_refused(proc, "model.d_model", workdir)
  assert "128 in this run, 64 in" in last, last
  assert saved["model"]["d_model"] == 64
  assert "unreadable" not in proc.stderr


def test_declared_change_is_recorded_and_trains_on(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  proc = _train(workdir, "--config.resume_allow_changes=('num_steps',)",
                config=CONFIG.replace("num_steps=4", "num_steps=6"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  history = [json.loads(l) for l in open(os.path.join(workdir, "config_history.jsonl"))]
  assert len(history) == 1
  assert history[0]["step"] == 4
  assert history[0]["changes"]["num_steps"] == [4, 6]
  assert isinstance(history[0]["time"], float)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 6
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit())[-1] == 6
  # The same config again (declaration and all, or without it) resumes with nothing to record.
  proc = _train(workdir, config=CONFIG.replace("num_steps=4", "num_steps=6"), check=True)
  assert len(open(os.path.join(workdir, "config_history.jsonl")).readlines()) == 1
