"""Scaling-law sweeps as a library: the grid, the trial store and the runner.

  config = configs.sweep.get_config('tiny')
  summary = run_sweep(config, '/tmp/sweep')        # trains what is left, fits, reports
  rows = open_store(config, '/tmp/sweep').rows()   # one dict per grid point (report.fit_all)

Trial store. Optuna's RDB storage (SQLite in the workdir by default, PostgreSQL for workers on
many machines) holds one trial per grid point, enqueued once: a point's `key` is stored with
it and a re-run enqueues only the keys it lacks (under a file lock on SQLite; on a shared
server a racing duplicate is noticed when claimed and pruned). Workers claim WAITING trials
with Optuna's atomic WAITING -> RUNNING transition, so no trial runs twice at once, write a
heartbeat while running, and finish with COMPLETE (status 'ok' or 'diverged') or FAIL. A
trial that raised, or whose worker died (stale heartbeat, or on this host a dead pid), is
re-queued as a new WAITING trial with the same key, up to `store.max_retries` times, in the
convention of `optuna.storages.RetryHeartbeatStaleTrialCallback` (system attrs
`failed_trial` = the first attempt's number, `retry_history`). Every attempt of a point trains
in `trials/<first attempt's number>/`, so a retried trial resumes from its checkpoint.

Compiles. Trials that differ only in learning rate (and seed) share one `trainer.Setup` whose
schedule has peak_lr = 1: the trial's lr is the runtime `lr_scale`. Setups of the same model
and optimizer (other B or D) also share the compiled init and eval step, so a sweep compiles
one train step per (N, D, B) cell. Workers prefer trials of cells they have compiled.

Layouts. 'sequential' runs each trial with `trainer.train`; 'vectorized' trains the learning
rates of one cell together (`train.vectorized`); 'measure' times both on the first cell
and keeps the faster for the whole sweep (recorded in the store); 'auto' is vectorised on
accelerators and 'measure' on CPU, where either can win (see `choose_layout`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import socket
import threading
import time
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np
import optuna
from absl import logging

import data as data_lib
from train import files
from laws import report as report_lib
from train import tasks as tasks_lib
from train import trainer
from models import flops as flops_lib
from models import transformer
from optimizers import factory as opt_factory

LAYOUTS = ("auto", "sequential", "vectorized", "measure")
SCHEDULES = ("cosine", "linear", "wsd", "constant", "warmup_poly")  # the ones with a peak_lr
PARAMETRIZATIONS = ("standard", "mup")
CONFIG_FILE = "sweep_config.json"


# ----------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: one trial."""
  d_model: int
  num_layers: int
  tokens: int  # D
  batch_size: int  # B, sequences
  lr: float  # peak learning rate
  optimizer: str = "adamw"
  schedule: str = "cosine"
  parametrization: str = "standard"
  seed: int = 0

  @property
  def key(self) -> str:
    return f"{self.cell}-lr{self.lr:.6g}-s{self.seed}"

  @property
  def cell(self) -> str:
    """What a compiled train step depends on: everything but lr and seed."""
    return (f"d{self.d_model}-l{self.num_layers}-D{self.tokens}-B{self.batch_size}-"
            f"{self.optimizer}-{self.schedule}-{self.parametrization}")

  @property
  def group(self) -> str:
    """Trials that can train in one vectorised program: one cell and one seed."""
    return f"{self.cell}-s{self.seed}"

  @property
  def model(self) -> tuple:
    """What the init and eval step depend on."""
    return (self.d_model, self.num_layers, self.optimizer, self.parametrization)

  @property
  def family(self) -> str:
    """Trials whose laws are fitted together."""
    return f"{self.optimizer}-{self.schedule}-{self.parametrization}"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Point":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def learning_rates(grid) -> list[float]:
  """The lr axis: grid.learning_rates, else num_lrs log-spaced in [lr_min, lr_max]."""
  if len(grid.learning_rates):
    lrs = [float(x) for x in grid.learning_rates]
  else:
    if not (grid.lr_min > 0 and grid.lr_max >= grid.lr_min and grid.num_lrs >= 1):
      raise ValueError(f"config.grid.lr_min={grid.lr_min}, lr_max={grid.lr_max}, num_lrs="
                       f"{grid.num_lrs}: need 0 < lr_min <= lr_max and num_lrs >= 1.")
    lrs = np.geomspace(grid.lr_min, grid.lr_max, grid.num_lrs).tolist()
  if not all(lr > 0 for lr in lrs):
    raise ValueError(f"config.grid.learning_rates={tuple(lrs)}: must be positive.")
  return sorted({float(f"{lr:.6g}") for lr in lrs})


def _ints(values, field, minimum=1) -> list[int]:
  out = []
  for v in values:
    if not (isinstance(v, (int, float)) and float(v) == int(v) and int(v) >= minimum):
      raise ValueError(f"config.{field}={tuple(values)!r}: need integers >= {minimum}.")
    out.append(int(v))
  if not out:
    raise ValueError(f"config.{field} is empty.")
  return out


def _choices(values, valid, field) -> list[str]:
  values = list(values)
  bad = [v for v in values if v not in valid]
  if bad or not values:
    raise ValueError(f"config.{field}={tuple(values)!r}: choose from {list(valid)}.")
  return values


def num_steps(config, point: Point) -> int:
  return max(1, round(point.tokens / (point.batch_size * config.base.seq_len)))


def grid_points(config) -> list[Point]:
  """Every point of the grid, validated, in a stable order (cells together)."""
  g = config.grid
  models = []
  for m in g.models:
    if len(m) != 2:
      raise ValueError(f"config.grid.models: {m!r} is not a (d_model, num_layers) pair.")
    d, layers = _ints(m, "grid.models")
    if d % g.head_dim:
      raise ValueError(f"config.grid.models: d_model={d} is not a multiple of "
                       f"config.grid.head_dim={g.head_dim}.")
    models.append((d, layers))
  if not models:
    raise ValueError("config.grid.models is empty.")
  tokens = _ints(g.tokens, "grid.tokens")
  batches = _ints(g.batch_sizes, "grid.batch_sizes")
  seeds = _ints(g.seeds, "grid.seeds", minimum=0)
  optimizers = _choices(g.optimizers, opt_factory.OPTIMIZERS, "grid.optimizers")
  schedules = _choices(g.schedules, SCHEDULES, "grid.schedules")
  params = _choices(g.parametrizations, PARAMETRIZATIONS, "grid.parametrizations")
  lrs = learning_rates(g)
  for D in tokens:
    for B in batches:
      steps = D / (B * config.base.seq_len)
      if steps < 2:
        raise ValueError(f"config.grid.tokens: D={D} at B={B} (seq_len "
                         f"{config.base.seq_len}) is {steps:.2g} steps; need at least 2.")
  points = [Point(d, layers, D, B, lr, opt, sched, param, seed)
            for opt in optimizers for sched in schedules for param in params
            for d, layers in models for D in tokens for B in batches for seed in seeds
            for lr in lrs]
  return points


def validate(config) -> list[Point]:
  """Checks the sweep config before anything compiles; returns the grid."""
  if config.layout not in LAYOUTS:
    raise ValueError(f"config.layout={config.layout!r}: choose from {list(LAYOUTS)}.")
  s = config.store
  if s.max_retries < 0:
    raise ValueError(f"config.store.max_retries={s.max_retries}: must be >= 0.")
  if not (s.heartbeat_s >= 1 and s.grace_s > s.heartbeat_s):
    raise ValueError(f"config.store.grace_s={s.grace_s}: must exceed "
                     f"config.store.heartbeat_s={s.heartbeat_s} (>= 1).")
  if not 0 <= config.warmup_fraction < 1 or not 0 <= config.decay_fraction <= 1:
    raise ValueError(f"config.warmup_fraction={config.warmup_fraction} / decay_fraction="
                     f"{config.decay_fraction}: fractions in [0, 1).")
  if config.num_evals < 2:
    raise ValueError(f"config.num_evals={config.num_evals}: need >= 2 for a loss curve.")
  if config.checkpoints_per_trial < 1:
    raise ValueError(f"config.checkpoints_per_trial={config.checkpoints_per_trial}: need >= 1.")
  if config.layout != "sequential" and config.base.batch_size.controller != "fixed":
    raise ValueError(f"config.base.batch_size.controller={config.base.batch_size.controller!r}"
                     ": vectorised trials need 'fixed'; set config.layout='sequential'.")
  return grid_points(config)


def eval_steps(steps: int, num: int) -> list[int]:
  """num log-spaced steps in [1, steps], always including the last."""
  return sorted({int(x) for x in np.round(np.geomspace(1, steps, num))} | {steps})


def model_config(config, point: Point) -> ml_collections.ConfigDict:
  m = config.base.model.copy_and_resolve_references()
  m.d_model = point.d_model
  m.num_layers = point.num_layers
  m.num_heads = point.d_model // config.grid.head_dim
  m.mlp_dim = config.grid.mlp_ratio * point.d_model
  m.parametrization = point.parametrization
  if point.parametrization == "mup":  # μP's base width: the grid's narrowest model
    m.base_d_model = min(d for d, _ in config.grid.models)
  return m


def num_params(config, point: Point) -> int:
  """N: matmul parameters (models.flops; embedding lookup excluded, readout included)."""
  cfg = transformer.TransformerConfig.from_config(model_config(config, point),
                                                  data_lib.vocab_size(config.base.data))
  return flops_lib.decoder_matmul_params(cfg)


def loss_bound(config) -> float:
  """config.loss_bound, or 1.5 x the loss of a uniform prediction over the model's
  (padded) vocabulary, which is about where training starts."""
  if config.loss_bound:
    return config.loss_bound
  cfg = transformer.TransformerConfig.from_config(config.base.model,
                                                  data_lib.vocab_size(config.base.data))
  return 1.5 * math.log(cfg.vocab_size)


def trial_config(config, point: Point, *, device_peak_flops: float = 0.0):
  """The trainer config of one trial: lr as the runtime lr_scale over a peak-1 schedule."""
  c = config.base.copy_and_resolve_references()
  steps = num_steps(config, point)
  c.model = model_config(config, point)
  c.global_batch_size = point.batch_size
  c.num_steps = steps
  c.seed = point.seed
  c.lr_scale = point.lr
  c.optimizer.name = point.optimizer
  sch = c.schedule
  sch.name = point.schedule
  sch.peak_lr = 1.0
  sch.total_steps = steps
  sch.warmup_steps = int(round(config.warmup_fraction * steps))
  sch.final_lr = 0.0
  if point.schedule == "wsd":
    sch.decay_steps = int(round(config.decay_fraction * steps))
    sch.stable_steps = max(0, steps - sch.warmup_steps - sch.decay_steps)
  c.eval_every = 0
  c.log_every = max(1, steps // 5)
  c.checkpoint_every = max(1, math.ceil(steps / config.checkpoints_per_trial))
  c.loss_bound = loss_bound(config)
  c.nan_policy = "stop"
  c.device_peak_flops = float(device_peak_flops)
  with c.unlocked():
    c.eval_steps = tuple(eval_steps(steps, config.num_evals))
  return c


# ----------------------------------------------------------------------------------------
# The trial store.


class _Lock:
  """A lock across the threads of this process and, for SQLite, across local processes.

  SQLite's own locking makes concurrent writers fail with 'database is locked' rather than
  wait for each other; one flock around every store operation avoids that.
  """

  def __init__(self, path: str | None):
    self._path = path
    self._thread_lock = threading.RLock()
    self._depth = 0
    self._fd = None

  @contextlib.contextmanager
  def __call__(self):
    with self._thread_lock:
      if self._depth == 0 and self._path:
        self._fd = open(self._path, "a")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
      self._depth += 1
      try:
        yield
      finally:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
          fcntl.flock(self._fd, fcntl.LOCK_UN)
          self._fd.close()
          self._fd = None


def _process_started(pid: int) -> float | None:
  import psutil  # pylint: disable=g-import-not-at-top
  try:
    return psutil.Process(pid).create_time()
  except (psutil.NoSuchProcess, psutil.AccessDenied):
    return None


_WORKER = {"host": socket.gethostname(), "pid": os.getpid()}


def _worker_info() -> dict:
  return dict(_WORKER, started=_process_started(os.getpid()))


STORAGE_ENV = "BATCHSCALE_STORAGE"  # the storage URL when neither --storage nor the config has one


def masked_url(url: str) -> str:
  """`url` with its password shown as '***', for logs and messages."""
  try:
    from sqlalchemy.engine import make_url  # pylint: disable=g-import-not-at-top
    return make_url(url).render_as_string(hide_password=True)
  except Exception:  # pylint: disable=broad-except  (not a URL: mask what looks like one)
    import re  # pylint: disable=g-import-not-at-top
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _without_password(url: str) -> str:
  """`url` with no password: libpq then takes it from ~/.pgpass or PGPASSWORD."""
  try:
    from sqlalchemy.engine import make_url  # pylint: disable=g-import-not-at-top
    u = make_url(url)
    return u._replace(password=None).render_as_string(hide_password=False) if u.password else url
  except Exception:  # pylint: disable=broad-except
    return "" if masked_url(url) != url else url


def storage_url(config, workdir: str) -> str:
  """config.store.storage, else $BATCHSCALE_STORAGE, else sqlite:///WORKDIR/sweep.db.

  A saved config holds the URL without its password (see `save_config`): when
  $BATCHSCALE_STORAGE names the same database, its URL (with the password) is used.
  """
  env = os.environ.get(STORAGE_ENV, "")
  if config.store.storage:
    url = config.store.storage
    if env and _without_password(env) == _without_password(url):
      return env
    return url
  if env:
    return env
  if "://" in workdir:
    raise ValueError(f"--workdir={workdir}: SQLite needs a local workdir; pass --storage "
                     f"(config.store.storage, or ${STORAGE_ENV}), e.g. postgresql://USER@HOST/DB.")
  return f"sqlite:///{os.path.abspath(os.path.join(workdir, 'sweep.db'))}"


class StoreError(ValueError):
  """The trial store cannot be read (a corrupt sweep.db, an unreachable database)."""


@contextlib.contextmanager
def _store_errors(url: str):
  """Turns SQLAlchemy's DatabaseError into one line naming the store and the way out."""
  import sqlalchemy.exc  # pylint: disable=g-import-not-at-top
  import sqlite3  # pylint: disable=g-import-not-at-top
  try:
    yield
  except (sqlalchemy.exc.DatabaseError, sqlite3.DatabaseError) as e:
    reason = getattr(e, "orig", None) or e
    reason = (str(reason).strip().splitlines() or [type(reason).__name__])[0]
    if url.startswith("sqlite:///"):
      path = url[len("sqlite:///"):]
      workdir = os.path.dirname(path) or "."
      given = (f"--workdir={workdir}" if os.path.basename(path) == "sweep.db"
               else f"--storage={url}")
      raise StoreError(
          f"{given}: {os.path.basename(path)} is not a readable SQLite database "
          f"({reason}); move it aside and re-run: finished trials' results are in "
          f"{os.path.join(workdir, 'trials', '<id>', 'metrics.jsonl')}") from e
    raise StoreError(f"--storage={masked_url(url)}: cannot open the trial store "
                     f"({masked_url(reason)})") from e


class TrialStore:
  """The sweep's trials in an Optuna study: enqueue, claim, heartbeat, finish, retry."""

  def __init__(self, url: str, study_name: str = "sweep", *, heartbeat_s: int = 10,
               grace_s: int = 60, max_retries: int = 2):
    self.url = url
    self.max_retries = max_retries
    self.heartbeat_s = heartbeat_s
    sqlite = url.startswith("sqlite:///")
    self.lock = _Lock(url[len("sqlite:///"):] + ".lock" if sqlite else None)
    engine = {"connect_args": {"timeout": 300}} if sqlite else {"pool_pre_ping": True}
    with self.lock(), _store_errors(url):
      self.storage = optuna.storages.RDBStorage(
          url, engine_kwargs=engine, heartbeat_interval=heartbeat_s, grace_period=grace_s,
          heartbeat_stale_trial_callback=lambda study, trial: self._retry(trial, "worker lost"))
      self.study = optuna.create_study(storage=self.storage, study_name=study_name,
                                       load_if_exists=True, direction="minimize")

  # -- reading

  def trials(self, states=None) -> list[optuna.trial.FrozenTrial]:
    return self.study.get_trials(deepcopy=False, states=states)

  @staticmethod
  def root(trial) -> int:
    """The number of the first attempt of this trial's grid point."""
    return trial.system_attrs.get("failed_trial", trial.number)

  def chains(self) -> dict[str, list]:
    """key -> the attempts of its grid point, oldest first (duplicates left out)."""
    by_key: dict[str, list] = {}
    for t in sorted(self.trials(), key=lambda t: t.number):
      if "key" in t.user_attrs:
        by_key.setdefault(t.user_attrs["key"], []).append(t)
    out = {}
    for key, ts in by_key.items():
      first = min(t.number for t in ts if "failed_trial" not in t.system_attrs)
      out[key] = [t for t in ts if self.root(t) == first]
    return out

  @staticmethod
  def outcome(chain) -> str:
    """'done' (COMPLETE), 'failed' (out of retries), or 'pending'."""
    states = [t.state for t in chain]
    if optuna.trial.TrialState.COMPLETE in states:
      return "done"
    if any(s in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
           for s in states):
      return "pending"
    return "failed"

  def progress(self) -> dict[str, int]:
    counts = {"points": 0, "done": 0, "failed": 0, "pending": 0, "running": 0}
    for chain in self.chains().values():
      counts["points"] += 1
      counts[self.outcome(chain)] += 1
      counts["running"] += any(t.state == optuna.trial.TrialState.RUNNING for t in chain)
    return counts

  def rows(self) -> list[dict]:
    """One row per finished grid point (report.fit_all's format), sorted by key."""
    rows = []
    for key, chain in sorted(self.chains().items()):
      outcome = self.outcome(chain)
      if outcome == "pending":
        continue
      last = chain[-1]
      if outcome == "done":
        last = next(t for t in chain if t.state == optuna.trial.TrialState.COMPLETE)
      point = last.user_attrs["point"]
      row = dict(key=key, trial=self.root(last), attempts=len(chain),
                 N=point["N"], D=point["tokens"], B=point["batch_size"], lr=point["lr"],
                 seq_len=point["seq_len"], **{k: point[k] for k in (
                     "d_model", "num_layers", "optimizer", "schedule", "parametrization",
                     "seed")})
      if outcome == "done":
        result = last.user_attrs["result"]
        row.update(status=result["status"], loss=result["loss"], curve=result["curve"],
                   steps=result["steps"], wall_s=result.get("wall_s"),
                   layout=result.get("layout"))
        if result.get("error"):
          row["error"] = result["error"]
      else:
        row.update(status="failed", loss=float("nan"),
                   error=last.user_attrs.get("error", "failed"))
      rows.append(row)
    return rows

  # -- writing

  def enqueue(self, points: Iterable[Point], extra: dict[str, dict] | None = None) -> int:
    """Adds a WAITING trial for every point the study lacks; returns how many were added."""
    with self.lock():
      have = {t.user_attrs.get("key") for t in self.trials()}
      added = 0
      for p in points:
        if p.key in have:
          continue
        info = dict(p.to_dict(), **(extra or {}).get(p.key, {}))
        self.study.enqueue_trial({}, user_attrs={"key": p.key, "point": info})
        have.add(p.key)
        added += 1
      return added

  def claim(self, *, prefer: Sequence[str] = (), group: int = 1) -> list:
    """Claims one WAITING trial (preferring cells in `prefer`), plus up to group - 1 more of
    the same vectorisable group; returns them as FrozenTrials (empty when none waits)."""
    waiting_state = (optuna.trial.TrialState.WAITING,)
    with self.lock():
      chains = self.chains()
      canonical = {t.number for chain in chains.values() for t in chain}
      waiting = sorted(self.trials(waiting_state), key=lambda t: (
          Point.from_dict(t.user_attrs["point"]).cell not in prefer, t.number))
      claimed = []
      for t in waiting:
        point = Point.from_dict(t.user_attrs["point"])
        if claimed and (point.group != claimed[0][1].group or len(claimed) >= group):
          continue
        if not self._take(t):
          continue
        if t.number not in canonical:  # a racing enqueue's duplicate
          self.storage.set_trial_user_attr(t._trial_id, "duplicate", True)
          self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.PRUNED)
          continue
        claimed.append((t, point))
        if group <= 1:
          break
      for t, _ in claimed:
        self.storage.set_trial_user_attr(t._trial_id, "worker", _worker_info())
        self.storage.record_heartbeat(t._trial_id)
      return [self.study._storage.get_trial(t._trial_id) for t, _ in claimed]

  def _take(self, trial) -> bool:
    try:
      return self.storage.set_trial_state_values(trial._trial_id,
                                                 optuna.trial.TrialState.RUNNING)
    except optuna.exceptions.UpdateFinishedTrialError:
      return False

  def finish(self, trial, result: dict) -> None:
    """COMPLETE with value = the loss (the last finite loss of a diverged trial)."""
    loss = result["loss"]
    with self.lock():
      self.storage.set_trial_user_attr(trial._trial_id, "result", result)
      self.study.tell(trial.number, loss if math.isfinite(loss) else float("inf"))

  def fail(self, trial, error: str, *, count: bool = True) -> bool:
    """FAIL with `error`; re-queues the point unless its retries are used up (then False).
    count=False (preemption) re-queues without using a retry."""
    with self.lock():
      self.storage.set_trial_user_attr(trial._trial_id, "error", error)
      self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
      return self._retry(self.storage.get_trial(trial._trial_id), error, count=count)

  def _retry(self, trial, error: str, count: bool = True) -> bool:
    retries = trial.system_attrs.get("retries", 0) + int(count)
    if retries > self.max_retries:
      logging.warning("trial %d (%s) failed for good after %d retries: %s", trial.number,
                      trial.user_attrs.get("key"), self.max_retries, error)
      return False
    with self.lock():
      self.study.add_trial(optuna.trial.create_trial(
          state=optuna.trial.TrialState.WAITING,
          user_attrs={k: trial.user_attrs[k] for k in ("key", "point")},
          system_attrs={"failed_trial": self.root(trial),
                        "retry_history": trial.system_attrs.get("retry_history", [])
                        + [trial.number],
                        "retries": retries}))
    logging.warning("trial %d (%s) re-queued (retry %d of %d): %s", trial.number,
                    trial.user_attrs.get("key"), retries, self.max_retries, error)
    return True

  def recover(self) -> int:
    """Fails and re-queues RUNNING trials whose worker is gone: on this host a dead pid (at
    once), elsewhere a heartbeat older than the grace period. Returns how many."""
    found = 0
    with self.lock():
      for t in self.trials((optuna.trial.TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        if not w or w["host"] != _WORKER["host"]:
          continue
        started = _process_started(w["pid"])
        if started is not None and (w["started"] is None or abs(started - w["started"]) < 1):
          continue  # alive
        try:
          self.storage.set_trial_user_attr(t._trial_id, "error", f"worker {w} died")
          if not self.storage.set_trial_state_values(t._trial_id,
                                                     optuna.trial.TrialState.FAIL):
            continue
        except optuna.exceptions.UpdateFinishedTrialError:
          continue
        self._retry(self.storage.get_trial(t._trial_id), "worker died")
        found += 1
      optuna.storages.fail_stale_trials(self.study)
    return found

  @contextlib.contextmanager
  def heartbeat(self, trials):
    """Records a heartbeat for each trial every heartbeat_s seconds while the block runs."""
    stop = threading.Event()

    def beat():
      while not stop.wait(self.heartbeat_s):
        try:
          with self.lock():
            for t in trials:
              self.storage.record_heartbeat(t._trial_id)
        except Exception as e:  # noqa: BLE001 - a missed beat must not kill the trial
          logging.warning("heartbeat failed: %s", e)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()


def open_store(config, workdir: str, storage: str | None = None) -> TrialStore:
  s = config.store
  return TrialStore(storage or storage_url(config, workdir), s.study_name,
                    heartbeat_s=int(s.heartbeat_s), grace_s=int(s.grace_s),
                    max_retries=int(s.max_retries))


# ----------------------------------------------------------------------------------------
# Running trials.


def read_metrics(workdir: str) -> dict[int, dict]:
  """metrics.jsonl by step; a resumed run's re-logged steps keep their last row, and a line
  cut short by a kill is skipped."""
  rows = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      rows[int(row["step"])] = row
  return rows


def trial_result(workdir: str, status: str, error: str = "", wall_s: float = 0.0,
                 layout: str = "sequential") -> dict:
  """The stored result of a trial from its metrics.jsonl.

  loss: the final eval loss ('ok'), or the last finite training loss ('diverged'); curve: the
  eval loss at every evaluated step (log-spaced, for the critical batch fit).
  """
  rows = read_metrics(workdir)
  steps = sorted(rows)
  curve = {"steps": [s for s in steps if "eval_loss" in rows[s]],
           "losses": [rows[s]["eval_loss"] for s in steps if "eval_loss" in rows[s]]}
  if status == "ok":
    loss = rows[steps[-1]]["eval_loss"]
  else:
    finite = [rows[s]["loss"] for s in steps if math.isfinite(rows[s].get("loss", math.nan))]
    loss = finite[-1] if finite else float("nan")
  curve = {k: [v if math.isfinite(v) else None for v in vals] for k, vals in curve.items()}
  return {"status": status, "loss": float(loss), "steps": steps[-1] if steps else 0,
          "curve": curve, "error": error, "wall_s": round(wall_s, 3), "layout": layout}


class Preempted(Exception):
  """SIGTERM: the trial checkpointed and stopped; re-queue it without using a retry."""


class Setups:
  """trainer.Setups per cell (lr- and seed-free), sharing init and eval step per model."""

  def __init__(self, config, mesh=None, capacity: int = 8):
    self.config = config
    self.mesh = mesh
    self.capacity = capacity
    self._cells: dict[str, trainer.Setup] = {}
    self._models: dict[tuple, trainer.Setup] = {}

  def cells(self) -> list[str]:
    return list(self._cells)

  def get(self, point: Point) -> trainer.Setup:
    if point.cell in self._cells:
      self._cells[point.cell] = self._cells.pop(point.cell)  # most recently used last
      return self._cells[point.cell]
    cfg = trial_config(self.config, dataclasses.replace(point, lr=1.0))
    s = trainer.setup(cfg, mesh=self.mesh)
    source = self._models.get(point.model)
    if source is None:
      self._models[point.model] = s
    else:
      s.compiled["eval_step"] = trainer.make_eval_step(source)
      s.compiled["init"] = _shared_init(source, s)
    self._cells[point.cell] = s
    while len(self._cells) > self.capacity:
      self._cells.pop(next(iter(self._cells)))
    return s

  def for_trial(self, point: Point, trial_cfg) -> trainer.Setup:
    """The cell's Setup with this trial's config (lr_scale, seed) and data order."""
    return dataclasses.replace(self.get(point), config=trial_cfg,
                               task=tasks_lib.make_task(trial_cfg))


def _shared_init(source: trainer.Setup, s: trainer.Setup):
  """s's init through source's compiled one (same model and optimizer); only the batch-size
  controller state, which records B, is s's own."""
  def init(key):
    if "init" not in source.compiled:
      trainer.init_state(source, 0)
    state = source.compiled["init"](key)
    # Via NumPy: one buffer per leaf (init may reuse an array, and the step donates them).
    control = jax.tree.map(np.array, s.controller.init())
    control = jax.device_put(control, s.state_shardings["control"])
    return dict(state, control=control)
  return init


def _cpu_peak_flops() -> float:
  if flops_lib.device_peak_flops() is not None:
    return 0.0  # the trainer knows the accelerator's peak
  return flops_lib.measure_matmul_peak(seconds=0.5) / len(jax.local_devices())


class Runner:
  """Runs claimed trials in their layout and returns their results."""

  def __init__(self, config, workdir: str, layout: str | None = None,
               store: TrialStore | None = None):
    self.config = config
    self.workdir = workdir
    self.store = store
    self.layout = choose_layout(config.layout if layout is None else layout)
    if self.layout == "measure" and store is not None:
      # Measured once per sweep and kept in the store: every worker and every resumed run
      # then trains the same way, so the results do not depend on a timing.
      self.layout = store.study.user_attrs.get("layout", "measure")
    mesh = None
    shards = config.vectorized.trial_shards
    if self.layout in ("vectorized", "measure") and shards != 1:
      from train import vectorized  # pylint: disable=g-import-not-at-top
      mesh = vectorized.trial_mesh(config.base.mesh, shards or None)
    self.setups = Setups(config, mesh=mesh)
    self.peak = _cpu_peak_flops()

  @property
  def group_size(self) -> int:
    """Trials per claim: 1, or a vectorised program's K (a cell's learning rates)."""
    if self.layout == "sequential":
      return 1
    return self.config.vectorized.max_trials or len(learning_rates(self.config.grid))

  def trial_dir(self, trial) -> str:
    return os.path.join(self.workdir, "trials", str(TrialStore.root(trial)))

  def run(self, trials) -> list[dict | BaseException]:
    points = [Point.from_dict(t.user_attrs["point"]) for t in trials]
    if self.layout == "measure":
      self.layout = self._measure(points[0])
      if self.store is not None:
        with self.store.lock():  # the first worker's measurement stands
          self.layout = self.store.study.user_attrs.get("layout", self.layout)
          self.store.study.set_user_attr("layout", self.layout)
    if self.layout == "vectorized":
      return self._run_vectorized(trials, points)
    return [self._run_one(t, p) for t, p in zip(trials, points)]

  def _run_one(self, trial, point) -> dict | BaseException:
    workdir = self.trial_dir(trial)
    cfg = trial_config(self.config, point, device_peak_flops=self.peak)
    start = time.perf_counter()
    try:
      out = trainer.train(cfg, workdir, setup_=self.setups.for_trial(point, cfg))
    except trainer.NonFiniteLossError as e:
      return trial_result(workdir, "diverged", str(e).split(";")[0],
                          time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001 - recorded as failed and retried
      logging.exception("trial %d failed", trial.number)
      return e
    if out["status"] == "preempted":
      return Preempted()
    return trial_result(workdir, "ok", wall_s=time.perf_counter() - start)

  def _run_vectorized(self, trials, points) -> list[dict | BaseException]:
    from train import vectorized  # pylint: disable=g-import-not-at-top
    cfgs = [trial_config(self.config, p, device_peak_flops=self.peak) for p in points]
    s = self.setups.for_trial(points[0], cfgs[0])  # the group's seed: its data order
    dirs = [self.trial_dir(t) for t in trials]
    start = time.perf_counter()
    try:
      # Padded to the cell's K: groups of any size (the rest of a cell) share one compile.
      outs = vectorized.train_trials(s, cfgs, dirs, pad_to=self.group_size)
    except Exception as e:  # noqa: BLE001
      logging.exception("vectorised trials %s failed", [t.number for t in trials])
      return [e] * len(trials)
    wall = (time.perf_counter() - start) / len(trials)
    results = []
    for out, d in zip(outs, dirs):
      if out["status"] == "preempted":
        results.append(Preempted())
      elif out["status"] == "diverged":
        results.append(trial_result(d, "diverged", out.get("error", ""), wall, "vectorized"))
      else:
        results.append(trial_result(d, "ok", wall_s=wall, layout="vectorized"))
    return results

  def _measure(self, point) -> str:
    from train import vectorized  # pylint: disable=g-import-not-at-top
    k = self.config.vectorized.max_trials or len(learning_rates(self.config.grid))
    times = vectorized.step_times(self.setups.get(point), k, steps=10)
    layout = "vectorized" if times["vectorized"] < times["sequential"] else "sequential"
    logging.info("layout: %s (K=%d steps: sequential %.1f ms, vectorised %.1f ms)", layout, k,
                 1e3 * times["sequential"], 1e3 * times["vectorized"])
    return layout


def choose_layout(layout: str, backend: str | None = None) -> str:
  """'auto' is 'vectorized' on every backend: the layout follows from the config alone.

  A timing must never pick it by default: vectorised and sequential trials differ in float
  rounding (vmap reorders reductions), and at the largest learning rates that difference grows
  into different final losses, so a layout chosen by a race between two timings made the
  same command fit different laws. 'measure' (time both on the first cell, keep the faster)
  stays available as an explicit opt-in; its choice is recorded in the store and the report.
  """
  del backend  # the choice must not depend on the machine's speed or load
  if layout != "auto":
    return layout
  return "vectorized"


# ----------------------------------------------------------------------------------------
# The sweep.


def enable_compilation_cache(config, workdir: str) -> None:
  """Persistent XLA cache (config.compilation_cache_dir; '' = <workdir>/jax_cache): a resumed
  sweep or a second worker skips the compiles. Process-wide, so entry points call it."""
  path = config.compilation_cache_dir
  if path == "none":
    return
  jax.config.update("jax_compilation_cache_dir",
                    path or os.path.join(os.path.abspath(workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def save_config(config, workdir: str) -> None:
  """Writes sweep_config.json; store.storage loses its password (never written to disk)."""
  saved = json.loads(config.to_json_best_effort())
  if (saved.get("store") or {}).get("storage"):
    saved["store"]["storage"] = _without_password(saved["store"]["storage"])
  files.atomic_write(os.path.join(workdir, CONFIG_FILE),
                     json.dumps(saved, indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir}: no {CONFIG_FILE} (not a sweep's workdir; "
                            "pass --config, or --csv to fit imported results).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def enqueue_grid(config, store: TrialStore) -> int:
  points = validate(config)
  extra = {}
  n_cache = {}
  for p in points:
    if p.model not in n_cache:
      n_cache[p.model] = num_params(config, p)
    extra[p.key] = {"N": n_cache[p.model], "seq_len": config.base.seq_len,
                    "steps": num_steps(config, p)}
  return store.enqueue(points, extra)


def run_worker(config, workdir: str, store: TrialStore, *, layout: str | None = None,
               max_trials: int | None = None, wait: bool = True) -> dict[str, int]:
  """Claims and runs trials until none is waiting or running (or max_trials have run).

  With wait=True an idle worker keeps polling while other workers' trials run, so it picks
  up the retry of one whose worker dies.
  """
  runner = Runner(config, workdir, layout, store)
  total = store.progress()["points"]
  ran, start = 0, time.perf_counter()
  while max_trials is None or ran < max_trials:
    store.recover()
    claimed = store.claim(prefer=runner.setups.cells(), group=runner.group_size)
    if not claimed:
      p = store.progress()
      if p["pending"] == 0 or not wait:
        break
      time.sleep(config.store.poll_s)
      continue
    with store.heartbeat(claimed):
      results = runner.run(claimed)
    preempted = False
    for t, r in zip(claimed, results):
      if isinstance(r, Preempted):
        store.fail(t, "preempted (SIGTERM)", count=False)
        preempted = True
      elif isinstance(r, BaseException):
        store.fail(t, f"{type(r).__name__}: {r}"[:2000])
      else:
        store.finish(t, r)
      ran += 1
      p = store.progress()
      elapsed = time.perf_counter() - start
      eta = elapsed / ran * (p["pending"] - p["running"]) if ran else float("nan")
      status = "preempted" if isinstance(r, Preempted) else (
          "failed" if isinstance(r, BaseException) else r["status"])
      loss = "" if not isinstance(r, dict) else f" loss {r['loss']:.4f}"
      logging.info("trial %d %s: %s%s | %d/%d points done, %d failed | ETA %s",
                   TrialStore.root(t), t.user_attrs["key"], status, loss, p["done"], total,
                   p["failed"], _duration(eta))
    if preempted:
      break
  return store.progress()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def irreducible_loss(data_config, chinchilla, rows=()) -> dict | None:
  """The known irreducible loss (markov's entropy rate) beside the fitted E of L(N, D) and
  the best loss the sweep reached; None for corpora whose entropy is unknown."""
  E = data_lib.known_entropy_rate(data_config) if data_config is not None else None
  if E is None:
    return None
  out = {"known_E": E, "source": f"the entropy rate of the {data_config.name} corpus "
                                 "(data/markov.py)"}
  if chinchilla is not None:
    out["fitted_E"] = chinchilla.params["E"]
    out["fitted_E_interval"] = list(chinchilla.intervals["E"])
  ok = [r["loss"] for r in rows if r.get("status") == "ok" and math.isfinite(r["loss"])]
  if ok:
    out["best_loss"] = min(ok)
  return out


def fit_and_report(rows: Sequence[dict], fit_config, out_dir: str, *,
                   data_config=None) -> dict[str, dict]:
  """Fits every law (report.fit_all with `fit_config`) per family and writes the report(s).

  One family (optimizer, schedule, parametrization; imported rows have none): `out_dir/`;
  several: `out_dir/<family>/`. data_config: the corpus, for its known irreducible loss.
  Returns {family: laws}.
  """
  families: dict[str, list] = {}
  for r in rows:
    family = "-".join(str(r[k]) for k in ("optimizer", "schedule", "parametrization") if k in r)
    families.setdefault(family, []).append(r)
  out = {}
  for family, fam_rows in sorted(families.items()):
    laws = report_lib.fit_all(fam_rows, fit_config)
    floor = irreducible_loss(data_config, laws.get("chinchilla"), fam_rows)
    if floor is not None:
      laws["irreducible_loss"] = floor
    target = out_dir if len(families) == 1 else os.path.join(out_dir, family)
    with _report_lock(out_dir):
      report_lib.write_report(fam_rows, laws, target)
    out[family] = laws
  return out


@contextlib.contextmanager
def _report_lock(out_dir: str):
  """Two local workers that finish together write the (identical) report one at a time."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ".lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def sweep_line(url: str, progress: dict, added: int) -> str:
  """The sweep's INFO line; the storage URL's password is masked."""
  p = progress
  return (f"sweep {masked_url(url)}: {p['points']} points ({added} new), {p['done']} done, "
          f"{p['failed']} failed")


def run_sweep(config, workdir: str, *, storage: str | None = None, layout: str | None = None,
              fit: bool = True, max_trials: int | None = None) -> dict[str, Any]:
  """Enqueues the grid (idempotently), runs trials until the sweep is done, fits, reports.

  Safe to run again after any kill, and as several workers at once on one store.
  Returns {'progress': counts, 'laws': {family: laws} (when fitted), 'report': dir}.
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  save_config(config, workdir)
  store = open_store(config, workdir, storage)
  added = enqueue_grid(config, store)
  p = store.progress()
  logging.info(sweep_line(store.url, p, added))
  progress = run_worker(config, workdir, store, layout=layout, max_trials=max_trials)
  out = {"progress": progress}
  if fit and progress["pending"] == 0:
    report_dir = os.path.join(workdir, "report")
    out["laws"] = fit_and_report(store.rows(), config.fit, report_dir,
                                 data_config=config.base.data)
    out["report"] = report_dir
  return out
