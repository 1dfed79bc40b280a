"""studies/yang2022_mup (Yang et al. 2022): the lr-transfer study through the sweep CLI, and
its resume after a SIGKILL (no finished trial runs again, every point finishes once).

The coordinate check and the report helpers are tested in tests/models/test_mup.py.
"""
import math
import os
import signal
import time

import optuna
import pytest

from studies.yang2022_mup import config as mup_config
from studies.yang2022_mup import study as mup_study
from sweep import store as store_lib
from tests import testlib

COMPLETE = optuna.trial.TrialState.COMPLETE
# 2 parametrizations x 2 widths x 2 lrs = 8 points in 4 cells, 10 steps each.
OVERRIDES = ("--config.transfer.widths=(32, 64)", "--config.transfer.lr_low=-1",
             "--config.transfer.lr_high=0", "--config.base.num_steps=10",
             "--config.base.schedule.warmup_steps=1", "--config.base.eval_batches=2")


def _config():
  c = mup_config.get_config("tiny")
  c.transfer.lr_low, c.transfer.lr_high = -1, 0
  c.base.num_steps = 10
  return c


def _args(workdir, cache):
  return ("sweep", "--config=studies/yang2022_mup/config.py:tiny", *OVERRIDES,
          f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}")


def _store(workdir):
  return store_lib.open_store(_config(), str(workdir))


def _table_widths(text: str) -> dict[str, list[int]]:
  """{parametrization: the widths of its transfer.md table's rows}."""
  out, name = {}, None
  for line in text.splitlines():
    if line.startswith("**") and line.endswith("**"):
      name = line.strip("*")
      out[name] = []
    elif name and line.startswith("| ") and line.split("|")[1].strip().isdigit():
      out[name].append(int(line.split("|")[1]))
  return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mup_jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("mup_uninterrupted")
  testlib.run_cli(*_args(workdir, cache), check=True)
  return workdir


def test_points_grid():
  points = mup_study.points(_config())
  assert len(points) == 8 and len({p.cell for p in points}) == 4
  assert {p.group for p in points} == {p.cell + "-s0" for p in points}  # a width's lrs vectorise
  p = next(p for p in points if p.row == {"parametrization": "mup", "width": 64, "lr": 0.01})
  assert p.lr_scale == 0.01 and p.overrides["model.mlp_dim"] == 256
  with pytest.raises(ValueError, match="coordinate check"):
    mup_study.points(mup_config.get_config("coord"))


def test_analyse_reads_the_rows_diverged_and_failed_as_nan(tmp_path):
  rows = [dict(parametrization="mup", width=32, lr=0.005, status="ok", loss=3.0),
          dict(parametrization="mup", width=32, lr=0.01, status="diverged", loss=2.0),
          dict(parametrization="standard", width=64, lr=0.01, status="failed", loss=1.0)]
  best = mup_study.analyse(rows, _config(), str(tmp_path))
  assert best == {"standard": {32: None, 64: None}, "mup": {32: 0.005, 64: None}}
  text = (tmp_path / "transfer.md").read_text()
  assert "| 32 | **3.000** | div | 0.005 |" in text and "| 64 | div | div | - |" in text
  assert (tmp_path / "transfer.png").exists()


def test_transfer_report_one_row_per_width(uninterrupted):
  report = uninterrupted / "report"
  assert _table_widths((report / "transfer.md").read_text()) == {"standard": [32, 64],
                                                                  "mup": [32, 64]}
  assert os.path.getsize(report / "transfer.png") > 10_000
  assert not list(uninterrupted.rglob("transfer.json"))
  rows = _store(uninterrupted).rows()
  assert len(rows) == 8 and all(r["status"] == "ok" and math.isfinite(r["loss"]) for r in rows)


def test_resume_after_sigkill_reruns_no_finished_trial(uninterrupted, cache, tmp_path):
  proc = testlib.popen_cli(*_args(tmp_path, cache))
  store, deadline = None, time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if store is None and os.path.exists(tmp_path / "sweep.db"):
      store = _store(tmp_path)
    if store is not None and store.trials((COMPLETE,)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  store = _store(tmp_path)
  before = {t.number: t.datetime_complete for t in store.trials((COMPLETE,))}
  assert 1 <= len(before) < 8, f"the kill came at {len(before)} of 8 finished trials"

  testlib.run_cli(*_args(tmp_path, cache), check=True)
  store = _store(tmp_path)
  chains = store.chains()
  assert len(chains) == 8
  for key, chain in chains.items():  # every point finished exactly once
    assert [t.state for t in chain].count(COMPLETE) == 1, (key, [t.state for t in chain])
  after = {t.number: t.datetime_complete for t in store.trials((COMPLETE,))}
  assert {n: after.get(n) for n in before} == before  # no finished trial ran again
  assert _table_widths((tmp_path / "report" / "transfer.md").read_text()) == {
      "standard": [32, 64], "mup": [32, 64]}
  results = mup_study.transfer_results(store.rows(), _config())
  expected = mup_study.transfer_results(_store(uninterrupted).rows(), _config())
  for name, per_width in expected.items():  # the same losses as without the kill
    for width, losses in per_width.items():
      assert results[name][width] == pytest.approx(losses, rel=1e-4), (name, width)
