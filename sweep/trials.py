"""Running claimed trials: one compiled program per cell, the layouts, the stored results.

Compiles. Trials that differ only in learning rate (and seed) share one `trainer.Program`
(train/programs.py) whose schedule has peak_lr = 1: the trial's lr is the runtime
`lr_scale`. Programs of the same model and optimizer (other B or D) also share the compiled
init and eval step, so a sweep compiles one train step per (N, D, B) cell. Workers prefer
trials of cells they have compiled.

Layouts. Both run the one training loop (`train.loop.run`): 'sequential' with one trial at
a time, 'vectorized' with the learning rates of one cell together (`train.vectorized`);
'measure' times both on the first cell and keeps the faster for the whole sweep (recorded
in the store); 'auto' is vectorised on every backend (see `choose_layout`).
"""
from __future__ import annotations

import math
import os
import time

from absl import logging

from models import flops as flops_lib
from sweep import point as point_lib
from sweep import store as store_lib
from train import loop
from train import programs as programs_lib

# The last logged row's fields a study's analysis may read (the rest stay in metrics.jsonl).
FINAL_FIELDS = ("loss", "eval_loss", "tokens", "examples", "batch_size", "noise_scale",
                "grad_norm", "lr", "eval_accuracy", "step_time_s", "tokens_per_s", "mfu")


def trial_result(out: dict, wall_s: float, layout: str) -> dict:
  """The stored result of a trial from what the training loop returned (train/loop.py).

  loss: the final eval loss ('ok': the run finished, or stopped at config.stop_at_loss; its
  last training loss when it has no eval), or the last finite training loss ('diverged');
  curve: the eval loss at every evaluated step (log-spaced, for the critical batch fit);
  final: the last logged row's FINAL_FIELDS; stopped: whether it stopped at its target.
  """
  ok = out["status"] in ("done", "stopped")
  loss = out.get("eval_loss", out.get("loss", math.nan)) if ok else out.get("loss", math.nan)
  final = {k: float(out[k]) for k in FINAL_FIELDS if isinstance(out.get(k), (int, float))}
  return {"status": "ok" if ok else "diverged", "loss": float(loss), "steps": out["step"],
          "curve": out["curve"], "error": out.get("error", "").split(";")[0],
          "wall_s": round(wall_s, 3), "layout": layout, "final": final,
          "stopped": out["status"] == "stopped", "batch_history": out.get("batch_history", [])}


class Preempted(Exception):
  """SIGTERM: the trial checkpointed and stopped; re-queue it without using a retry."""




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
    self.programs = programs_lib.Programs(mesh)
    self._cells: list[str] = []
    self.peak = flops_lib.peak_flops() or 0.0  # measured once per worker on CPU

  @property
  def group_size(self) -> int:
    """Trials per claim: 1, or a vectorised program's K (a cell's learning rates)."""
    if self.layout == "sequential":
      return 1
    return self.config.vectorized.max_trials  # the largest group (sweep/runner.py)

  def trial_dir(self, trial) -> str:
    return os.path.join(self.workdir, "trials", str(store_lib.TrialStore.root(trial)))

  def run(self, trials) -> list[dict | BaseException]:
    points = [store_lib.read_point(t.user_attrs["point"], self.config) for t in trials]
    if self.layout == "measure":
      self.layout = self._measure(points[0])
      if self.store is not None:
        with self.store.lock():  # the first worker's measurement stands
          self.layout = self.store.study.user_attrs.get("layout", self.layout)
          self.store.study.set_user_attr("layout", self.layout)
    if self.layout == "vectorized":
      return self._run_vectorized(trials, points)
    return [self._run_one(t, p) for t, p in zip(trials, points)]

  def program(self, point: point_lib.Point):
    """The compiled program of a point's cell (lr- and seed-free: runtime inputs)."""
    self._cells = [c for c in self._cells if c != point.cell][-7:] + [point.cell]
    return self.programs.get(point_lib.trial_config(self.config, point), same_init=point.model)

  def cells(self) -> list[str]:
    """The cells whose programs were compiled last (a worker claims their trials first)."""
    return list(self._cells)

  def _run_one(self, trial, point) -> dict | BaseException:
    return self._run_group([trial], [point], "sequential")[0]

  def _run_vectorized(self, trials, points) -> list[dict | BaseException]:
    return self._run_group(trials, points, "vectorized")

  def _run_group(self, trials, points, layout: str) -> list[dict | BaseException]:
    """Trains the trials of one cell through the one loop (K = 1, or K vectorised)."""
    cfgs = [point_lib.trial_config(self.config, p, device_peak_flops=self.peak) for p in points]
    runs = [loop.Trial(c, self.trial_dir(t)) for c, t in zip(cfgs, trials)]
    start = time.perf_counter()
    try:
      # Padded to the cell's K: groups of any size (the rest of a cell) share one compile.
      outs = loop.run(self.program(points[0]), runs,
                      pad_to=self.group_size if layout == "vectorized" else 0)
    except Exception as e:  # noqa: BLE001 - recorded as failed and retried
      logging.exception("trials %s failed", [t.number for t in trials])
      return [e] * len(trials)
    wall = (time.perf_counter() - start) / len(trials)
    return [Preempted() if out["status"] == "preempted" else trial_result(out, wall, layout)
            for out in outs]

  def _measure(self, point) -> str:
    from train import vectorized  # pylint: disable=g-import-not-at-top
    k = self.group_size
    times = vectorized.step_times(self.program(point), k, steps=10)
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
