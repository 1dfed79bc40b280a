"""Helpers shared by tests: run a few train steps in-process, run the CLI in a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optuna

from train import trainer
from configs import lm as lm_config
from sharding import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arg: str = "tiny", **overrides):
  config = lm_config.get_config(arg)
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    if isinstance(value, dict):
      node[leaf].update(value)
    else:
      node[leaf] = value
  return config


def run_steps(config, num_devices: int | None = None, steps: int = 10, params=None):
  """Trains `steps` steps in-process on the first `num_devices` devices: (losses, setup, state).

  `params` (optional) replaces the initial parameters (optimizer state is re-initialised).
  """
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  s = trainer.setup(config, mesh=mesh)
  state = trainer.init_state(s, config.seed)
  if params is not None:
    params = jax.device_put(params, s.state_shardings["params"])
    state = dict(state, params=params,
                 opt_state=jax.device_put(s.tx.init(params), s.state_shardings["opt_state"]))
  step_fn = trainer.make_train_step(s)
  it = s.task.train_iterator(s.micro_batch_size, 0, 1)
  losses = []
  for i in range(steps):
    lr_inputs = {"step": np.int32(i), "tokens": np.float32(i * config.global_batch_size *
                                                           config.seq_len),
                 "batch_size": np.float32(config.global_batch_size), "lr_scale": np.float32(1)}
    batch = trainer.global_batch(s, [next(it) for _ in range(s.num_microbatches)])
    state, metrics, _ = step_fn(state, batch, lr_inputs)
    losses.append(float(metrics["loss"]))
  return np.array(losses), s, state


def run_cli(*args, env=None, timeout=600, check=False):
  """Runs `python -m ARGS` from the repo root on 1 CPU device; returns CompletedProcess."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  full_env.pop("XLA_FLAGS", None)
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  return proc


def popen_cli(*args, env=None):
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  full_env.pop("XLA_FLAGS", None)
  full_env.update(env or {})
  return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_sweep_after_first_trial(args, workdir, open_store, timeout: float = 600) -> dict:
  """Starts `python -m ARGS` (a sweep writing to workdir), SIGKILLs it once its store holds a
  finished trial and before the sweep ends; returns {trial number: datetime_complete} of the
  trials finished by then. `open_store(workdir)` opens the sweep's store."""
  complete = optuna.trial.TrialState.COMPLETE
  proc = popen_cli(*args)
  threading.Thread(target=proc.stdout.read, daemon=True).start()  # the pipe never fills
  store, deadline = None, time.time() + timeout
  try:
    while proc.poll() is None and time.time() < deadline:
      if store is None and os.path.exists(os.path.join(workdir, "sweep.db")):
        store = open_store(workdir)
      if store is not None and store.trials((complete,)):
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be killed mid-study"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  return {t.number: t.datetime_complete for t in open_store(workdir).trials((complete,))}


def assert_each_point_finished_once(store, finished_before: dict) -> None:
  """After a re-run: every point has exactly one COMPLETE trial, and the trials finished
  before the kill (finished_before) did not run again."""
  complete = optuna.trial.TrialState.COMPLETE
  for key, chain in store.chains().items():
    assert [t.state for t in chain].count(complete) == 1, (key, [t.state for t in chain])
  now = {t.number: t.datetime_complete for t in store.trials((complete,))}
  assert {n: now.get(n) for n in finished_before} == finished_before  # none ran again
