"""Metrics out: metrics.jsonl, TensorBoard events and a progress line, from process 0."""
from __future__ import annotations

import json
import math
import os
import time

import jax
from absl import logging


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter from orbax/grain so the progress line stays readable."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname
    return not (noisy and record.levelno < logging.logging.WARNING)


logging.get_absl_logger().addFilter(_QuietLibraries())


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def tb_tag(key: str) -> str:
  """TensorBoard tag of a metrics key: eval_loss -> eval/loss, loss -> train/loss."""
  if key.startswith("eval_"):
    return "eval/" + key[len("eval_"):]
  return "train/" + key


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without rows past `step` (and any line cut short by a kill)."""
  if not os.path.exists(path):
    return
  kept, changed = [], False
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = line.endswith("\n") and int(row["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line)
      else:
        changed = True
  if not changed:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsLogger:
  """Writes the same scalars to metrics.jsonl and TensorBoard; prints a progress line.

  resume_step: the step the run (re)starts from (its checkpoint's step S, 0 for a fresh run).
  Rows logged after S by a killed process are dropped from metrics.jsonl (rewritten aside,
  then os.replace) and from TensorBoard (the writer opens with purge_step=S+1), so each step
  is there once. None leaves both as they are. TensorBoard tags are grouped: train/<key>, and
  eval/<name> for eval_<name> keys. Events are flushed at every write, so a kill loses none.
  """

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool | None = None,
               resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        _drop_rows_after(path, resume_step)
      self._jsonl = open(path, "a", buffering=1)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(tb_tag(k), v, row["step"])
      self._tb.flush()

  def progress(self, m: dict, seconds_per_step: float) -> None:
    if not self.enabled:
      return
    eta = (self.total_steps - m["step"]) * seconds_per_step
    parts = [f"step {m['step']}/{self.total_steps}", f"loss {m['loss']:.4f}"]
    if "eval_loss" in m:
      parts.append(f"eval {m['eval_loss']:.4f} ({m['eval_bits_per_byte']:.3f} bpb)")
    parts += [f"lr {m['lr']:.3g}", f"bs {m['batch_size']}",
              f"{m['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in m:
      parts.append(f"MFU {100 * m['mfu']:.1f}%")
    if "noise_scale" in m:
      parts.append(f"B_simple {m['noise_scale']:.3g}")
    parts.append(f"ETA {_fmt_duration(eta)}")
    logging.info(" | ".join(parts))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class StepTimer:
  """Wall time per step over the last logging window."""

  def __init__(self):
    self._t, self._steps = time.perf_counter(), 0

  def tick(self) -> None:
    self._steps += 1

  @property
  def steps(self) -> int:
    return self._steps

  def lap(self) -> float:
    now = time.perf_counter()
    per_step = (now - self._t) / max(self._steps, 1)
    self._t, self._steps = now, 0
    return per_step


def read_rows(workdir: str) -> dict[int, dict]:
  """A run's metrics.jsonl by step, for notebooks and tests (the loop returns its results
  forward; nothing in the library re-reads this). A line cut short by a kill is skipped."""
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
