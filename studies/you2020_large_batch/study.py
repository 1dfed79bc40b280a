r"""Large-batch study as a sweep: final eval loss of AdamW, LAMB and LARS against batch size.

  nice -n 5 python -m sweep \
      --config=studies/you2020_large_batch/config.py:cpu --workdir=/tmp/large_batch

You et al. 2020 §4 (docs/papers.md §1.4) on a decoder LM: a fixed token budget per run, so larger
batches take proportionally fewer steps; the square-root lr rule from the base batch B0; linear
warmup then polynomial decay. The sweep (sweep/runner.py) trains `points`: every optimizer at
every batch size with base_lr x each of `lr_check_factors`. The factors of one optimizer and
batch size differ only in the trainer's runtime `lr_scale`, so they share one compiled step
(one vectorised program). `analyse` then reads the results in two stages:
  1. lr check: every optimizer at B0 with each factor; the best factor per optimizer.
  2. batch sweep: every optimizer at every batch size with its best factor.
Writes to <workdir>/report/: results.json (one record per run the tables use),
large_batch.md (the tables) and large_batch.png (the plot); each run's metrics.jsonl,
config and final checkpoint are in <workdir>/trials/<record's trial>/.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Sequence

import ml_collections

from train import files
from optimizers import factory
from optimizers import schedules
from sweep import point as point_lib

NAMES = {"adamw": "AdamW", "lamb": "LAMB", "lars": "LARS"}


# ----------------------------------------------------------------------------------------------
# Run configs (pure)
# ----------------------------------------------------------------------------------------------

def validate(study) -> None:
  """One-line ValueError naming the field, before anything compiles."""
  for name in study.optimizers:
    if name not in factory.OPTIMIZERS or name not in study.optimizer:
      valid = [n for n in factory.OPTIMIZERS if n in study.optimizer]
      raise ValueError(f"config.optimizers: {name!r} is not valid; choose from {valid}")
    if not (study.base_lr.get(name) or 0) > 0:
      raise ValueError(f"config.base_lr.{name}={study.base_lr.get(name)!r}: need a peak lr > 0 "
                       f"for every optimizer in config.optimizers")
  if not study.batch_sizes or any(not isinstance(b, int) or b <= 0 for b in study.batch_sizes):
    raise ValueError(f"config.batch_sizes={study.batch_sizes!r}: need positive integers")
  if not (isinstance(study.base_batch_size, int) and study.base_batch_size > 0):
    raise ValueError(f"config.base_batch_size={study.base_batch_size!r}: need an integer > 0")
  if study.lr_check_factors and study.base_batch_size not in study.batch_sizes:
    raise ValueError(f"config.base_batch_size={study.base_batch_size} is not in "
                     f"config.batch_sizes={study.batch_sizes}: the lr check runs at B0")
  if any(not f > 0 for f in study.lr_check_factors):
    raise ValueError(f"config.lr_check_factors={study.lr_check_factors!r}: need factors > 0")
  mb = study.micro_batch_size
  for b in study.batch_sizes:
    if mb and b % min(mb, b):
      raise ValueError(f"config.micro_batch_size={mb} does not divide batch size {b} "
                       "(config.batch_sizes)")
    if study.tokens_per_run < b * study.seq_len:
      raise ValueError(f"config.tokens_per_run={study.tokens_per_run} is less than one step "
                       f"of batch {b} x config.seq_len={study.seq_len}")
  if not 0 <= study.warmup_fraction < 1:
    raise ValueError(f"config.warmup_fraction={study.warmup_fraction!r}: need 0 <= f < 1")
  schedules.batch_size_exponent(study.batch_size_rule)  # raises on a bad rule


def num_steps(study, batch_size: int) -> int:
  """Steps that spend the token budget at this batch size."""
  return max(1, study.tokens_per_run // (batch_size * study.seq_len))


def warmup_steps(study, batch_size: int) -> int:
  """warmup_fraction of the run, times (B/B0)^warmup_batch_exponent (LEGW when 1)."""
  steps = num_steps(study, batch_size)
  frac = study.warmup_fraction * (batch_size / study.base_batch_size) ** study.warmup_batch_exponent
  return min(steps - 1, max(1, round(frac * steps))) if frac > 0 and steps > 1 else 0


def peak_lr(study, optimizer: str, batch_size: int, factor: float = 1.0) -> float:
  """base_lr x factor x (B/B0)^p: the schedule's peak at batch size B (docs/papers.md §5, §6)."""
  p = schedules.batch_size_exponent(study.batch_size_rule)
  return study.base_lr[optimizer] * factor * (batch_size / study.base_batch_size) ** p


def run_config(study, optimizer: str, batch_size: int, factor: float = 1.0,
               device_peak_flops: float = 0.0) -> ml_collections.ConfigDict:
  """The trainer config of one run: `base` (lm.py `lm_variant`) with the study's budget and
  schedule.

  The lr factor goes into the runtime `lr_scale` (runs differing only in it share a compiled
  step); the sqrt rule is the schedule's own `batch_size_rule` from `base_lr` at B0.
  """
  c = copy.deepcopy(study.base)  # keeps its references: schedule.total_steps -> num_steps
  c.model.update(study.model.to_dict())
  steps = num_steps(study, batch_size)
  c.seq_len = study.seq_len
  c.seed = study.seed
  c.global_batch_size = batch_size
  c.micro_batch_size = min(study.micro_batch_size, batch_size) if study.micro_batch_size else 0
  c.num_steps = steps  # schedule.total_steps follows (a reference to num_steps)
  c.eval_every = steps
  c.eval_batches = study.eval_batches
  c.eval_batch_size = study.eval_batch_size
  c.log_every = max(1, steps // 4)
  c.checkpoint_every = steps
  c.keep_checkpoints = 1
  c.loss_bound = study.loss_bound
  c.device_peak_flops = device_peak_flops
  c.lr_scale = float(factor)
  c.optimizer = study.optimizer[optimizer].copy_and_resolve_references()
  s = c.schedule
  s.name = "warmup_poly"
  s.peak_lr = study.base_lr[optimizer]
  s.warmup_steps = warmup_steps(study, batch_size)
  s.poly_power = study.poly_power
  s.final_lr = study.final_lr
  s.batch_size_rule = study.batch_size_rule
  s.base_batch_size = study.base_batch_size
  assert s.total_steps == steps
  return c


def run_key(optimizer: str, batch_size: int, factor: float) -> str:
  return f"{optimizer}/b{batch_size}_x{factor:.4g}"


# ----------------------------------------------------------------------------------------------
# As a sweep: points and analyse
# ----------------------------------------------------------------------------------------------

def points(study) -> list[point_lib.Point]:
  """Every optimizer x batch size x lr factor (1 without a check), as sweep points."""
  validate(study)
  out = []
  for o in study.optimizers:
    for b in study.batch_sizes:
      for f in tuple(study.lr_check_factors) or (1.0,):
        c = run_config(study, o, b, f)
        row = dict(optimizer=o, batch_size=b, factor=f, num_steps=c.num_steps,
                   warmup_steps=c.schedule.warmup_steps,
                   tokens=c.num_steps * b * study.seq_len, peak_lr=peak_lr(study, o, b, f))
        out.append(point_lib.Point(run_key(o, b, f), point_lib.overrides(study.base, c),
                                   lr_scale=f, seed=study.seed, row=row))
  return out


def _record(study, row: dict) -> dict:
  """A sweep row as the record the tables read (status 'done' | 'diverged' | 'failed')."""
  final = row.get("final") or {}
  done = row["status"] == "ok"
  check = row["batch_size"] == study.base_batch_size and row["factor"] in study.lr_check_factors
  return dict(
      key=row["key"], trial=row["trial"], stage="lr check" if check else "sweep",
      optimizer=row["optimizer"], batch_size=row["batch_size"], factor=row["factor"],
      steps=row["num_steps"], warmup_steps=row["warmup_steps"], tokens=row["tokens"],
      peak_lr=row["peak_lr"], status="done" if done else row["status"],
      error=row.get("error", ""), wall_s=row.get("wall_s") or 0.0,
      eval_loss=final.get("eval_loss", row["loss"]) if done else None,
      train_loss=final.get("loss"), tokens_per_s=final.get("tokens_per_s"))


def _loss(record) -> float:
  v = record.get("eval_loss")
  return v if record["status"] == "done" and v is not None and math.isfinite(v) else math.inf


def best_factor(records: Sequence[dict]) -> float:
  """Factor of the lowest final eval loss (1.0 if every run diverged)."""
  best = min(records, key=_loss, default=None)
  return best["factor"] if best is not None and math.isfinite(_loss(best)) else 1.0


def analyse(rows: Sequence[dict], study, out_dir: str) -> dict:
  """The lr check and the batch sweep from the sweep's rows; writes results.json, the tables
  and the plot to out_dir. Returns {'check': [records], 'sweep': [records], 'factors':
  {optimizer: factor}, 'wall_s': training seconds of every run}."""
  records = {r["key"]: _record(study, r) for r in rows}
  check = [records[run_key(o, study.base_batch_size, f)] for o in study.optimizers
           for f in study.lr_check_factors]
  factors = {o: best_factor([r for r in check if r["optimizer"] == o]) if check else 1.0
             for o in study.optimizers}
  sweep = [records[run_key(o, b, factors[o])] for o in study.optimizers
           for b in study.batch_sizes]
  out = {"check": check, "sweep": sweep, "factors": factors,
         "wall_s": round(sum(r["wall_s"] for r in records.values()), 1)}
  os.makedirs(out_dir, exist_ok=True)
  used = {r["key"]: r for r in check + sweep}
  files.atomic_write(os.path.join(out_dir, "results.json"),
                     json.dumps(list(used.values()), indent=1))
  plot(sweep, os.path.join(out_dir, "large_batch.png"),
       title=f"lm.py:{study.lm_variant}, {study.tokens_per_run:,} tokens per run, "
             f"{study.batch_size_rule} lr rule")
  with open(os.path.join(out_dir, "large_batch.md"), "w") as f:
    f.write(markdown(study, out, plots=("large_batch.png",), runs=len(records)))
  return out


# ----------------------------------------------------------------------------------------------
# Tables and plot
# ----------------------------------------------------------------------------------------------

def _fmt(v, spec=".4f") -> str:
  return "-" if v is None or not math.isfinite(v) else format(v, spec)


def _cell(r) -> str:
  if r["status"] != "done":
    return f"{r['status']} (lr {r['peak_lr']:.3g})"
  return f"{_fmt(r['eval_loss'])} (lr {r['peak_lr']:.3g})"


def sweep_table(study, sweep: Sequence[dict]) -> str:
  """Rows: batch sizes; columns: optimizers; cells: final eval loss (peak lr)."""
  opts = [o for o in study.optimizers]
  by = {(r["optimizer"], r["batch_size"]): r for r in sweep}
  lines = ["| batch (seqs) | steps | warmup | " + " | ".join(
      f"{NAMES.get(o, o)} eval loss (peak lr)" for o in opts) + " |",
           "|---:|---:|---:|" + "---|" * len(opts)]
  for b in sorted(study.batch_sizes):
    rows = [by.get((o, b)) for o in opts]
    first = next(r for r in rows if r is not None)
    lines.append(f"| {b} | {first['steps']} | {first['warmup_steps']} | "
                 + " | ".join("" if r is None else _cell(r) for r in rows) + " |")
  return "\n".join(lines)


def check_table(study, check: Sequence[dict], factors: dict) -> str:
  """Rows: optimizers; columns: lr factors; the chosen factor in bold."""
  fs = list(study.lr_check_factors)
  lines = [f"| optimizer (B0 = {study.base_batch_size}) | " + " | ".join(
      f"x{f:.3g}" for f in fs) + " | chosen peak lr at B0 |", "|---|" + "---|" * (len(fs) + 1)]
  for o in study.optimizers:
    cells = []
    for f in fs:
      r = next((r for r in check if r["optimizer"] == o and r["factor"] == f), None)
      text = "" if r is None else f"lr {r['peak_lr']:.3g}: " + (
          _fmt(r["eval_loss"]) if r["status"] == "done" else r["status"])
      cells.append(f"**{text}**" if f == factors[o] else text)
    lines.append(f"| {NAMES.get(o, o)} | " + " | ".join(cells)
                 + f" | {peak_lr(study, o, study.base_batch_size, factors[o]):.3g} |")
  return "\n".join(lines)


def markdown(study, out: dict, plots: Sequence[str] = (), runs: int = 0) -> str:
  p = schedules.batch_size_exponent(study.batch_size_rule)
  m = study.model.to_dict()
  parts = [
      "# Large-batch study: final eval loss against batch size\n",
      f"lm.py:{study.lm_variant}" + (f" with model {m}" if m else "")
      + f", sequence {study.seq_len}, {study.tokens_per_run:,} tokens per run; peak lr = "
      f"base x (B/{study.base_batch_size})^{p:g}; {study.warmup_fraction:.0%} linear warmup "
      f"then power-{study.poly_power:g} decay to {study.final_lr:g}. Eval loss in nats per "
      f"token on {study.eval_batches} x {study.eval_batch_size} held-out sequences.\n",
  ]
  if out["check"]:
    parts += ["## lr check at the base batch size\n", check_table(study, out["check"],
                                                                   out["factors"]), ""]
  parts += ["## Batch sweep\n", sweep_table(study, out["sweep"]), ""]
  parts += [f"![]({name})" for name in plots]
  parts.append(f"\n{runs} runs, {out['wall_s']:.0f} s of training (compilation included)\n")
  return "\n".join(parts)


def plot(sweep: Sequence[dict], path: str, title: str = "") -> None:
  """Final eval loss against batch size (log2 axis), one line per optimizer."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(6, 4.2), dpi=120)
  ax = fig.add_subplot()
  for o in dict.fromkeys(r["optimizer"] for r in sweep):
    rows = sorted((r for r in sweep if r["optimizer"] == o), key=lambda r: r["batch_size"])
    ok = [r for r in rows if math.isfinite(_loss(r))]
    line, = ax.plot([r["batch_size"] for r in ok], [r["eval_loss"] for r in ok], "o-",
                    label=NAMES.get(o, o))
    bad = [r for r in rows if not math.isfinite(_loss(r))]
    if bad and ok:
      ax.plot([r["batch_size"] for r in bad], [max(_loss(r) for r in ok)] * len(bad), "x",
              color=line.get_color(), markersize=9, label=f"{NAMES.get(o, o)} diverged")
  ax.set_xscale("log", base=2)
  sizes = sorted({r["batch_size"] for r in sweep})
  ax.set_xticks(sizes, [str(b) for b in sizes])
  ax.minorticks_off()
  ax.set_xlabel("batch size (sequences); fixed token budget")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
