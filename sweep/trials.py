"""Running claimed trials: setups shared per cell, the layouts, the stored results.

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

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

from models import flops as flops_lib
from sweep import grid
from sweep import store as store_lib
from train import tasks as tasks_lib
from train import trainer

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

  def get(self, point: grid.Point) -> trainer.Setup:
    if point.cell in self._cells:
      self._cells[point.cell] = self._cells.pop(point.cell)  # most recently used last
      return self._cells[point.cell]
    cfg = grid.trial_config(self.config, dataclasses.replace(point, lr=1.0))
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

  def for_trial(self, point: grid.Point, trial_cfg) -> trainer.Setup:
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
               store: store_lib.TrialStore | None = None):
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
    return self.config.vectorized.max_trials or len(grid.learning_rates(self.config.grid))

  def trial_dir(self, trial) -> str:
    return os.path.join(self.workdir, "trials", str(store_lib.TrialStore.root(trial)))

  def run(self, trials) -> list[dict | BaseException]:
    points = [grid.Point.from_dict(t.user_attrs["point"]) for t in trials]
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
    cfg = grid.trial_config(self.config, point, device_peak_flops=self.peak)
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
    cfgs = [grid.trial_config(self.config, p, device_peak_flops=self.peak) for p in points]
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
    k = self.config.vectorized.max_trials or len(grid.learning_rates(self.config.grid))
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
