"""Fixtures of the fault-injection suite: one uninterrupted reference run, CLI helpers and
the record that benchmarks/reliability_report.py turns into the README's table.

Every training subprocess shares one persistent XLA cache (a resumed process loads its
compiled step instead of compiling again), so a restart costs the imports and the restore.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import testlib

STEPS, INTERVAL = 30, 5
TRAIN = ("--config=configs/lm.py:tiny,num_steps=30,schedule.warmup_steps=10,checkpoint_every=5,log_every=1,"
         "eval_every=0,keep_checkpoints=10,device_peak_flops=1e12")
TIMING = {"step_time_s", "tokens_per_s", "mfu"}
RECORD_ENV = "RELIABILITY_RECORD"  # a JSON-lines file the figures are appended to
SEED_ENV = "RELIABILITY_SEED"  # reseeds the random fault points (default 0)


def seed() -> int:
  return int(os.environ.get(SEED_ENV, "0"))


def record(scenario: str, **figures) -> None:
  """Appends one scenario's figures for the report (a no-op unless RELIABILITY_RECORD is set)."""
  path = os.environ.get(RECORD_ENV)
  if path:
    with open(path, "a") as f:
      f.write(json.dumps(dict(scenario=scenario, **figures), sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def train_cli(workdir, *extra, env=None, check=True, max_file_kib: int | None = None):
  """Runs the training CLI on one CPU device; returns the CompletedProcess.

  max_file_kib: cap every file the process writes (RLIMIT_FSIZE, via the shell's ulimit; no
  privileges needed): a write past it fails with EFBIG, as a full disk fails with ENOSPC.
  """
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  full_env.pop("XLA_FLAGS", None)
  command = [sys.executable, "-m", "train", TRAIN, f"--workdir={workdir}", *extra]
  if max_file_kib:  # Python ignores SIGXFSZ itself, so the write returns the error
    command = ["bash", "-c", f'ulimit -f {max_file_kib} && exec "$@"', "bash", *command]
  proc = subprocess.run(command, cwd=testlib.ROOT, env=full_env, capture_output=True,
                        text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
  return proc


def popen_train(workdir, *extra, env=None, log=None):
  """Starts the training CLI; its output goes to the file `log` (no pipe to fill up)."""
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  full_env.pop("XLA_FLAGS", None)
  out = open(log, "w") if log else subprocess.DEVNULL
  return subprocess.Popen([sys.executable, "-m", "train", TRAIN,
                           f"--workdir={workdir}", *extra], cwd=testlib.ROOT, env=full_env,
                          stdout=out, stderr=subprocess.STDOUT, text=True)


def traceback_of_ours(text: str) -> bool:
  """Whether a traceback through this repository's code was printed."""
  return any(line.strip().startswith(f'File "{testlib.ROOT}/') for line in text.splitlines())


def log_lines(text: str) -> tuple[list[str], list[str]]:
  """(absl log lines, other lines) of a process's stderr."""
  logs, other = [], []
  for line in text.splitlines():
    if not line.strip():
      continue
    (logs if re.match(r"^[IWEF]\d{4} ", line) else other).append(line)
  return logs, other


def checkpoint_steps(workdir) -> list[int]:
  """Committed checkpoints: orbax renames a step directory into place once it is complete."""
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def restore_state(workdir, step):
  """The raw saved state of one checkpoint (no abstract tree: as orbax wrote it)."""
  return jax.device_get(ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state")))


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def metric_rows(workdir) -> list[dict]:
  """Every row of metrics.jsonl in order, re-logged steps included, timing fields dropped
  (a line cut short by a kill is skipped)."""
  rows = []
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return rows
  for line in open(path):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    rows.append({k: v for k, v in row.items() if k not in TIMING})
  return rows


def last_step(workdir) -> int:
  rows = metric_rows(workdir)
  return max((r["step"] for r in rows), default=0)


def wait_until(predicate, proc, what: str, timeout: float = 600, poll: float = 0.005):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f"the process exited ({proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(poll)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_env):
  """One uninterrupted run of TRAIN: the workdir every fault scenario is compared with."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train_cli(workdir, env=cache_env)
  assert checkpoint_steps(workdir) == list(range(INTERVAL, STEPS + 1, INTERVAL))
  return workdir


def copy_run(reference_dir, target, up_to: int) -> str:
  """A copy of the reference workdir as if it had stopped after checkpoint `up_to`."""
  shutil.copytree(reference_dir, target)
  for step in checkpoint_steps(target):
    if step > up_to:
      shutil.rmtree(os.path.join(target, "checkpoints", str(step)))
  return str(target)
