"""The batch-size study as a sweep (McCandlish et al. 2018; Lau et al. 2024): its points,
the table and fit its analysis writes from sweep rows, a run through the sweep CLI (every
run ends at the target loss with a checkpoint) and a SIGKILL mid-study then a re-run."""
import json
import os
import signal
import threading
import time

import optuna
import pytest

from studies.mccandlish2018_batch_size import config as study_config
from studies.mccandlish2018_batch_size import study
from sweep import store as store_lib
from tests import testlib
from tests.reliability import conftest as rel

COMPLETE = optuna.trial.TrialState.COMPLETE
CONFIG = "--config=studies/mccandlish2018_batch_size/config.py:test"
RUNS = ["fixed_8", "fixed_16", "noise_scale", "norm_test"]


def _args(workdir, cache):
  return ("sweep", CONFIG, f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}")


def _store(workdir):
  return store_lib.open_store(study_config.get_config("test"), str(workdir))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bs_jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("bs_study")
  testlib.run_cli(*_args(workdir, cache), check=True)
  return workdir


def test_points_are_the_runs_with_their_overrides():
  config = study_config.get_config("tiny")
  points = study.points(config)
  assert [p.key for p in points] == [f"fixed_{b}" for b in (8, 16, 32, 64, 128)] + [
      "noise_scale", "norm_test"]
  by_key = {p.key: p for p in points}
  o = by_key["fixed_32"].overrides
  assert (o["global_batch_size"], o["micro_batch_size"], o["batch_size.controller"]) == (
      32, 8, "fixed")
  assert o["num_steps"] == int(1.5e6 // (64 * 32)) and o["max_tokens"] == 1_500_000
  assert (o["schedule.peak_lr"], o["schedule.batch_size_rule"], o["log_every"]) == (
      2e-3, "sqrt", 1)
  assert o["stop_at_loss"] == 2.6
  assert by_key["noise_scale"].row == {"run": "noise_scale", "controller": "noise_scale",
                                       "batch": 16}
  assert by_key["norm_test"].overrides["global_batch_size"] == 8
  assert len({p.cell for p in points}) == len(points)  # one program each
  assert {p.model for p in points} == {"lm"}  # ...sharing the init and eval step
  off = study.points(study_config.get_config("tiny,stop_at_target=False"))
  assert {p.overrides["stop_at_loss"] for p in off} == {0.0}
  small = study_config.get_config("small")
  assert [p.key for p in study.points(small)][:4] == ["fixed_8", "fixed_16", "fixed_32",
                                                       "fixed_64"]
  assert (small.base.seq_len, small.max_batch, small.base_lr) == (128, 64, 1.5e-3)


def test_a_bad_field_is_one_line_naming_it():
  with pytest.raises(ValueError, match="config.max_batch=8"):
    study.points(study_config.get_config("tiny,max_batch=8"))
  with pytest.raises(ValueError, match="config.max_tokens"):
    study.points(study_config.get_config("tiny,max_tokens=100"))


def test_outputs_fit_the_fixed_batch_runs(tmp_path):
  """Runs that follow S = S_min(1 + B_crit/B) exactly give back S_min and B_crit."""
  s_min, b_crit = 48.0, 16.0  # integer steps at every B
  table = []
  for b in (8, 16, 32, 64):
    steps = round(s_min * (1 + b_crit / b))
    table.append(dict(run=f"fixed_{b}", steps=steps, tokens=steps * b * 64, final_batch=b,
                      final_loss=2.5, noise_scale=None))
  table.append(dict(run="norm_test", steps=None, tokens=None, final_batch=64, final_loss=2.7,
                    noise_scale=None))
  study.write_outputs(table, str(tmp_path), target=2.5, seq_len=64)
  text = (tmp_path / "batch_size_study.md").read_text()
  assert "S_min = 48 steps, B_crit = 16.0 sequences" in text
  assert "| norm_test | not reached |" in text
  assert json.loads((tmp_path / "batch_size_study.json").read_text()) == table
  assert os.path.getsize(tmp_path / "batch_size_study.png") > 10_000


def test_analyse_reads_the_rows_only(tmp_path):
  """Steps are the row's when it stopped at the target; tokens and batch its final row's."""
  config = study_config.get_config("test")
  final = dict(loss=3.9, tokens=9216.0, batch_size=8.0)
  rows = [  # sorted by key, as the store gives them
      dict(key="fixed_16", run="fixed_16", controller="fixed", batch=16, status="ok",
           loss=4.4, steps=75, stopped=False, final=dict(loss=4.4, tokens=38400.0,
                                                         batch_size=16.0, noise_scale=9.5)),
      dict(key="fixed_8", run="fixed_8", controller="fixed", batch=8, status="ok", loss=3.9,
           steps=36, stopped=True, final=final),
      dict(key="norm_test", run="norm_test", controller="norm_test", batch=8,
           status="failed", loss=float("nan"), error="boom")]
  out = study.analyse(rows, config, str(tmp_path))
  assert [r["run"] for r in out["table"]] == ["fixed_8", "fixed_16", "norm_test"]
  assert out["table"][0] == dict(run="fixed_8", steps=36, tokens=9216, final_batch=8,
                                 final_loss=3.9, noise_scale=None, status="ok")
  text = (tmp_path / "batch_size_study.md").read_text()
  assert "| fixed_8 | 36 | 9,216 | 8 | 3.900 | — |" in text
  assert "| fixed_16 | not reached | not reached | 16 | 4.400 | 9.5 |" in text
  assert "| norm_test | not reached |" in text


def test_the_sweep_cli_runs_every_point_to_the_target(uninterrupted):
  config = study_config.get_config("test")
  rows = {r["run"]: r for r in _store(uninterrupted).rows()}
  assert sorted(rows) == sorted(RUNS)
  points = {p.key: p for p in study.points(config)}
  for run, r in rows.items():
    # Each stopped at the first step whose loss EMA reached the target, before max_tokens,
    # with a checkpoint there; its last logged row is that step's.
    assert r["status"] == "ok" and r["stopped"], r
    assert r["steps"] < points[run].overrides["num_steps"]
    assert r["final"]["loss"] > 0 and r["final"]["batch_size"] >= r["batch"]
    assert rel.checkpoint_steps(uninterrupted / "trials" / str(r["trial"])) == [r["steps"]]
  for b in (8, 16):
    r = rows[f"fixed_{b}"]
    assert r["final"]["tokens"] == r["steps"] * b * config.base.seq_len
  text = (uninterrupted / "report" / "batch_size_study.md").read_text()
  for run in RUNS:
    assert f"| {run} | {rows[run]['steps']} | {int(rows[run]['final']['tokens']):,} |" in text
  assert os.path.getsize(uninterrupted / "report" / "batch_size_study.png") > 10_000


def _wait_for_complete(proc, workdir, timeout=300):
  """Waits until the store holds >= 1 COMPLETE trial while `proc` runs; their finish times."""
  start = time.time()
  while time.time() - start < timeout:
    assert proc.poll() is None, "the sweep ended before it could be killed"
    if os.path.exists(workdir / "sweep.db"):
      done = {t.number: t.datetime_complete for t in _store(workdir).trials((COMPLETE,))}
      if done:
        return done
    time.sleep(0.5)
  raise AssertionError("no trial finished in time")


def test_a_killed_study_resumes_without_rerunning_finished_trials(tmp_path, cache,
                                                                   uninterrupted):
  workdir = tmp_path / "killed"
  proc = testlib.popen_cli(*_args(workdir, cache))
  threading.Thread(target=proc.stdout.read, daemon=True).start()  # the pipe never fills
  try:
    _wait_for_complete(proc, workdir)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  before = {t.number: t.datetime_complete for t in _store(workdir).trials((COMPLETE,))}
  assert 1 <= len(before) < len(RUNS)
  testlib.run_cli(*_args(workdir, cache), check=True)
  store = _store(workdir)
  chains = store.chains()
  assert sorted(chains) == sorted(RUNS)
  for key, chain in chains.items():  # every point finished exactly once
    assert [t.state for t in chain].count(COMPLETE) == 1, (key, [t.state for t in chain])
  after = {t.number: t.datetime_complete for t in store.trials((COMPLETE,))}
  assert all(after.get(n) == when for n, when in before.items())  # none ran again
  assert ((workdir / "report" / "batch_size_study.md").read_text()
          == (uninterrupted / "report" / "batch_size_study.md").read_text())
