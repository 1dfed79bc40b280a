"""studies/hoffer2017_train_longer (Hoffer et al. 2017, docs/papers.md §6) as a sweep study:
the three runs as points, the table, and the tiny study through the sweep CLI, SIGKILLed once
mid-study and resumed without re-running a finished run."""
import math

import pytest

from studies.hoffer2017_train_longer import config as hoffer_config
from studies.hoffer2017_train_longer import study
from sweep import point as point_lib
from sweep import store as store_lib
from tests import testlib

CONFIG = "studies/hoffer2017_train_longer/config.py"


def test_points_are_the_three_runs_as_differences_from_the_base():
  config = hoffer_config.get_config("digits")
  points = study.points(config)
  assert [p.key for p in points] == list(hoffer_config.RUNS)
  small, large, recipe = (point_lib.trial_config(config, p) for p in points)
  assert [c.global_batch_size for c in (small, large, recipe)] == [16, 256, 256]
  assert [c.num_steps for c in (small, large, recipe)] == [1437, 89, 1437]  # regime adaptation
  for c in (small, large, recipe):
    assert c.schedule.total_steps == c.eval_every == c.checkpoint_every == c.num_steps
    assert c.schedule.base_batch_size == 16 and c.schedule.peak_lr == 0.05
  assert [c.model.ghost_batch_size for c in (small, large, recipe)] == [0, 0, 16]
  assert [c.schedule.batch_size_rule for c in (small, large, recipe)] == ["none", "none", "sqrt"]
  assert [c.optimizer.grad_clip_norm for c in (small, large, recipe)] == [None, None, 5.0]
  assert [p.row["peak_lr"] for p in points] == pytest.approx([0.05, 0.05, 0.2])
  assert [p.row["ghost_batch_size"] for p in points] == [16, 256, 16]
  assert points[0].overrides == {}  # the base is the small-batch run
  assert len({p.cell for p in points}) == 3  # different batch sizes: different programs


@pytest.mark.parametrize("field, value", [
    ("runs", ("hoffer_huge",)), ("ghost_batch_size", 24), ("epochs", 0), ("large_batch", 0),
    ("batch_size_rule", "cube")])
def test_a_bad_field_fails_before_anything_compiles(field, value):
  config = hoffer_config.get_config("digits")
  config[field] = value
  with pytest.raises(ValueError, match=f"config.{field}="):
    study.points(config)


def test_analyse_writes_the_table_in_run_order(tmp_path):
  config = hoffer_config.get_config("digits")
  rows = [dict(p.row, key=p.key, status="ok", loss=0.1 * i, steps=p.overrides.get("num_steps",
                                                                                 1437),
               wall_s=5.0, final={"eval_accuracy": 0.9 + 0.01 * i})
          for i, p in enumerate(study.points(config))]
  rows[1].update(status="diverged", loss=math.nan)
  out = study.analyse(sorted(rows, key=lambda r: r["key"]), config, str(tmp_path))
  lines = (tmp_path / study.REPORT).read_text().splitlines()
  assert [l.split(" | ")[0] for l in lines[2:]] == [f"| {r}" for r in hoffer_config.RUNS]
  assert "| 0.920 | 0.200 |" in lines[4] and "| diverged | - |" in lines[3]
  assert "| 256 | 89 | 15.9 | 0.05 | 256 |" in lines[3]
  assert out["hoffer_recipe"]["accuracy"] == pytest.approx(0.92)


def test_tiny_study_through_the_sweep_cli_resumes_after_a_kill(tmp_path):
  store_config = hoffer_config.get_config("tiny")
  args = ("sweep", f"--config={CONFIG}:tiny", f"--workdir={tmp_path}")
  open_store = lambda d: store_lib.open_store(store_config, str(d))
  finished_before = testlib.kill_sweep_after_first_trial(args, str(tmp_path), open_store)
  assert 1 <= len(finished_before) < len(hoffer_config.RUNS)
  testlib.run_cli(*args, check=True)
  store = open_store(tmp_path)
  assert sorted(store.chains()) == sorted(hoffer_config.RUNS)
  testlib.assert_each_point_finished_once(store, finished_before)
  lines = (tmp_path / "report" / study.REPORT).read_text().splitlines()
  runs = [l for l in lines if l.startswith("| hoffer_")]
  assert [l.split(" | ")[0][2:] for l in runs] == list(hoffer_config.RUNS)
  for line in runs:  # steps and a test accuracy in [0, 1] for every run
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert 0.0 <= float(cells[6]) <= 1.0, line
  assert [int(l.split(" | ")[2]) for l in runs] == [8, 2, 8]
