"""The training loop, for one trial or for K trials of one compiled program at once.

  outs = loop.run(setup, [loop.Trial(config, workdir), ...])

With one trial this is a plain training run (`loop.train`): fixed or adaptive batch size,
evals, checkpoints, resume, `init_from`, preemption. With K trials the state gets a leading
trial axis and the step is `jax.vmap`ed over it (train/vectorized.py): the trials share the
program (model, batch size, schedule shape, data order) and differ only in runtime inputs,
the learning-rate multiplier `lr_scale`. Either way each trial keeps its own workdir
(checkpoints/, metrics.jsonl, config.json), so a trial can be resumed alone or in any group
whose members stand at the same step, and each returns its result forward:

  {'status': 'done' | 'diverged' | 'preempted' | 'stopped', 'step', 'error' (diverged),
   last logged metrics..., 'curve': {'steps': [...], 'losses': [...]}}

`curve` is the eval loss at every evaluated step of the whole run, and the last metrics are
the last logged row; both are kept in the checkpoints' metadata, so a resumed run returns
the steps before its restart too (and a finished run resumed returns its result again);
nothing re-reads metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from batch_size import controllers as bs_lib
from models import flops as flops_lib
from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import preemption as preemption_lib
from train import resume as resume_lib
from train import tasks as tasks_lib
from train import trainer
from train import vectorized

# Fields the loop reads on the host and never compiles into a step: trials of one program
# may differ in them (lr_scale and seed are runtime inputs of the step and of init). A field
# that a compiled one references (schedule.total_steps -> num_steps) is compared as itself.
TRIAL_FIELDS = ("lr_scale", "seed", "num_steps", "max_tokens", "eval_every", "eval_steps",
                "eval_batches", "eval_batch_size", "log_every", "checkpoint_every",
                "keep_checkpoints", "async_checkpointing", "nan_policy", "loss_bound",
                "device_peak_flops", "init_from", "resume_allow_changes", "variant",
                "stop_at_loss", "stop_loss_ema")
# Fields every trial of a vectorised group shares: the group runs one loop over them.
SHARED_FIELDS = ("num_steps", "max_tokens", "global_batch_size", "seed", "eval_every",
                 "eval_steps", "eval_batches", "eval_batch_size", "log_every",
                 "checkpoint_every", "loss_bound")


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of a program: its full config and the workdir its outputs go to."""
  config: ml_collections.ConfigDict
  workdir: str


def program_key(config) -> str:
  """The config hash without TRIAL_FIELDS: trials of one program have the same key."""
  fields = json.loads(config.to_json_best_effort(sort_keys=True))
  for key in TRIAL_FIELDS:
    fields.pop(key, None)
  return resume_lib.hash_fields(fields)


def vectorised(trials, pad_to: int) -> bool:
  """Whether the trials train through the vmapped step: K > 1, or one trial of a group padded
  to pad_to (a trial keeps the program it started in, so its float rounding, on resume)."""
  return len(trials) > 1 or pad_to > 1


def check_trials(s: trainer.Program, trials, pad_to: int = 0) -> None:
  """Raises ValueError unless `trials` can run in `s`'s program (together, when K > 1)."""
  key = program_key(s.config)
  for t in trials:
    if program_key(t.config) != key:
      diff = resume_lib.differing_fields(s.config, t.config, ignore=TRIAL_FIELDS)
      raise ValueError(f"a trial's config differs from its program's in {', '.join(diff)}; "
                       "trials of one program may differ only in host-side fields "
                       f"({', '.join(TRIAL_FIELDS)}).")
  if not vectorised(trials, pad_to):
    return
  for key in SHARED_FIELDS:
    values = {repr(t.config.get(key)) for t in trials}
    if len(values) > 1:
      raise ValueError(f"vectorised trials must share config.{key}; got {sorted(values)}")
  if s.adaptive:
    raise ValueError("vectorised trials need config.batch_size.controller='fixed'")


class _Sink:
  """One trial's outputs: checkpoints, metrics log, its last row, eval curve and status."""

  def __init__(self, trial: Trial):
    cfg = trial.config
    self.trial, self.hash = trial, resume_lib.config_hash(cfg)
    self.checkpointer = ckpt_lib.Checkpointer(os.path.join(trial.workdir, "checkpoints"),
                                              keep=cfg.keep_checkpoints,
                                              async_save=cfg.async_checkpointing)
    self.logger = None
    self.curve = _empty_curve()
    self.last: dict = {}
    self.status, self.error, self.stopped_at = "running", "", None
    self.loss_ema = None

  @property
  def alive(self) -> bool:
    return self.status == "running"

  def open_log(self, step: int) -> None:
    self.logger = metrics_lib.MetricsLogger(self.trial.workdir,
                                            total_steps=self.trial.config.num_steps,
                                            resume_step=step)

  def diverge(self, step: int, msg: str) -> None:
    self.checkpointer.wait()  # the save in flight is the last good checkpoint: finish it
    good = self.checkpointer.latest_step()
    kept = (f"the last good checkpoint (step {good}) is kept" if good is not None
            else "no checkpoint was written yet")
    self.status, self.stopped_at = "diverged", step
    self.error = f"{msg}; {kept}. Lower the learning rate or set config.nan_policy='skip'."

  def reached_target(self, loss: float) -> bool:
    """config.stop_at_loss: the EMA of the logged training loss is at or below it (the EMA
    restarts on resume, so a resumed run may stop a few steps later)."""
    cfg = self.trial.config
    if not cfg.get("stop_at_loss"):
      return False
    decay = cfg.get("stop_loss_ema", 0.9)
    self.loss_ema = loss if self.loss_ema is None else decay * self.loss_ema + (1 - decay) * loss
    return self.loss_ema <= cfg.stop_at_loss

  def record_eval(self, step: int, loss: float) -> None:
    self.curve = {"steps": self.curve["steps"] + [step],
                  "losses": self.curve["losses"] + [loss if math.isfinite(loss) else None]}

  def save(self, step, state, data_it, meta) -> None:
    self.checkpointer.save(step, state, data_it, dict(meta, config_hash=self.hash,
                                                      curve=self.curve, last=self.last),
                           force=True)

  def close(self) -> None:
    self.checkpointer.close()
    if self.logger is not None:
      self.logger.close()

  def result(self, step: int, control) -> dict:
    status = "done" if self.status == "running" else self.status
    out = dict(self.last, status=status, step=self.stopped_at or step, curve=self.curve,
               batch_history=bs_lib.history_entries(jax.device_get(control.history)))
    if status == "diverged":
      out["error"] = self.error
    return out


def _empty_curve() -> dict:
  return {"steps": [], "losses": []}


def _resume_or_init(s, trials, sinks, data_it, stack):
  """(step, state, meta): every trial's checkpoint at one step, init_from, or a fresh init."""
  restored = [k.checkpointer.restore(s.abstract_state, data_it)
              if k.checkpointer.all_steps() else None for k in sinks]
  cfg = trials[0].config
  meta = {"tokens": 0, "examples": 0}
  if any(restored):
    for sink, r in zip(sinks, restored):  # a finished run resumed returns its result again
      sink.curve = r[2].get("curve") or _empty_curve()
      sink.last = dict(r[2].get("last") or {})
    meta = {k: restored[0][2][k] for k in ("tokens", "examples")}
    states = [r[1] for r in restored]
    logging.info("resumed from step %d in %s", int(states[0]["step"]), trials[0].workdir)
    state = stack(states) if stack else states[0]
  elif cfg.init_from:
    # A new phase of an earlier run (e.g. BERT's long-sequence phase): its params, optimizer
    # state, step and token count carry over; the data pipeline and batch control start fresh.
    source = ckpt_lib.Checkpointer(os.path.join(cfg.init_from, "checkpoints"), async_save=False)
    _, state, old_meta = source.restore(s.abstract_state, None)
    source.close()
    state = dict(state, control=trainer.init_state(s, cfg.seed)["control"])
    meta.update(tokens=old_meta["tokens"], examples=old_meta["examples"])
    logging.info("initialised from step %d of %s", int(state["step"]), cfg.init_from)
  else:
    state = trainer.init_state(s, cfg.seed)
  return int(jax.device_get(state["step"]).reshape(-1)[0]), state, meta


def _write_configs(trials, sinks) -> None:
  """config.json per trial, after the resume check; declared changes go to the history."""
  for t, sink in zip(trials, sinks):
    steps = sink.checkpointer.all_steps()
    changes = resume_lib.check_resume_config(t.config, t.workdir, steps)
    if jax.process_index() != 0:
      continue
    if changes:
      with open(os.path.join(t.workdir, resume_lib.CONFIG_HISTORY), "a") as f:
        f.write(json.dumps({"time": time.time(), "step": steps[-1], "changes": changes},
                           sort_keys=True) + "\n")
      logging.info("resuming with declared config changes: %s", changes)
    with open(os.path.join(t.workdir, "config.json"), "w") as f:
      f.write(t.config.to_json_best_effort(indent=2, sort_keys=True))


def _checkpoint_steps(trials) -> dict[int, list[int]]:
  """Trial indices by the step their newest checkpoint stands at."""
  by_step: dict[int, list[int]] = {}
  for i, t in enumerate(trials):
    c = ckpt_lib.Checkpointer(os.path.join(t.workdir, "checkpoints"), async_save=False)
    by_step.setdefault(c.latest_step() or 0, []).append(i)
    c.close()
  return by_step


def _divergence(row: dict, finite: bool, step: int, loss_bound) -> str:
  """Why a step's row ends its trial ('' when it does not)."""
  if not finite:
    return (f"non-finite loss or gradient at step {step} (loss={row['loss']}, "
            f"grad_norm={row['grad_norm']})")
  if loss_bound and row["loss"] > loss_bound:
    return f"loss {row['loss']:.4f} above config.loss_bound={loss_bound} at step {step}"
  return ""


def _pull(item, sinks, loss_bound) -> None:
  """Host side of a finished step (pulled one step late so the device stays busy)."""
  p_step, p_metrics, p_flags, p_meta = item
  m, flags = jax.device_get((p_metrics, p_flags))
  m = {key: np.asarray(v).reshape(-1) for key, v in m.items()}
  finite = np.asarray(flags["finite"]).reshape(-1)
  for i, sink in enumerate(sinks):
    if not sink.alive:
      continue
    row = {key: v[i].item() for key, v in m.items()}
    if not math.isfinite(row.get("noise_scale", math.nan)):
      row.pop("noise_scale", None)
    msg = _divergence(row, bool(finite[i]), p_step, loss_bound)
    if msg and (finite[i] or sink.trial.config.nan_policy == "stop"):
      sink.diverge(p_step, msg)
      continue
    if msg:
      logging.warning("%s: update skipped (config.nan_policy='skip')", msg)
    row.update(step=p_step, **p_meta)
    sink.last = row


def _timing(s, timer, window_examples, peak, k) -> dict:
  steps_in_window = timer.steps
  dt = timer.lap()
  examples_per_s = window_examples / (dt * max(steps_in_window, 1))
  out = {"step_time_s": dt, "tokens_per_s": examples_per_s * s.task.tokens_per_example}
  if peak:
    out["mfu"] = k * examples_per_s * s.task.flops_per_example / s.mesh.size / peak
  if k > 1:
    out["trials"] = k
  return out


def _write_rows(sinks, step, state, data_it, meta, flags, extra, evals, step_fn, hooks):
  """Logs, evaluates, checkpoints and runs the hooks for every live trial at `step`."""
  is_log, is_eval, is_ckpt = flags
  for i, sink in enumerate(sinks):
    if not sink.alive:
      continue
    row = sink.last
    row.update(extra)
    row.update({key: float(np.reshape(v, -1)[i]) for key, v in evals.items()})
    if is_eval:
      sink.record_eval(step, row["eval_loss"])
    if is_log or is_eval:
      sink.logger.write(row)
      if is_log and len(sinks) == 1:
        sink.logger.progress(row, row.get("step_time_s", 0.0))
    # A hook that returns True ends the trial here, as config.stop_at_loss does.
    stop = any([bool(hook(step, row)) for hook in hooks])
    if is_log and sink.reached_target(row["loss"]):
      stop = True
    if is_ckpt or stop:
      sink.save(step, step_fn.trial_state(state, i), data_it, meta)
    if stop:
      sink.status, sink.stopped_at = "stopped", step


def _loop(s, trials, sinks, step_fn, state, step, meta, data_it, hooks):
  """Steps until num_steps (or max_tokens), every trial diverged or stopped, or SIGTERM."""
  cfg = trials[0].config
  peak = flops_lib.peak_flops(cfg.device_peak_flops)
  timer = metrics_lib.StepTimer()
  eval_steps = frozenset(cfg.get("eval_steps") or ())  # extra evals (sweeps: log-spaced)
  pending, window_examples, compiling = None, 0, True

  def finished() -> bool:
    return step >= cfg.num_steps or bool(cfg.max_tokens and meta["tokens"] >= cfg.max_tokens)

  with preemption_lib.Preemption() as preemption:
    while not finished() and any(sink.alive for sink in sinks):
      batch_size = step_fn.batch_size
      lr_inputs = {"step": np.int32(step), "tokens": np.float32(meta["tokens"]),
                   "batch_size": np.float32(batch_size), "lr_scale": step_fn.lr_scale}
      state, metrics, flags = step_fn(state, data_it, lr_inputs)
      step += 1
      preemption.check(step)
      meta["tokens"] += batch_size * s.task.tokens_per_example
      meta["examples"] += batch_size
      window_examples += batch_size
      timer.tick()
      if pending is not None:
        _pull(pending, sinks, cfg.loss_bound)
      if compiling:  # the first step compiled: keep it out of the throughput
        jax.block_until_ready(flags)
        timer.lap()
        window_examples, compiling = 0, False
      pending = (step, metrics, flags, dict(meta, batch_size=batch_size))
      last_step = finished()
      is_log = step % cfg.log_every == 0 or last_step or step in eval_steps
      is_eval = bool((cfg.eval_every and (step % cfg.eval_every == 0 or last_step))
                     or step in eval_steps)
      is_ckpt = step % cfg.checkpoint_every == 0 or last_step or preemption.requested
      if not (is_log or is_eval or is_ckpt):
        continue
      _pull(pending, sinks, cfg.loss_bound)
      pending = None
      extra = _timing(s, timer, window_examples, peak, step_fn.num_trials) if is_log else {}
      window_examples = 0 if is_log else window_examples
      evals = step_fn.evaluate(state) if is_eval else {}
      _write_rows(sinks, step, state, data_it, meta, (is_log, is_eval, is_ckpt), extra, evals,
                  step_fn, hooks)
      if is_log and step_fn.num_trials > 1:
        _log_group(sinks, step, cfg.num_steps, extra["step_time_s"])
      if is_ckpt and preemption.requested:  # a SIGTERM after is_ckpt is saved next step
        logging.warning("SIGTERM: checkpoint written at step %d; exiting", step)
        for sink in sinks:
          if sink.alive:
            sink.status = "preempted"
  if pending is not None:
    _pull(pending, sinks, cfg.loss_bound)
  return state, step


def _log_group(sinks, step, total, dt) -> None:
  live = [k.last["loss"] for k in sinks if k.alive]
  if live:
    logging.info("%d trials | step %d/%d | loss %.4f-%.4f | %d diverged | %.1f ms/step",
                 len(sinks), step, total, min(live), max(live),
                 sum(k.status == "diverged" for k in sinks), 1e3 * dt)


def _start(s, trials, pad_to):
  """Sinks, step function, data iterator and (step, state, meta) of one group of trials."""
  for t in trials:
    os.makedirs(t.workdir, exist_ok=True)
  sinks = [_Sink(t) for t in trials]
  try:  # before the restore, and before config.json is overwritten
    _write_configs(trials, sinks)
  except ValueError:
    for sink in sinks:
      sink.checkpointer.close()
    raise
  data_it = s.task.train_iterator(s.micro_batch_size, *trainer.data_shard(s, s.micro_batch_size),
                                  seed=trials[0].config.seed)
  vec = (vectorized.TrialSteps(s, [t.config for t in trials], pad_to)
         if vectorised(trials, pad_to) else None)
  step, state, meta = _resume_or_init(s, trials, sinks, data_it,
                                      vec.stack_states if vec else None)
  if vec is not None and not any(k.checkpointer.all_steps() for k in sinks):
    state = vec.stack_init(state)
  step_fn = vec or trainer.StepRunner(s, state, trials[0].config.lr_scale)
  for sink in sinks:
    sink.open_log(step)
  return sinks, step_fn, data_it, (step, state, meta)


def run(s: trainer.Program, trials, *, hooks=(), pad_to: int = 0) -> list[dict]:
  """Trains `trials` (one, or K together) of Program `s` to their num_steps; see the module doc.

  Trials whose checkpoints stand at different steps run in groups that do. pad_to: K > 1
  groups train at least this many trials (copies of the last, discarded) so groups of any
  size share one compile. `hooks` are called as hook(step, row) for every trial's logged
  row; one that returns True stops that trial there, with a checkpoint ('stopped').
  """
  trials = list(trials)
  check_trials(s, trials, pad_to)
  tasks_lib.check_eval_split(trials[0].config, s.task)
  by_step = _checkpoint_steps(trials) if len(trials) > 1 else {0: [0]}
  if len(by_step) > 1:
    outs = [None] * len(trials)
    for idx in by_step.values():
      for i, out in zip(idx, run(s, [trials[i] for i in idx], hooks=hooks, pad_to=pad_to)):
        outs[i] = out
    return outs
  sinks, step_fn, data_it, (step, state, meta) = _start(s, trials, pad_to)
  try:
    state, step = _loop(s, trials, sinks, step_fn, state, step, meta, data_it, hooks)
  finally:
    for sink in sinks:
      sink.close()
  return [sink.result(step, step_fn.trial_state(state, i)["control"])
          for i, sink in enumerate(sinks)]


def train(config, workdir: str, *, setup_=None, hooks=()) -> dict:
  """One run to config.num_steps, resuming from workdir; returns its result (module doc).

  A non-finite loss (config.nan_policy='stop') or one above config.loss_bound raises
  NonFiniteLossError after keeping the checkpoints.
  """
  s = setup_ or trainer.setup(config)
  out = run(s, [Trial(config, workdir)], hooks=hooks)[0]
  if out["status"] == "diverged":
    raise trainer.NonFiniteLossError(out["error"])
  return out
