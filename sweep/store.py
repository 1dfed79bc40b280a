"""The sweep's trial store: enqueue, claim, heartbeat, finish, retry.

Optuna's RDB storage (SQLite in the workdir by default, PostgreSQL for workers on
many machines) holds one trial per sweep point, enqueued once: a point's `key` is stored with
it and a re-run enqueues only the keys it lacks (under a file lock on SQLite; on a shared
server a racing duplicate is noticed when claimed and pruned). Workers claim WAITING trials
with Optuna's atomic WAITING -> RUNNING transition, so no trial runs twice at once, write a
heartbeat while running, and finish with COMPLETE (status 'ok' or 'diverged') or FAIL. A
trial that raised, or whose worker died (stale heartbeat, or on this host a dead pid), is
re-queued as a new WAITING trial with the same key, up to `store.max_retries` times, in the
convention of `optuna.storages.RetryHeartbeatStaleTrialCallback` (system attrs
`failed_trial` = the first attempt's number, `retry_history`). Every attempt of a point trains
in `trials/<first attempt's number>/`, so a retried trial resumes from its checkpoint.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import threading
from typing import Iterable, Sequence

import optuna
from absl import logging

from sweep import grid
from sweep import point as point_lib

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


def without_password(url: str) -> str:
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
    if env and without_password(env) == without_password(url):
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
    """The number of the first attempt of this trial's point."""
    return trial.system_attrs.get("failed_trial", trial.number)

  def chains(self) -> dict[str, list]:
    """key -> the attempts of its point, oldest first (duplicates left out)."""
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
    """One row per finished point, sorted by key: key, trial, attempts, the point's row (for
    the grid, report.fit_all's format), then status, loss, curve, steps, wall_s, layout,
    final (the last logged row's metrics) and stopped (at config.stop_at_loss)."""
    rows = []
    for key, chain in sorted(self.chains().items()):
      outcome = self.outcome(chain)
      if outcome == "pending":
        continue
      last = chain[-1]
      if outcome == "done":
        last = next(t for t in chain if t.state == optuna.trial.TrialState.COMPLETE)
      point = read_point(last.user_attrs["point"])
      row = dict(key=key, trial=self.root(last), attempts=len(chain), **point.row)
      if outcome == "done":
        result = last.user_attrs["result"]
        row.update(status=result["status"], loss=result["loss"], curve=result["curve"],
                   steps=result["steps"], wall_s=result.get("wall_s"),
                   layout=result.get("layout"), final=result.get("final", {}),
                   stopped=result.get("stopped", False))
        if result.get("error"):
          row["error"] = result["error"]
      else:
        row.update(status="failed", loss=float("nan"),
                   error=last.user_attrs.get("error", "failed"))
      rows.append(row)
    return rows

  # -- writing

  def enqueue(self, points: Iterable[point_lib.Point],
              extra: dict[str, dict] | None = None) -> int:
    """Adds a WAITING trial for every point the study lacks; returns how many were added.
    (Anything with a key and to_dict will do: the grid's own points are read back too.)"""
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
          read_point(t.user_attrs["point"]).cell not in prefer, t.number))
      claimed = []
      for t in waiting:
        point = read_point(t.user_attrs["point"])
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


def read_point(stored: dict, config=None) -> point_lib.Point:
  """A stored point as a sweep point; one in the grid's own format is converted (its
  overrides need the sweep config)."""
  if "overrides" in stored:
    return point_lib.Point.from_dict(stored)
  return grid.legacy_point(stored, config)


def open_store(config, workdir: str, storage: str | None = None) -> TrialStore:
  s = config.store
  return TrialStore(storage or storage_url(config, workdir), s.study_name,
                    heartbeat_s=int(s.heartbeat_s), grace_s=int(s.grace_s),
                    max_retries=int(s.max_retries))
