"""laws/predict.py (η*, B*, loss with intervals and the config overrides, from a
sweep's laws.json) and laws/fit.py's CSV import path (Epoch AI's Chinchilla points)."""
import json
import os
import re

import numpy as np
import pytest

from laws import chinchilla
from laws import estimate
from laws import predict
from laws import report
from tests import testlib
from tests.laws import test_report

CSV = os.path.join(testlib.ROOT, "tests", "testdata", "chinchilla_svg_extracted.csv")
SEQ_LEN = test_report.SEQ_LEN  # the synthetic sweep's tokens per sequence
N, D = 4e6, 4e8  # inside the synthetic sweep's ranges


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  """A workdir as a sweep leaves it: report/laws.json and sweep_config.json."""
  rows = test_report.synthetic_rows()
  laws = report.fit_all(rows, test_report.FAST)
  workdir = tmp_path_factory.mktemp("sweep")
  report.write_report(rows, laws, str(workdir / "report"))
  (workdir / "sweep_config.json").write_text(json.dumps({"base": {"seq_len": SEQ_LEN}}))
  return workdir, laws


def _number(pattern, text):
  match = re.search(pattern, text)
  assert match, (pattern, text)
  return [float(g) for g in match.groups()]


def test_prediction_follows_the_laws(sweep_dir):
  workdir, fitted = sweep_dir
  laws = report.read_laws(predict.laws_path(str(workdir)))
  p = predict.prediction(laws, N, D, seq_len=SEQ_LEN)
  est = estimate.predict(fitted, N, D)
  assert p["estimates"]["lr"] == est["lr"] and p["estimates"]["loss"] == est["loss"]
  assert p["batch_sequences"] == round(est["batch_size"].value / SEQ_LEN)
  assert p["steps"] == round(D / (p["batch_sequences"] * SEQ_LEN))
  assert p["outside"] == []
  far = predict.prediction(laws, 1e9, D, seq_len=SEQ_LEN)
  assert len(far["outside"]) == 1 and far["outside"][0].startswith("N=1e+09")
  with pytest.raises(ValueError, match="seq_len"):
    predict.prediction(laws, N, D)  # B* is in tokens: the sequence length is needed


def test_predict_cli_prints_estimates_intervals_and_overrides(sweep_dir):
  workdir, fitted = sweep_dir
  out = testlib.run_cli("laws.predict", f"--workdir={workdir}", f"--params={N}",
                        f"--tokens={D}", check=True).stdout
  est = estimate.predict(fitted, N, D)
  lr, lr_lo, lr_hi = _number(r"η\* = ([-\d.e+]+)  \[([-\d.e+]+), ([-\d.e+]+)\]", out)
  assert lr == pytest.approx(est["lr"].value, rel=1e-3) and lr_lo < lr < lr_hi
  assert (lr_lo, lr_hi) == pytest.approx((est["lr"].lo, est["lr"].hi), rel=1e-3)
  b, b_lo, b_hi = _number(r"B\* = ([-\d.e+]+)  \[([-\d.e+]+), ([-\d.e+]+)\] tokens", out)
  assert b == pytest.approx(est["batch_size"].value, rel=1e-3) and b_lo < b < b_hi
  loss, lo, hi = _number(r"L\(N, D\)\s+= ([-\d.e+]+)  \[([-\d.e+]+), ([-\d.e+]+)\]", out)
  assert loss == pytest.approx(est["loss"].value, rel=1e-3) and lo < loss < hi
  sequences = round(est["batch_size"].value / SEQ_LEN)
  assert f"sequences of {SEQ_LEN}" in out
  assert (f"--config.schedule.peak_lr={est['lr'].value:.4g} "
          f"--config.global_batch_size={sequences} "
          f"--config.num_steps={round(D / (sequences * SEQ_LEN))}") in out
  assert "--config.schedule.name=power" in out  # the calibrated Power scheduler too


def test_predict_cli_errors_are_one_line(sweep_dir, tmp_path):
  proc = testlib.run_cli("laws.predict", f"--workdir={tmp_path}", "--params=1e6",
                         "--tokens=1e9")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "laws.json" in proc.stderr
  proc = testlib.run_cli("laws.predict", f"--workdir={sweep_dir[0]}", "--params=1e6")
  assert proc.returncode == 2 and "--tokens" in proc.stderr


def test_fit_cli_on_the_chinchilla_csv_then_predict(tmp_path):
  proc = testlib.run_cli(
      "laws.fit", f"--workdir={tmp_path}", f"--csv={CSV}",
      "--mapping=N:Model Size,C:Training FLOP,loss:loss",
      "--config=configs/sweep.py:test", "--config.fit.chinchilla_n_boot=5",
      check=True)
  assert "245 rows" in proc.stdout and "fitted: chinchilla" in proc.stdout
  laws = json.loads((tmp_path / "report" / "laws.json").read_text())
  assert laws["counts"] == {"rows": 245, "ok": 245, "diverged": 0, "failed": 0}
  p = laws["chinchilla"]["params"]
  # All 245 points (Besiroglu et al. 2024 drop the 5 worst and get E 1.82, alpha 0.35, beta
  # 0.37): E 1.89, alpha 0.35, beta 0.45.
  assert p["E"] == pytest.approx(1.89, abs=0.02) and p["alpha"] == pytest.approx(0.35, abs=0.02)
  assert p["beta"] == pytest.approx(0.45, abs=0.02)
  assert "irreducible_loss" not in laws  # someone else's corpus: E unknown
  assert (tmp_path / "report" / "chinchilla.png").exists()

  out = testlib.run_cli("laws.predict", f"--workdir={tmp_path}", "--params=7e10",
                        "--tokens=1.4e12", check=True).stdout
  assert "L(N, D)" in out and "compute-optimal" in out and "η*" not in out

  bad = testlib.run_cli("laws.fit", f"--workdir={tmp_path}", f"--csv={CSV}",
                        "--mapping=N:params,C:Training FLOP,loss:loss")
  assert bad.returncode == 2 and "'params'" in bad.stderr and "Model Size" in bad.stderr


def _chinchilla_rows(Ns, Ds, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  return [dict(N=n, D=d, B=8, lr=0.01, loss=float(chinchilla.chinchilla_loss(
      n, d, 1.5, 400.0, 1200.0, 0.3, 0.3) * (1 + noise * rng.normal()))) for n in Ns for d in Ds]


def test_two_model_sizes_do_not_determine_l_of_n_d(tmp_path):
  """Noise-free L = E + A/N^a + B/D^b on 2 N x 3 D: a fit reaches objective ~0 at the wrong
  alpha, so it is reported 'not determined', with no numbers, and predict refuses it."""
  rows = _chinchilla_rows([1e4, 1e5], [1e6, 4e6, 1.6e7])
  fitted = report.fit_all(rows, test_report.FAST)
  assert "chinchilla" not in fitted
  assert "3 distinct N" in fitted["undetermined"]["chinchilla"]
  report.write_report(rows, fitted, str(tmp_path / "report"))
  md = (tmp_path / "report" / "report.md").read_text()
  assert "Not determined by this grid" in md and "L(N, D) = E +" not in md
  proc = testlib.run_cli("laws.predict", f"--workdir={tmp_path}", "--params=1e6",
                         "--tokens=1e8")
  assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
  assert "chinchilla: not determined by this grid" in proc.stderr


def test_prediction_outside_the_fitted_range_says_how_far(sweep_dir):
  _, laws = sweep_dir
  p = predict.prediction(laws, 1.6e8, 4e8, seq_len=SEQ_LEN)
  assert any("10x above the largest fitted N" in note for note in p["outside"]), p["outside"]


def test_fit_cli_reproduces_the_readme_chinchilla_figures(tmp_path):
  """The README's command (Epoch AI's replication: the 5 highest-loss points left out)."""
  testlib.run_cli(
      "laws.fit", f"--workdir={tmp_path}", f"--csv={CSV}",
      "--mapping=N:Model Size,C:Training FLOP,loss:loss", "--drop_highest=5", check=True)
  laws = json.loads((tmp_path / "report" / "laws.json").read_text())
  assert laws["counts"]["rows"] == 240
  p = laws["chinchilla"]["params"]
  for key, readme in (("E", 1.8172), ("A", 477.8), ("B", 2143.4), ("alpha", 0.3473),
                      ("beta", 0.3672)):
    assert p[key] == pytest.approx(readme, rel=5e-4), key  # 3 significant digits and more
