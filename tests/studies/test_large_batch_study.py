"""studies/you2020_large_batch/study.py: run configs (pure), a smoke sweep on a 2-point grid,
and the study killed mid-way through the sweep CLI, then re-run."""
import json
import math
import os

import pytest

from studies.you2020_large_batch import study as lbs
from studies.you2020_large_batch import config as large_batch
from sweep import runner
from sweep import store as store_lib
from tests import testlib


def test_run_configs_keep_the_token_budget_and_the_sqrt_rule():
  study = large_batch.get_config("cpu")
  for opt in study.optimizers:
    for b in study.batch_sizes:
      c = lbs.run_config(study, opt, b, factor=3.0)
      assert c.num_steps * b * c.seq_len == study.tokens_per_run
      assert c.schedule.total_steps == c.num_steps
      assert c.schedule.name == "warmup_poly" and c.schedule.batch_size_rule == "sqrt"
      assert c.optimizer.name == opt and c.lr_scale == 3.0
      assert c.global_batch_size % (c.micro_batch_size or b) == 0
      # Constant warmup tokens by default: warmup steps scale like the run length.
      assert c.schedule.warmup_steps == round(0.1 * c.num_steps)
    ratio = lbs.peak_lr(study, opt, 256, 1.0) / lbs.peak_lr(study, opt, 16, 1.0)
    assert ratio == pytest.approx(4.0)  # sqrt(256 / 16)
  # LEGW: warmup fraction grows with B / B0.
  study.warmup_batch_exponent = 1.0
  assert lbs.warmup_steps(study, 256) == round(0.1 * 4 * lbs.num_steps(study, 256))


@pytest.mark.parametrize("variant", ["cpu", "small_cpu", "small"])
def test_every_variant_is_valid_and_spends_its_budget(variant):
  study = large_batch.get_config(variant)
  lbs.validate(study)
  for b in study.batch_sizes:
    c = lbs.run_config(study, "lamb", b)
    assert c.num_steps * b * c.seq_len == study.tokens_per_run
    assert c.seq_len <= c.model.max_seq_len


@pytest.mark.parametrize("override, field", [
    ("optimizers=('adamw', 'sgdx')", "config.optimizers"),
    ("base_batch_size=32", "config.base_batch_size"),
    ("micro_batch_size=24", "config.micro_batch_size"),
    ("tokens_per_run=1000", "config.tokens_per_run"),
    ("lr_check_factors=(0.0, 1.0)", "config.lr_check_factors"),
])
def test_bad_config_is_one_line_naming_the_field(override, field):
  study = large_batch.get_config("cpu")
  key, value = override.split("=", 1)
  study[key] = eval(value)  # pylint: disable=eval-used
  with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
    lbs.validate(study)
  assert "\n" not in str(e.value)


def test_best_factor_skips_diverged_runs():
  rec = lambda f, loss, status="done": {"factor": f, "eval_loss": loss, "status": status}
  assert lbs.best_factor([rec(1.0, 3.0), rec(3.0, 2.5), rec(9.0, None, "diverged")]) == 3.0
  assert lbs.best_factor([rec(1.0, None, "diverged")]) == 1.0


def test_smoke_run_two_batch_sizes(tmp_path):
  study = large_batch.get_config("test")
  out = runner.run_sweep(study, str(tmp_path))["analysis"]
  report = tmp_path / "report"
  # The 2 check factors at B0 = 8 (the best is also the sweep's B0 point) and at B = 16.
  assert {r["key"] for r in out["check"]} == {"lamb/b8_x0.5", "lamb/b8_x1"}
  assert [r["batch_size"] for r in out["sweep"]] == [8, 16]
  assert out["sweep"][0]["factor"] == out["factors"]["lamb"]
  for r in out["check"] + out["sweep"]:
    assert r["status"] == "done" and math.isfinite(r["eval_loss"]), r
    assert os.path.exists(tmp_path / "trials" / str(r["trial"]) / "metrics.jsonl")
  assert out["sweep"][1]["steps"] == out["sweep"][0]["steps"] // 2  # same tokens, 2x batch
  table = (report / "large_batch.md").read_text()
  assert "| 16 |" in table and "LAMB" in table
  assert (report / "large_batch.png").stat().st_size > 1000
  records = json.loads((report / "results.json").read_text())
  assert len(records) == 3

  # A second invocation finds every run in the trial store and trains nothing.
  trials = store_lib.open_store(study, str(tmp_path)).trials()
  again = runner.run_sweep(study, str(tmp_path))
  assert len(store_lib.open_store(study, str(tmp_path)).trials()) == len(trials)
  assert again["analysis"]["sweep"] == out["sweep"]


def test_killed_study_resumes_without_rerunning_finished_trials(tmp_path):
  """The study through the sweep CLI, SIGKILLed once a trial has finished, then re-run."""
  args = ("sweep", "--config=studies/you2020_large_batch/config.py:test",
          f"--workdir={tmp_path}", "--config.layout=sequential")
  study = large_batch.get_config("test")
  open_store = lambda d: store_lib.open_store(study, str(d))
  before = testlib.kill_sweep_after_first_trial(args, str(tmp_path), open_store)
  assert 1 <= len(before) < len(lbs.points(study))
  testlib.run_cli(*args, check=True)
  testlib.assert_each_point_finished_once(open_store(tmp_path), before)
  assert (tmp_path / "report" / "large_batch.md").exists()
