r"""Hoffer et al. 2017 ("Train longer, generalize better") on digits as a sweep study: does
the recipe close the large-batch generalisation gap?

  python -m sweep --config=studies/hoffer2017_train_longer/config.py --workdir=/tmp/hoffer

Three points of the config's `base` (ResNet-8, width 8, SGD momentum 0.9; docs/papers.md §6):
  hoffer_small   batch B0 = 16 for 16 epochs (1437 steps), lr 0.05;
  hoffer_large   batch 256 for the same 16 epochs (89 steps), same lr, plain BN;
  hoffer_recipe  batch 256 with sqrt LR scaling (lr 0.05 x sqrt(256/16) = 0.2), ghost BN
                 (g = 16), regime adaptation (1437 steps, as many as the small batch) and
                 gradient clipping at norm 5.
Each point is one trial in the sweep's store: the driver's workers, retries and resume apply
(re-running the command never re-runs a finished run; a killed one is retried, from scratch:
each run checkpoints only at its end, as before). `analyse` writes report/hoffer.md, a markdown table of the final test accuracy
(all 360 test images), test loss and steps, and logs it. Any run's field:
`--config.ghost_batch_size=32` (the recipe), `--config.base.optimizer.weight_decay=1e-3` (all).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from absl import logging

from optimizers import schedules
from studies.hoffer2017_train_longer import config as study_config
from sweep import point as point_lib
from train import files

REPORT = "hoffer.md"


def check(config) -> None:
  """One-line ValueError naming the field, before anything compiles."""
  unknown = [r for r in config.runs if r not in study_config.RUNS]
  if unknown or not config.runs:
    raise ValueError(f"config.runs={tuple(config.runs)!r}: choose from {study_config.RUNS}")
  for name in ("small_batch", "large_batch"):
    if not (isinstance(config[name], int) and config[name] > 0):
      raise ValueError(f"config.{name}={config[name]!r}: need an integer > 0")
  if not config.epochs > 0:
    raise ValueError(f"config.epochs={config.epochs!r}: need > 0")
  g = config.ghost_batch_size
  if "hoffer_recipe" in config.runs and not (g > 0 and config.large_batch % g == 0):
    raise ValueError(f"config.ghost_batch_size={g!r} must divide config.large_batch="
                     f"{config.large_batch} (the recipe's ghost batches)")
  try:
    schedules.batch_size_exponent(config.batch_size_rule)
  except ValueError as e:
    raise ValueError(f"config.batch_size_rule={config.batch_size_rule!r}: {e}") from None


def run_fields(config, run: str) -> dict[str, Any]:
  """The trainer-config fields (dotted paths) that make `run`; the rest is config.base.

  The recipe (Hoffer et al. §4) takes the small batch's steps (regime adaptation), the
  sqrt lr rule, ghost BN and clipping; the plain runs keep the base's BN, rule and clipping.
  """
  recipe = run == "hoffer_recipe"
  batch = config.small_batch if run == "hoffer_small" else config.large_batch
  steps = study_config.num_steps(config.epochs, config.small_batch if recipe else batch)
  fields = {"variant": run, "global_batch_size": batch, "num_steps": steps,
            "schedule.total_steps": steps, "eval_every": steps, "checkpoint_every": steps,
            "log_every": max(1, steps // 10), "schedule.base_batch_size": config.small_batch}
  if recipe:
    fields.update({"model.ghost_batch_size": config.ghost_batch_size,
                   "schedule.batch_size_rule": config.batch_size_rule,
                   "optimizer.grad_clip_norm": config.grad_clip_norm})
  return fields


def _base_value(base, path: str):
  node = base
  for name in path.split("."):
    node = node[name]
  return node


def effective_lr(trial) -> float:
  """Peak lr after the batch-size rule: peak x (B / B0)^p (Hoffer et al. §4: p = 1/2)."""
  s = trial.schedule
  p = schedules.batch_size_exponent(s.batch_size_rule)
  return s.peak_lr * (trial.global_batch_size / s.base_batch_size) ** p if p else s.peak_lr


def points(config) -> list[point_lib.Point]:
  """One point per run of config.runs: its differences from config.base as overrides."""
  check(config)
  base = config.base.copy_and_resolve_references()
  out = []
  for run in config.runs:
    overrides = {k: v for k, v in run_fields(config, run).items()
                 if _base_value(base, k) != v}
    p = point_lib.Point(run, overrides, lr_scale=base.lr_scale, seed=base.seed)
    trial = point_lib.trial_config(config, p)
    row = {"run": run, "batch_size": trial.global_batch_size,
           "ghost_batch_size": trial.model.ghost_batch_size or trial.global_batch_size,
           "peak_lr": effective_lr(trial) * trial.lr_scale}
    out.append(point_lib.Point(run, overrides, lr_scale=p.lr_scale, seed=p.seed, row=row))
  return out


def _cells(r: dict) -> list[str]:
  """One row's table cells; a run that diverged or failed shows its status as its accuracy
  ('n/a': finished without an eval_accuracy in its final metrics)."""
  final = r.get("final") or {}
  accuracy = final.get("eval_accuracy")
  ok = r.get("status") == "ok" and accuracy is not None
  steps = r.get("steps")
  epochs = f"{steps * r['batch_size'] / study_config.DIGITS_TRAIN:.1f}" if steps else "-"
  loss = r.get("loss", math.nan)
  wall = r.get("wall_s")
  return [r["run"], str(r["batch_size"]), str(steps if steps is not None else "-"), epochs,
          f"{r['peak_lr']:.3g}", str(r["ghost_batch_size"]),
          f"{accuracy:.3f}" if ok else ("n/a" if r.get("status") == "ok" else r["status"]),
          f"{loss:.3f}" if math.isfinite(loss) else "-",
          f"{wall:.0f} s" if wall is not None else "-"]


def markdown(rows: Sequence[dict]) -> str:
  """The table: one line per run, in the order of config.runs."""
  lines = ["| run | batch | steps | epochs | peak lr | BN batch | test accuracy | test loss "
           "| time |", "|---|---|---|---|---|---|---|---|---|"]
  lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
  return "\n".join(lines)


def analyse(rows: Sequence[dict], config, out_dir: str) -> dict[str, dict]:
  """Writes out_dir/hoffer.md (the table) and logs it; returns {run: accuracy, loss,
  steps, status}. rows: sweep/store.py rows (final = the last logged row's metrics)."""
  order = {run: i for i, run in enumerate(config.runs)}
  rows = sorted((r for r in rows if r.get("run") in order), key=lambda r: order[r["run"]])
  table = markdown(rows)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, REPORT)
  files.atomic_write(path, table + "\n")
  logging.info("Hoffer et al. 2017 on digits (%s):\n%s", path, table)
  return {r["run"]: {"accuracy": (r.get("final") or {}).get("eval_accuracy"),
                     "loss": r.get("loss"), "steps": r.get("steps"), "status": r["status"]}
          for r in rows}
