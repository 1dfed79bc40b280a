"""Sweeps as a library: the driver (enqueue, workers, analysis).

  config = configs.sweep.get_config('tiny')
  summary = run_sweep(config, '/tmp/sweep')    # trains what is left, fits, reports
  rows = sweep.store.open_store(config, '/tmp/sweep').rows()  # one dict per point

A sweep trains a list of points (sweep/point.py: trainer-config overrides under a key) and
analyses their rows. `config.study` names the module that supplies them:

  points(config) -> list[sweep.point.Point]     # checks the config (one-line ValueError)
  analyse(rows, config, out_dir) -> dict        # once every point is done or failed

Without one ('' or absent) the points are the scaling-law grid (`sweep.grid`) and the
analysis is the law fits and report (`fit_and_report`). The trial store is `sweep.store`,
running trials `sweep.trials`.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
from absl import logging

import data as data_lib
from laws import report as report_lib
from sweep import grid
from sweep import point as point_lib
from sweep import store as store_lib
from sweep import trials as trials_lib
from train import files

CONFIG_FILE = "sweep_config.json"


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
    saved["store"]["storage"] = store_lib.without_password(saved["store"]["storage"])
  files.atomic_write(os.path.join(workdir, CONFIG_FILE),
                     json.dumps(saved, indent=2, sort_keys=True))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir}: no {CONFIG_FILE} (not a sweep's workdir; "
                            "pass --config, or --csv to fit imported results).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def study(config):
  """config.study's module (it supplies points and analyse), or None: the scaling-law grid."""
  name = config.get("study", "")
  return importlib.import_module(name) if name else None


def points(config) -> list[point_lib.Point]:
  """The sweep's points, checked before anything compiles (grid.points without a study)."""
  point_lib.check_runtime(config)
  s = study(config)
  return s.points(config) if s is not None else grid.points(config)


def enqueue(config, store: store_lib.TrialStore) -> int:
  return store.enqueue(points(config))


def analyse(rows: Sequence[dict], config, out_dir: str) -> dict:
  """The study's analyse(rows, config, out_dir); without a study, the law fits and report."""
  s = study(config)
  if s is not None:
    return s.analyse(rows, config, out_dir)
  return fit_and_report(rows, config.fit, out_dir, data_config=config.base.data)


def _runner_config(config, sweep_points):
  """config with vectorized.max_trials = the largest group when 0 (a whole cell)."""
  if config.vectorized.max_trials:
    return config
  c = config.copy_and_resolve_references()
  c.vectorized.max_trials = point_lib.group_size(sweep_points)
  return c


def run_worker(config, workdir: str, store: store_lib.TrialStore, *, layout: str | None = None,
               max_trials: int | None = None, wait: bool = True) -> dict[str, int]:
  """Claims and runs trials until none is waiting or running (or max_trials have run).

  With wait=True an idle worker keeps polling while other workers' trials run, so it picks
  up the retry of one whose worker dies.
  """
  runner = trials_lib.Runner(_runner_config(config, points(config)), workdir, layout, store)
  total = store.progress()["points"]
  ran, start = 0, time.perf_counter()
  while max_trials is None or ran < max_trials:
    store.recover()
    claimed = store.claim(prefer=runner.cells(), group=runner.group_size)
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
      if isinstance(r, trials_lib.Preempted):
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
      status = "preempted" if isinstance(r, trials_lib.Preempted) else (
          "failed" if isinstance(r, BaseException) else r["status"])
      loss = "" if not isinstance(r, dict) else f" loss {r['loss']:.4f}"
      logging.info("trial %d %s: %s%s | %d/%d points done, %d failed | ETA %s",
                   store_lib.TrialStore.root(t), t.user_attrs["key"], status, loss, p["done"],
                   total, p["failed"], _duration(eta))
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
  return (f"sweep {store_lib.masked_url(url)}: {p['points']} points ({added} new), "
          f"{p['done']} done, {p['failed']} failed")


def run_sweep(config, workdir: str, *, storage: str | None = None, layout: str | None = None,
              fit: bool = True, max_trials: int | None = None) -> dict[str, Any]:
  """Enqueues the points (idempotently), runs trials until the sweep is done, analyses.

  Safe to run again after any kill, and as several workers at once on one store.
  Returns {'progress': counts, 'report': dir, and when analysed: 'laws': {family: laws}
  (the grid) or 'analysis': what the study's analyse returned}.
  """
  points(config)
  os.makedirs(workdir, exist_ok=True)
  save_config(config, workdir)
  store = store_lib.open_store(config, workdir, storage)
  added = enqueue(config, store)
  p = store.progress()
  logging.info(sweep_line(store.url, p, added))
  progress = run_worker(config, workdir, store, layout=layout, max_trials=max_trials)
  out = {"progress": progress}
  if fit and progress["pending"] == 0:
    report_dir = os.path.join(workdir, "report")
    out["analysis" if study(config) else "laws"] = analyse(store.rows(), config, report_dir)
    out["report"] = report_dir
  return out
