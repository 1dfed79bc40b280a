"""K trials of one sweep cell in one jitted program: `jax.vmap` of the train step.

The trials share a `trainer.Setup` (model, batch size, schedule shape) and differ only in
runtime hyperparameters, here the learning-rate multiplier `lr_scale` (the trial's peak lr,
the Setup's schedule having peak 1). The state gets a leading trial axis [K, ...]; every
trial sees the same batches (common random numbers) from the same initialisation (one seed),
so differences between trials are the learning rate's alone.

  outs = train_trials(setup, configs, workdirs)   # one config and workdir per trial

Each trial keeps its own trainer-format workdir (checkpoints/, metrics.jsonl), so a trial can
be resumed by `trainer.train` or vectorised again, in any grouping whose members stand at the
same step. A trial that diverges (NaN/inf, or loss above config.loss_bound) is recorded at
that step and stops logging; the others go on (its update is dropped as in the trainer).

Sharding the trial axis: build the Setup on `trial_mesh(...)`, a mesh with a leading `trials`
axis; the stacked state is then split over it (spmd_axis_name), each group of devices
training its trials with the model's own data/fsdp/tensor layout inside.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import tasks as tasks_lib
from train import trainer
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib

TRIALS = "trials"


def trial_mesh(mesh_config, trial_shards: int | None = None, devices=None) -> jax.sharding.Mesh:
  """(trials, data, fsdp, tensor, sequence) mesh: trial_shards groups (None: one per device),
  each laid out by mesh_config over its share of the devices."""
  devices = list(jax.devices() if devices is None else devices)
  shards = trial_shards or len(devices)
  if shards < 1 or len(devices) % shards:
    raise ValueError(f"config.vectorized.trial_shards={trial_shards}: must divide the "
                     f"{len(devices)} devices.")
  sizes = mesh_lib.resolve_mesh_shape(mesh_config, len(devices) // shards)
  shape = (shards,) + tuple(sizes[a] for a in mesh_lib.MESH_AXES)
  names = (TRIALS,) + mesh_lib.MESH_AXES
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), names,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _trial_axis(s: trainer.Setup) -> str | None:
  return TRIALS if TRIALS in s.mesh.axis_names else None


def num_trial_shards(s: trainer.Setup) -> int:
  return s.mesh.shape[TRIALS] if _trial_axis(s) else 1


def stacked_shardings(s: trainer.Setup):
  """The state's shardings with a leading trial axis (split over `trials` when present)."""
  axis = _trial_axis(s)
  return jax.tree.map(lambda sh: NamedSharding(s.mesh, P(axis, *sh.spec)), s.state_shardings)


def _in_mesh(s: trainer.Setup, fn):
  def wrapped(*args):
    with jax.set_mesh(s.mesh), rules_lib.axis_rules(s.rules):
      return fn(*args)
  return wrapped


def make_steps(s: trainer.Setup, k: int) -> dict:
  """Jitted {'train', 'eval', 'stack'} for k trials, compiled once per (Setup, k).

  train(state_K, batch, lr_inputs) -> (state_K, metrics_K): lr_inputs['lr_scale'] is [k],
  the other positions shared; eval(state_K, batch) -> per-trial sums; stack(state) -> k
  copies of one state.
  """
  key = ("vectorized", k)
  if key in s.compiled:
    return s.compiled[key]
  axis = _trial_axis(s)
  stacked = stacked_shardings(s)
  per_trial = NamedSharding(s.mesh, P(axis))
  replicated = NamedSharding(s.mesh, P())
  lr_axes = {"step": None, "tokens": None, "batch_size": None, "lr_scale": 0}
  lr_sh = {"step": replicated, "tokens": replicated, "batch_size": replicated,
           "lr_scale": per_trial}
  train = jax.vmap(trainer.train_step_fn(s), in_axes=(0, None, lr_axes),
                   spmd_axis_name=axis)

  def eval_one(state, batch):
    model = nnx.merge(s.graphdef, state["params"], state["rest"])
    model.eval()
    return s.task.eval_fn(model, batch)

  evaluate_k = jax.vmap(eval_one, in_axes=(0, None), spmd_axis_name=axis)

  def stack(state):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), state)

  steps = {
      "train": jax.jit(train, in_shardings=(stacked, trainer.batch_shardings(s, (None,)), lr_sh),
                       out_shardings=(stacked, per_trial), donate_argnums=(0,)),
      "eval": jax.jit(evaluate_k, in_shardings=(stacked, trainer.batch_shardings(s)),
                      out_shardings=per_trial),
      "stack": jax.jit(stack, in_shardings=(s.state_shardings,), out_shardings=stacked),
  }
  s.compiled[key] = {name: _in_mesh(s, fn) for name, fn in steps.items()}
  return s.compiled[key]


def evaluate(s: trainer.Setup, eval_k, state_K) -> dict[str, np.ndarray]:
  """trainer.evaluate for k trials at once: {'eval_loss': [k], ...}."""
  cfg = s.config
  it = s.task.eval_iterator(cfg.eval_batch_size, *trainer.data_shard(s, cfg.eval_batch_size))
  sums = None
  for _, local in zip(range(cfg.eval_batches), it):
    out = eval_k(state_K, trainer.global_micro_batch(s, local, cfg.eval_batch_size))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  loss = np.asarray(sums["loss_sum"] / sums["count"], np.float64)
  result = {"eval_loss": loss, "eval_bits_per_byte": loss * s.task.bits_per_byte_factor}
  for key, value in sums.items():
    if key.endswith("_sum") and key != "loss_sum":
      result["eval_" + key[:-4]] = np.asarray(value / sums["count"], np.float64)
  return result


def _check_cell(configs) -> None:
  same = ("num_steps", "global_batch_size", "seed", "seq_len", "eval_batches",
          "eval_batch_size", "log_every", "checkpoint_every", "loss_bound")
  for key in same:
    values = {repr(c.get(key)) for c in configs}
    if len(values) > 1:
      raise ValueError(f"vectorised trials must share config.{key}; got {sorted(values)}")
  if configs[0].batch_size.controller != "fixed":
    raise ValueError("vectorised trials need config.batch_size.controller='fixed'")


def _restore(s, checkpointers, data_it):
  """(step, [state_k], meta) when every trial stands at one step; None when they differ."""
  steps = [c.all_steps() for c in checkpointers]
  if not any(steps):
    return 0, None, {"tokens": 0, "examples": 0}
  restored = [c.restore(s.abstract_state, data_it) if c.all_steps() else None
              for c in checkpointers]
  at = {r[0] if r else 0 for r in restored}
  if len(at) > 1:
    return None
  return at.pop(), [r[1] for r in restored], restored[0][2]


def train_trials(s: trainer.Setup, configs, workdirs, *, pad_to: int = 0) -> list[dict]:
  """Trains len(configs) trials of Setup `s` together; resumes from their workdirs.

  configs differ only in lr_scale. Returns per trial {'status': 'done' | 'diverged' |
  'preempted', 'step', 'loss', 'eval_loss' (when done), 'error' (when diverged)}. Trials whose
  checkpoints stand at different steps are split into groups that do. pad_to: train at least
  this many (copies of the last trial, discarded) so groups of any size share one compile;
  the trial axis is also padded to a multiple of its shards.
  """
  _check_cell(configs)
  tasks_lib.check_eval_split(configs[0], s.task)
  shards = num_trial_shards(s)
  pad = max(pad_to - len(configs), 0)
  pad += -(len(configs) + pad) % shards  # the trial axis must divide its devices
  cfgs = list(configs) + [configs[-1]] * pad
  k = len(cfgs)
  cfg = configs[0]
  for d in workdirs:
    os.makedirs(d, exist_ok=True)
  checkpointers = [ckpt_lib.Checkpointer(os.path.join(d, "checkpoints"),
                                         keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpointing) for d in workdirs]
  data_it = s.task.train_iterator(s.micro_batch_size,
                                  *trainer.data_shard(s, s.micro_batch_size))
  restored = _restore(s, checkpointers, data_it)
  if restored is None:
    for c in checkpointers:
      c.close()
    by_step: dict[int, list[int]] = {}
    for i, d in enumerate(workdirs):
      c = ckpt_lib.Checkpointer(os.path.join(d, "checkpoints"), async_save=False)
      by_step.setdefault(c.latest_step() or 0, []).append(i)
      c.close()
    outs = [None] * len(configs)
    for idx in by_step.values():
      for i, out in zip(idx, train_trials(s, [configs[i] for i in idx],
                                          [workdirs[i] for i in idx], pad_to=pad_to)):
        outs[i] = out
    return outs

  step, states, meta = restored
  steps = make_steps(s, k)
  if states is None:
    state = steps["stack"](trainer.init_state(s, cfg.seed))
  else:
    states = states + [states[-1]] * pad
    state = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                           stacked_shardings(s))
  for i, d in enumerate(workdirs):
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(configs[i].to_json_best_effort(indent=2, sort_keys=True))

  n = len(configs)
  total = cfg.num_steps
  batch_size = cfg.global_batch_size
  tokens_per_step = batch_size * s.task.tokens_per_example
  lr_scale = np.asarray([c.lr_scale for c in cfgs], np.float32)
  eval_at = set(cfg.get("eval_steps") or ()) | {total}
  loggers = [metrics_lib.MetricsLogger(d, total_steps=total, resume_step=step)
             for d in workdirs]
  hashes = [trainer.config_hash(c) for c in configs]
  outs = [{"status": "done", "step": step} for _ in range(n)]
  alive = np.ones(n, bool)
  last: list[dict] = [{} for _ in range(n)]
  pending = None
  timer, window_start = time.perf_counter(), step

  def pull(item):
    """Host side of a finished step: divergence check and each live trial's metrics."""
    p_step, p_metrics, p_meta = item
    m = jax.device_get(p_metrics)
    for i in np.flatnonzero(alive):
      row = {key: np.asarray(v)[i].item() for key, v in m.items()}
      finite = bool(row.pop("finite"))
      row.pop("next_microbatches", None)
      if not np.isfinite(row.get("noise_scale", np.nan)):
        row.pop("noise_scale", None)
      if not finite or (cfg.loss_bound and row["loss"] > cfg.loss_bound):
        msg = (f"non-finite loss or gradient at step {p_step} (loss={row['loss']})"
               if not finite else
               f"loss {row['loss']:.4f} above config.loss_bound={cfg.loss_bound} at step "
               f"{p_step}")
        outs[i] = {"status": "diverged", "step": p_step, "error": msg,
                   "loss": last[i].get("loss", float("nan"))}
        alive[i] = False
        continue
      row.update(step=p_step, **p_meta)
      last[i] = row

  with trainer._Preemption() as sigterm:
    while step < total and alive.any():
      lr_inputs = {"step": np.int32(step), "tokens": np.float32(meta["tokens"]),
                   "batch_size": np.float32(batch_size), "lr_scale": lr_scale}
      batch = trainer.global_batch(s, [next(data_it) for _ in range(s.num_microbatches)])
      state, metrics = steps["train"](state, batch, lr_inputs)
      step += 1
      meta["tokens"] += tokens_per_step
      meta["examples"] += batch_size
      if pending is not None:
        pull(pending)
      pending = (step, metrics, {"tokens": meta["tokens"], "examples": meta["examples"],
                                 "batch_size": batch_size})
      is_log = step % cfg.log_every == 0 or step == total
      is_eval = step in eval_at or (cfg.eval_every and step % cfg.eval_every == 0)
      is_ckpt = step % cfg.checkpoint_every == 0 or step == total or sigterm.requested
      if not (is_log or is_eval or is_ckpt):
        continue
      pull(pending)
      pending = None
      evals = evaluate(s, steps["eval"], state) if is_eval else {}
      if is_log:
        dt = (time.perf_counter() - timer) / max(step - window_start, 1)
        timer, window_start = time.perf_counter(), step
      for i in np.flatnonzero(alive):
        row = dict(last[i], **{key: float(v[i]) for key, v in evals.items()})
        last[i] = row
        if is_log:
          row.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt, trials=n)
        if is_log or is_eval:
          loggers[i].write(row)
        if is_ckpt:
          checkpointers[i].save(step, jax.tree.map(lambda x, i=i: x[i], state), data_it,
                                dict(meta, config_hash=hashes[i]), force=True)
      if is_log and alive.any():
        live = [last[i]["loss"] for i in np.flatnonzero(alive)]
        logging.info("%d trials | step %d/%d | loss %.4f-%.4f | %d diverged | %.1f ms/step",
                     n, step, total, min(live), max(live), n - alive.sum(), 1e3 * dt)
      if sigterm.requested:
        logging.warning("SIGTERM: checkpoints written at step %d; exiting", step)
        for i in np.flatnonzero(alive):
          outs[i] = {"status": "preempted", "step": step}
        alive[:] = False
  if pending is not None:
    pull(pending)
  for c in checkpointers:
    c.close()
  for log in loggers:
    log.close()
  for i in range(n):
    if outs[i]["status"] == "done":
      outs[i] = dict(last[i], status="done", step=step)
  return outs


def step_times(s: trainer.Setup, k: int, steps: int = 10) -> dict[str, float]:
  """Seconds per step of k trials: k sequential jitted steps against one vectorised step
  (after a compile and warm-up step of each). Random tokens, fixed positions."""
  single = trainer.make_train_step(s)
  vec = make_steps(s, k)
  data_it = s.task.train_iterator(s.micro_batch_size, *trainer.data_shard(s, s.micro_batch_size))
  batch = trainer.global_batch(s, [next(data_it) for _ in range(s.num_microbatches)])
  lr = {"step": np.int32(10), "tokens": np.float32(0),
        "batch_size": np.float32(s.config.global_batch_size)}
  states = [trainer.init_state(s, 0) for _ in range(k)]
  stacked = vec["stack"](trainer.init_state(s, 0))
  lr_k = dict(lr, lr_scale=np.full(k, 1e-3, np.float32))
  lr_1 = dict(lr, lr_scale=np.float32(1e-3))

  def run_sequential():
    out = None
    for i in range(k):
      states[i], out = single(states[i], batch, lr_1)
    return out

  def run_vectorized():
    nonlocal stacked
    stacked, out = vec["train"](stacked, batch, lr_k)
    return out

  times = {}
  for name, fn in (("sequential", run_sequential), ("vectorized", run_vectorized)):
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    times[name] = (time.perf_counter() - start) / steps
  return times
