"""sweep/: the grid, the Optuna trial store (idempotent
enqueue, claims, retries, dead workers), and whole sweeps through the CLI: two workers on one
store, a diverging learning rate, and the fit CLI on the stored results. (The vectorised
layout through the driver: tests/train/test_vectorized.py; the driver SIGKILLed at
random points and resumed to the same report: tests/reliability/test_sweep_faults.py.)

The CLI sweeps share one persistent compilation cache, so only the first one compiles.
"""
import json
import os
import subprocess
import sys

import optuna
import pytest

from sweep import grid
from sweep import runner
from sweep import store as store_lib
from configs import sweep as sweep_configs
from tests import testlib

COMPLETE = optuna.trial.TrialState.COMPLETE
# The test grid plus a learning rate that diverges at once: 2 N x 3 D x 1 B x 4 lr.
LRS = (0.01, 0.0316, 0.1, 1e6)


def _config():
  config = sweep_configs.get_config("test")
  config.grid.learning_rates = LRS
  return config


def _store(workdir):
  return store_lib.open_store(_config(), str(workdir))


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _sweep_args(workdir, jax_cache, *extra):
  # The layout is pinned: 'auto' would time both on this CPU, and the killed and the
  # reference sweeps must train alike for their laws.json to match to the byte.
  return ("sweep", "--config=configs/sweep.py:test",
          "--layout=sequential", f"--config.grid.learning_rates={LRS}", f"--workdir={workdir}",
          f"--config.compilation_cache_dir={jax_cache}", *extra)


# ----------------------------------------------------------------------------------------
# The grid and the store, without training.


def test_grid_trial_config_and_errors():
  config = _config()
  points = grid.grid_points(config)
  assert len(points) == 2 * 3 * 1 * 4 and len({p.key for p in points}) == len(points)
  assert len({p.cell for p in points}) == 6  # compiled steps: lr and seed are runtime
  p = points[5]
  c = grid.trial_config(config, p)
  assert c.lr_scale == p.lr and c.schedule.peak_lr == 1.0 and c.seed == p.seed
  assert c.num_steps == p.tokens // (p.batch_size * c.seq_len) == c.schedule.total_steps
  assert c.eval_steps[0] == 1 and c.eval_steps[-1] == c.num_steps and len(c.eval_steps) >= 3
  assert c.model.d_model == p.d_model and c.model.num_heads == p.d_model // 8
  assert grid.num_params(config, points[0]) < grid.num_params(config, points[-1])
  assert grid.learning_rates(sweep_configs.get_config("tiny").grid) == [
      0.01, 0.02, 0.04, 0.08, 0.16]

  for field, value, match in (("grid.schedules", ("power",), "grid.schedules"),
                              ("grid.tokens", (64,), "grid.tokens"),
                              ("layout", "fast", "layout"),
                              ("grid.models", ((12, 1),), "head_dim"),
                              ("store.grace_s", 1, "store.grace_s")):
    bad = sweep_configs.get_config("test")
    with bad.unlocked():
      *path, leaf = field.split(".")
      node = bad
      for key in path:
        node = node[key]
      node[leaf] = value
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
      grid.validate(bad)


def test_cli_config_error_is_one_line(tmp_path):
  proc = testlib.run_cli("sweep", "--config=configs/sweep.py:test",
                         "--config.grid.optimizers=('adam',)", f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and "config.grid.optimizers" in err[0] and "adamw" in err[0]


def test_store_enqueue_claim_retry_and_dead_worker(tmp_path):
  config = _config()
  store = _store(tmp_path)
  points = grid.grid_points(config)[:4]
  extra = {p.key: {"N": 1, "seq_len": 32} for p in points}
  assert store.enqueue(points[:1], extra) == 1
  assert _store(tmp_path).enqueue(points[:1], extra) == 0  # idempotent, also from elsewhere
  assert store.progress() == {"points": 1, "done": 0, "failed": 0, "pending": 1, "running": 0}
  [t] = store.claim()
  assert t.state == optuna.trial.TrialState.RUNNING
  assert t.user_attrs["worker"]["pid"] == os.getpid()
  assert store.claim() == []  # nothing else waits
  store.finish(t, {"status": "ok", "loss": 3.0, "curve": {"steps": [1], "losses": [3.0]},
                   "steps": 1})

  # A trial that raises is retried max_retries (2) times, then recorded failed.
  store.enqueue(points[1:2], extra)
  for attempt in range(3):
    [t] = store.claim()
    assert store.root(t) == 1 and t.user_attrs["key"] == points[1].key
    assert store.fail(t, "RuntimeError: boom") == (attempt < 2)
  assert store.claim() == []

  # A worker that died (here: a finished process's pid) is noticed at once on this host.
  store.enqueue(points[2:3], extra)
  [t] = store.claim()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  store.storage.set_trial_user_attr(t._trial_id, "worker",
                                    dict(t.user_attrs["worker"], pid=int(dead.stdout)))
  assert store.recover() == 1
  [again] = store.claim()
  assert store.root(again) == t.number and again.system_attrs["retry_history"] == [t.number]
  assert store.recover() == 0  # this process is alive

  # A duplicate of a point (a racing enqueue on a shared server) is pruned when claimed.
  store.enqueue(points[3:], extra)
  store.study.enqueue_trial({}, user_attrs={"key": points[3].key,
                                            "point": dict(points[3].to_dict(), N=1, seq_len=32)})
  claimed = store.claim(group=4)
  assert [t.user_attrs["key"] for t in claimed] == [points[3].key]
  assert store.claim() == []
  assert sum(t.state == optuna.trial.TrialState.PRUNED for t in store.trials()) == 1

  rows = store.rows()
  assert [r["status"] for r in rows] == ["ok", "failed"]  # the other two still run
  assert rows[1]["attempts"] == 3 and "boom" in rows[1]["error"]
  p = store.progress()
  assert (p["points"], p["done"], p["failed"], p["pending"], p["running"]) == (4, 1, 1, 2, 2)


# ----------------------------------------------------------------------------------------
# Whole sweeps through the CLI.


def _laws(workdir):
  return (workdir / "report" / "laws.json").read_text()


def _check_once(workdir):
  """Every grid point has exactly one COMPLETE trial; a point run by one attempt has a
  metrics.jsonl that never repeats a step (a finished trial trained again would)."""
  store = _store(workdir)
  for key, chain in store.chains().items():
    assert [t.state for t in chain].count(COMPLETE) == 1, (key, [t.state for t in chain])
    if len(chain) == 1:
      root = store.root(chain[0])
      steps = [json.loads(l)["step"]
               for l in open(workdir / "trials" / str(root) / "metrics.jsonl")]
      assert steps == sorted(set(steps)), key
  return store


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, jax_cache):
  """Two sequential workers started together on one store: the reference sweep (the same
  programs on the same data as one worker, so the same losses)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  procs = [testlib.popen_cli(*_sweep_args(workdir, jax_cache)) for _ in range(2)]
  for proc in procs:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
  return workdir


def test_two_workers_share_one_sweep(uninterrupted):
  """Every trial ran once, by one of the two workers, and both did some."""
  store = _check_once(uninterrupted)
  trials = store.trials()
  assert len(trials) == 24 and all(t.state == COMPLETE for t in trials)  # no retry needed
  assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2


def test_sweep_runs_grid_fits_and_records_divergence(uninterrupted):
  store = _check_once(uninterrupted)
  rows = store.rows()
  assert len(rows) == 24 and store.progress()["pending"] == 0
  assert {r["status"] for r in rows if r["lr"] < 1} == {"ok"}
  diverged = [r for r in rows if r["lr"] == 1e6]
  assert len(diverged) == 6 and all(r["status"] == "diverged" for r in diverged)
  assert all(r["loss"] == r["loss"] and "at step" in r["error"] for r in diverged)  # finite
  for r in rows:
    if r["status"] == "ok":  # the log-spaced eval curve, ending at the final loss
      assert len(r["curve"]["steps"]) >= 3 and r["curve"]["losses"][-1] == r["loss"]
      assert r["curve"]["steps"][-1] == r["steps"]
  laws = json.loads(_laws(uninterrupted))
  assert laws["counts"] == {"rows": 24, "ok": 18, "diverged": 6, "failed": 0}
  assert "step_law" in laws
  # 2 model sizes do not determine L(N, D): reported as such, with no fitted E.
  assert "chinchilla" not in laws and "2 N" in laws["undetermined"]["chinchilla"]
  floor = laws["irreducible_loss"]
  assert floor["known_E"] == pytest.approx(1.748, abs=1e-3) and "fitted_E" not in floor
  md = (uninterrupted / "report" / "report.md").read_text()
  assert "fitted E against the known entropy rate" in md and "| known | 1.7476 |" in md
  assert "Not determined by this grid" in md


def test_refit_from_the_store(uninterrupted, tmp_path):
  """What `python -m laws.fit --workdir=DIR` does (its CSV path: test_predict.py)."""
  config = runner.load_config(str(uninterrupted))
  rows = _store(uninterrupted).rows()
  runner.fit_and_report(rows, config.fit, str(tmp_path), data_config=config.base.data)
  assert (tmp_path / "laws.json").read_text() == _laws(uninterrupted)
