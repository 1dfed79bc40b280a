r"""Steps and tokens to a target loss: fixed batch sizes against adaptive batch-size control.

  python -m sweep --config=studies/mccandlish2018_batch_size/config.py:tiny --workdir=/tmp/bs_study
  python -m sweep --config=studies/mccandlish2018_batch_size/config.py:small --workdir=/tmp/bs_small
      (the README's table)

A sweep study (sweep/runner.py): `points(config)` is one trial per run, `analyse(rows, config,
out_dir)` the table and plot. The runs train the LM with several fixed batch sizes (the
steps-versus-examples trade-off of McCandlish et al. 2018, Fig. 3, docs/papers.md §9.8:
S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit)), with the noise-scale controller (batch ∝
B_simple) and with AdAdaGrad's norm test (Lau et al. 2024, §3), all to the same target loss.
Each stops (the trainer's `stop_at_loss`) at the first step whose EMA of the training loss
reaches it, so its stored `steps` and last logged row (`final`) are the steps, tokens and
batch at the target. The learning rate follows the batch through the square-root rule
(Hoffer et al. 2017, §6; Granziol et al. 2022 for Adam, §5) from batch 8. Writes
`batch_size_study.md` (table), `.json` and `.png` (plot) to <workdir>/report/. Config:
studies/mccandlish2018_batch_size/config.py.
"""
from __future__ import annotations

import json
import os

import numpy as np

from laws import critical_batch
from sweep import point as point_lib


def _runs(config) -> list[tuple[str, str, int]]:
  """(run, controller, first batch) of every run: the fixed batches, then the adaptive ones.
  The noise scale needs two micro-batches to measure; the norm test starts at one."""
  runs = [(f"fixed_{b}", "fixed", int(b)) for b in config.fixed]
  return runs + [("noise_scale", "noise_scale", 2 * config.micro),
                 ("norm_test", "norm_test", config.micro)]


def _check(config) -> None:
  """One-line ValueErrors naming the field, before anything compiles."""
  if not config.fixed or any(not isinstance(b, int) or b <= 0 for b in config.fixed):
    raise ValueError(f"config.fixed={config.fixed!r}: need positive integer batch sizes.")
  if not (isinstance(config.micro, int) and config.micro > 0):
    raise ValueError(f"config.micro={config.micro!r}: need an integer > 0.")
  if config.max_batch < 2 * config.micro:
    raise ValueError(f"config.max_batch={config.max_batch}: must be >= 2 x config.micro="
                     f"{2 * config.micro} (the noise-scale run's first batch).")
  if not config.target > 0 or not config.base_lr > 0:
    raise ValueError(f"config.target={config.target}, config.base_lr={config.base_lr}: "
                     "need both > 0.")
  for run, _, batch in _runs(config):
    if config.max_tokens < batch * config.base.seq_len:
      raise ValueError(f"config.max_tokens={config.max_tokens:g} is less than one step of "
                       f"{run} (batch {batch} x seq_len {config.base.seq_len}).")


def overrides(config, controller: str, batch: int) -> dict:
  """The trainer-config overrides of one run (of config.base)."""
  steps = int(config.max_tokens // (config.base.seq_len * batch))
  return {
      # Micro-batches everywhere: the fixed runs log B_simple too (it needs k >= 2).
      "global_batch_size": batch, "micro_batch_size": min(config.micro, batch),
      "num_steps": steps, "max_tokens": int(config.max_tokens), "checkpoint_every": steps,
      "log_every": 1, "schedule.peak_lr": config.base_lr,
      "schedule.batch_size_rule": "sqrt", "schedule.base_batch_size": 8,
      "batch_size.controller": controller, "batch_size.max_batch_size": config.max_batch,
      "batch_size.min_batch_size": 2 * config.micro, "batch_size.adaptive.eta": config.eta,
      "stop_at_loss": config.target if config.stop_at_target else 0.0}


def points(config) -> list[point_lib.Point]:
  """One point per run; they share the compiled init and eval step (one model, AdamW)."""
  _check(config)
  return [point_lib.Point(run, overrides(config, controller, batch), model="lm",
                          row={"run": run, "controller": controller, "batch": batch})
          for run, controller, batch in _runs(config)]


def table_row(row: dict) -> dict:
  """A run's line of the table from its sweep row: steps, tokens and batch at the target
  when it stopped there (None when not reached), its last loss and noise scale."""
  final = row.get("final") or {}
  stopped = row.get("status") == "ok" and bool(row.get("stopped"))
  batch = final.get("batch_size", row["batch"])
  return dict(run=row["run"], steps=int(row["steps"]) if stopped else None,
              tokens=int(final["tokens"]) if stopped else None, final_batch=int(batch),
              final_loss=float(final.get("loss", row["loss"])),
              noise_scale=final.get("noise_scale"), status=row.get("status"))


def analyse(rows, config, out_dir: str) -> dict:
  """The table (batch_size_study.md, .json) and plot (.png) in out_dir, from the rows."""
  order = {run: i for i, (run, _, _) in enumerate(_runs(config))}
  rows = sorted(rows, key=lambda r: order.get(r["run"], len(order)))
  table = [table_row(r) for r in rows]
  fit = write_outputs(table, out_dir, config.target, config.base.seq_len,
                      ema=config.base.stop_loss_ema, n_boot=config.n_boot,
                      stopped=config.stop_at_target)
  out = {"table": table}
  if fit is not None:
    out["fit"] = {k: float(v) for k, v in fit.params.items()}
  return out


def _fit(table, target, n_boot):
  """S = S_min(1 + B_crit/B) through the fixed runs that reached the target (>= 3)."""
  fixed = [r for r in table if r["run"].startswith("fixed") and r["steps"]]
  if len(fixed) < 3:
    return None
  batches = np.array([int(r["run"].split("_")[1]) for r in fixed], float)
  return critical_batch.fit_critical_batch(batches, np.array([r["steps"] for r in fixed], float),
                                           target=target, n_boot=n_boot)


def write_outputs(table, out_dir, target, seq_len, *, ema=0.9, n_boot=200, stopped=True):
  """Writes batch_size_study.{md,json,png} to out_dir; returns the fit (or None)."""
  fit = _fit(table, target, n_boot)
  missing = "not reached" if stopped else "— (stop_at_target off)"
  lines = [f"Target: EMA({ema}) of the training loss ≤ {target} nats/token.\n",
           "| run | steps to target | tokens to target | batch at target | final loss | "
           "B_simple (last) |", "|---|---|---|---|---|---|"]
  for r in table:
    fmt = lambda v, f="{:,}", none=missing: none if v is None else f.format(v)
    lines.append(f"| {r['run']} | {fmt(r['steps'])} | {fmt(r['tokens'])} | {r['final_batch']} "
                 f"| {r['final_loss']:.3f} | {fmt(r['noise_scale'], '{:.1f}', '—')} |")
  if fit is not None:
    p, (lo, hi) = fit.params, fit.intervals["B_crit"]
    lines.append(f"\nFixed-batch fit of S = S_min(1 + B_crit/B) (McCandlish et al. 2018): "
                 f"S_min = {p['S_min']:.0f} steps, B_crit = {p['B_crit']:.1f} sequences "
                 f"(95% interval {lo:.1f}–{hi:.1f}).")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "batch_size_study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "batch_size_study.json"), "w") as f:
    json.dump(table, f, indent=1)
  _plot(table, fit, seq_len, os.path.join(out_dir, "batch_size_study.png"))
  print("\n".join(lines))
  return fit


def _plot(table, fit, seq_len, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in table:
    if r["steps"] is None:
      continue
    fixed = r["run"].startswith("fixed")
    ax.scatter(r["tokens"], r["steps"], marker="o" if fixed else "*", s=40 if fixed else 160,
               label=r["run"], zorder=3)
  if fit is not None:
    b = np.geomspace(1, 4096, 200)
    steps = fit.params["S_min"] * (1 + fit.params["B_crit"] / b)
    ax.plot(steps * b * seq_len, steps, "k--", lw=1, label="fit: (S/S_min−1)(E/E_min−1)=1")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("tokens to target (E)")
  ax.set_ylabel("steps to target (S)")
  ax.set_title("Steps vs. examples to the same loss")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
