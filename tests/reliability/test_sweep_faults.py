"""Sweep faults: the driver SIGKILLed three times at random points, workers racing for
trials, trials that raise or diverge.

tests/sweep/test_sweep.py already covers one SIGKILL half-way, two full workers on one
store, a diverging learning rate (loss bound) and the store's retry bookkeeping in-process;
this file covers repeated kills at random points (in trials, between them, in the fit),
claims racing across processes with a worker killed among them, and exceptions raised by
real trials in a running sweep (retried, recorded, the sweep going on), and a NaN loss.
"""
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import optuna
import pytest

from sweep import grid
from sweep import runner
from sweep import store as store_lib
from train import loop
from configs import sweep as sweep_configs
from tests import testlib
from tests.reliability import conftest as rel

COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
# 2 models x 1 D x 1 B x 3 lr = 6 trials of 32 steps; retries enough for three kills.
GRID = ("--config.grid.models=((8, 1), (16, 1))", "--config.grid.tokens=(4096,)",
        "--config.grid.batch_sizes=(4,)", "--config.grid.learning_rates=(0.01, 0.0316, 0.1)",
        "--config.store.max_retries=5")
KILLS = 3


def _config():
  config = sweep_configs.get_config("test")
  config.grid.models = ((8, 1), (16, 1))
  config.grid.tokens = (4096,)
  config.grid.batch_sizes = (4,)
  config.grid.learning_rates = (0.01, 0.0316, 0.1)
  config.store.max_retries = 5
  return config


def _args(workdir, cache):
  return ("sweep", "--config=configs/sweep.py:test", *GRID,
          f"--workdir={workdir}", f"--config.compilation_cache_dir={cache}")


def _store(workdir):
  return store_lib.open_store(_config(), str(workdir))


@pytest.fixture(scope="module")
def sweep_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("sweep_jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sweep_cache):
  workdir = tmp_path_factory.mktemp("sweep_uninterrupted")
  testlib.run_cli(*_args(workdir, sweep_cache), check=True)
  return workdir


def _recomputed_steps(workdir, root) -> int:
  """Steps a trial logged more than once (a retry resumed before them)."""
  rows = rel.metric_rows(workdir / "trials" / str(root))
  return len(rows) - len({r["step"] for r in rows})


def _running_trial_step(store, workdir) -> int:
  """The most steps a RUNNING trial has logged in this attempt's workdir (0 if none runs)."""
  most = 0
  for t in store.trials((optuna.trial.TrialState.RUNNING,)):
    rows = rel.metric_rows(workdir / "trials" / str(store.root(t)))
    most = max(most, rows[-1]["step"] if rows else 0)
  return most


def test_driver_killed_three_times_at_random_points(uninterrupted, sweep_cache, tmp_path):
  rng = random.Random(rel.seed())
  workdir = tmp_path
  n = len(grid.grid_points(_config()))
  steps = grid.num_steps(_config(), grid.grid_points(_config())[0])
  # Each kill comes once `done` trials are finished, then either inside a running trial once
  # it logged a random step, or after a random delay: between trials or (done == n) while the
  # laws are fitted and the report is written.
  plan = []
  for done_at in sorted(rng.sample(range(n + 1), KILLS)):
    inside = done_at < n and rng.random() < 0.75
    plan.append((done_at, "step", rng.randint(2, steps - 1)) if inside
                else (done_at, "delay", rng.uniform(0.0, 1.5)))
  finished_before, kills = {}, []
  for done_at, kind, where in plan:
    proc = testlib.popen_cli(*_args(workdir, sweep_cache))
    store = None
    deadline = time.time() + 600

    def reached():
      if kind == "delay":
        return store.progress()["done"] >= done_at
      return (store.progress()["done"] >= done_at
              and _running_trial_step(store, workdir) >= where)

    while proc.poll() is None and time.time() < deadline:
      if store is None and os.path.exists(workdir / "sweep.db"):
        store = _store(workdir)
      if store is not None and reached():
        break
      time.sleep(0.05)
    if kind == "delay":
      time.sleep(where)
    ended = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    store = _store(workdir)
    running = [t.number for t in store.trials((optuna.trial.TrialState.RUNNING,))]
    for t in store.trials((COMPLETE,)):
      finished_before.setdefault(t.number, t.datetime_complete)
    kills.append(dict(after_done=done_at, kind=kind, at=where, done=store.progress()["done"],
                      running=running, ended_first=ended))

  final = testlib.run_cli(*_args(workdir, sweep_cache))
  assert final.returncode == 0, final.stderr[-3000:]
  store = _store(workdir)
  chains = store.chains()
  assert len(chains) == n
  for key, chain in chains.items():  # every grid point finished exactly once
    assert [t.state for t in chain].count(COMPLETE) == 1, (key, [t.state for t in chain])
  complete = {t.number: t.datetime_complete for t in store.trials((COMPLETE,))}
  rerun = sum(complete.get(k) != v for k, v in finished_before.items())
  assert rerun == 0  # and a finished one never ran again
  for k in kills:  # a trial running at a kill: failed as "died", retried once, completed
    for number in k["running"]:
      t = next(t for t in store.trials() if t.number == number)
      assert t.state == FAIL and "died" in t.user_attrs["error"], t.user_attrs
  assert ((workdir / "report" / "laws.json").read_text()
          == (uninterrupted / "report" / "laws.json").read_text())
  assert ((workdir / "report" / "report.md").read_text()
          == (uninterrupted / "report" / "report.md").read_text())
  recomputed = sum(_recomputed_steps(workdir, store.root(c[0])) for c in chains.values())
  interrupted = sum(len(k["running"]) for k in kills)
  # A killed trial resumes from its newest checkpoint (checkpoints_per_trial = 2).
  assert recomputed <= interrupted * (steps // 2 + steps // 4), (recomputed, kills)
  rel.record("sweep_kill", runs=len(kills), survived=len(kills), trials=n,
             trials_rerun=rerun, interrupted_trials=interrupted, recomputed=recomputed,
             trial_steps=steps, checkpoint_interval=steps // 2,
             kills=[{k: v for k, v in kill.items() if k != "running"} for kill in kills])


# ----------------------------------------------------------------------------------------
# Claims racing across processes, one worker killed among them.

_CLAIMER = r"""
import json, sys, time
from sweep import store as store_lib
from configs import sweep as sweep_configs
config = sweep_configs.get_config("test")
store = store_lib.open_store(config, sys.argv[1])
with open(sys.argv[2], "a", buffering=1) as log:
  print("ready", flush=True)
  sys.stdin.readline()  # every claimer starts at once
  while True:
    claimed = store.claim()
    if not claimed:
      break
    [t] = claimed
    log.write(json.dumps([t.number, t.user_attrs["key"]]) + "\n")
    time.sleep(0.02)
    store.finish(t, {"status": "ok", "loss": 1.0, "curve": {"steps": [1], "losses": [1.0]},
                     "steps": 1})
"""


def test_racing_workers_never_run_a_trial_twice(tmp_path):
  config = sweep_configs.get_config("test")
  points = grid.grid_points(config)
  store = store_lib.open_store(config, str(tmp_path))
  store.enqueue(points, {p.key: {"N": 1, "seq_len": 32} for p in points})
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(tmp_path),
                             str(tmp_path / f"claims{i}.jsonl")], cwd=testlib.ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
           for i in range(3)]
  for p in procs:
    assert p.stdout.readline().strip() == "ready"
  for p in procs:
    p.stdin.write("go\n")
    p.stdin.flush()
  # Worker 0 dies after its third claim, holding a RUNNING trial.
  deadline = time.time() + 300
  while time.time() < deadline and sum(1 for _ in open(tmp_path / "claims0.jsonl")) < 3:
    time.sleep(0.005)
  procs[0].send_signal(signal.SIGKILL)
  for p in procs:
    p.wait(timeout=300)
    p.stdout.close()
    p.stdin.close()

  assert store.recover() <= 1  # the dead worker's trial, if it held one, is re-queued
  while claimed := store.claim():
    store.finish(claimed[0], {"status": "ok", "loss": 1.0, "curve": {"steps": [], "losses": []},
                              "steps": 1})
  numbers = []
  for i in range(3):
    numbers += [json.loads(l)[0] for l in open(tmp_path / f"claims{i}.jsonl")]
  assert len(numbers) == len(set(numbers)), "a trial was claimed by two workers"
  assert sum(1 for _ in open(tmp_path / "claims1.jsonl")) > 0
  assert sum(1 for _ in open(tmp_path / "claims2.jsonl")) > 0  # they did race
  for key, chain in store.chains().items():
    assert [t.state for t in chain].count(COMPLETE) == 1, key
  assert store.progress()["done"] == len(points)
  rel.record("claim_race", runs=3, survived=2, trials=len(points), claims=len(numbers),
             claimed_twice=len(numbers) - len(set(numbers)))


# ----------------------------------------------------------------------------------------
# Trials that raise or diverge, in a running sweep (in-process, real training).


def test_failing_trials_are_retried_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  config = sweep_configs.get_config("test")
  config.grid.models = ((8, 1),)
  config.grid.tokens = (4096,)
  config.grid.batch_sizes = (8,)  # the 8 virtual devices of the test process
  config.grid.learning_rates = (0.01, 0.0316, 0.1, 1e30)
  config.loss_bound = 1e30  # so lr 1e30 stops on the NaN itself, not on the bound
  config.store.poll_s = 0.1
  config.compilation_cache_dir = "none"
  calls = collections.Counter()
  real_run = loop.run

  def flaky_run(s, trials, **kwargs):
    cfg = trials[0].config
    calls[cfg.lr_scale] += 1
    if cfg.lr_scale == 0.01:
      raise RuntimeError("injected fault: this trial always raises")
    if cfg.lr_scale == 0.0316 and calls[cfg.lr_scale] == 1:
      raise OSError("injected fault: the first attempt raises")
    return real_run(s, trials, **kwargs)

  monkeypatch.setattr(loop, "run", flaky_run)
  out = runner.run_sweep(config, str(tmp_path), layout="sequential")
  assert out["progress"]["pending"] == 0 and "report" in out
  assert calls == {0.01: 3, 0.0316: 2, 0.1: 1, 1e30: 1}  # max_retries = 2

  rows = {r["lr"]: r for r in store_lib.open_store(config, str(tmp_path)).rows()}
  assert rows[0.01]["status"] == "failed" and rows[0.01]["attempts"] == 3
  assert "RuntimeError: injected fault: this trial always raises" in rows[0.01]["error"]
  assert rows[0.0316]["status"] == "ok" and rows[0.0316]["attempts"] == 2
  assert rows[0.1]["status"] == "ok" and rows[0.1]["attempts"] == 1
  diverged = rows[1e30]
  assert diverged["status"] == "diverged" and diverged["attempts"] == 1
  assert "non-finite loss or gradient at step" in diverged["error"]
  laws = json.loads((tmp_path / "report" / "laws.json").read_text())
  assert laws["counts"] == {"rows": 4, "ok": 2, "diverged": 1, "failed": 1}
  rel.record("trial_faults", runs=4, survived=4, raised=3, retried=3, failed_for_good=1,
             diverged=1)
