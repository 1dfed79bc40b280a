"""K trials of one program in one jitted step: `jax.vmap` of the train step over a trial axis.

The trials share a `trainer.Program` (model, batch size, schedule shape) and differ only in
runtime hyperparameters, here the learning-rate multiplier `lr_scale` (the trial's peak lr,
the Program's schedule having peak 1). The state gets a leading trial axis [K, ...]; every
trial sees the same batches (common random numbers) from the same initialisation (one seed),
so differences between trials are the learning rate's alone. The loop is train/loop.py's,
the same one a single run uses; this module only supplies the vmapped steps (`TrialSteps`):

  outs = loop.run(setup, [loop.Trial(config, workdir) for ...])   # K > 1: TrialSteps

Sharding the trial axis: build the Program on `trial_mesh(...)`, a mesh with a leading `trials`
axis; the stacked state is then split over it (spmd_axis_name), each group of devices
training its trials with the model's own data/fsdp/tensor layout inside.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train import trainer
from sharding import mesh as mesh_lib

TRIALS = mesh_lib.TRIALS


def trial_mesh(mesh_config, trial_shards: int | None = None, devices=None) -> jax.sharding.Mesh:
  """(trials, data, fsdp, tensor, sequence) mesh: trial_shards groups (None: one per device),
  each laid out by mesh_config over its share of the devices (sharding/mesh.py)."""
  devices = list(jax.devices() if devices is None else devices)
  return mesh_lib.make_mesh(mesh_config, devices, trial_shards=trial_shards or len(devices))


def _trial_axis(s: trainer.Program) -> str | None:
  return TRIALS if TRIALS in s.mesh.axis_names else None


def num_trial_shards(s: trainer.Program) -> int:
  return s.mesh.shape[TRIALS] if _trial_axis(s) else 1


def stacked_shardings(s: trainer.Program):
  """The state's shardings with a leading trial axis (split over `trials` when present)."""
  axis = _trial_axis(s)
  return jax.tree.map(lambda sh: NamedSharding(s.mesh, P(axis, *sh.spec)), s.state_shardings)


def make_steps(s: trainer.Program, k: int) -> dict:
  """Jitted {'train', 'eval', 'stack'} for k trials, compiled once per (Program, k).

  train(state_K, batch, lr_inputs) -> (state_K, metrics_K, flags_K): lr_inputs['lr_scale'] is [k],
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

  evaluate_k = jax.vmap(trainer.eval_step_fn(s), in_axes=(0, None), spmd_axis_name=axis)

  def stack(state):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), state)

  steps = {
      "train": jax.jit(train, in_shardings=(stacked, trainer.batch_shardings(s, (None,)), lr_sh),
                       out_shardings=(stacked, per_trial, per_trial), donate_argnums=(0,)),
      "eval": jax.jit(evaluate_k, in_shardings=(stacked, trainer.batch_shardings(s)),
                      out_shardings=per_trial),
      "stack": jax.jit(stack, in_shardings=(s.state_shardings,), out_shardings=stacked),
  }
  s.compiled[key] = {name: trainer.with_mesh(s, fn) for name, fn in steps.items()}
  return s.compiled[key]


class TrialSteps:
  """The step of K trials for train/loop.py (as trainer.StepRunner is for one trial).

  configs: the trials' configs (they differ only in lr_scale). The trial axis is padded
  to at least pad_to trials (copies of the last, discarded) so groups of any size share one
  compile, and to a multiple of its shards.
  """

  def __init__(self, s: trainer.Program, configs, pad_to: int = 0):
    shards = num_trial_shards(s)
    pad = max(pad_to - len(configs), 0)
    pad += -(len(configs) + pad) % shards  # the trial axis must divide its devices
    self.s, self.pad = s, pad
    self.steps = make_steps(s, len(configs) + pad)
    self.lr_scale = np.asarray([c.lr_scale for c in configs] + [configs[-1].lr_scale] * pad,
                               np.float32)
    self.batch_size = configs[0].global_batch_size
    self.num_trials = len(configs) + pad  # what the step trains (MFU counts the padding)

  def __call__(self, state, data_it, lr_inputs):
    s = self.s
    batch = trainer.global_batch(s, [next(data_it) for _ in range(s.num_microbatches)])
    return self.steps["train"](state, batch, lr_inputs)

  def evaluate(self, state) -> dict[str, np.ndarray]:
    return trainer.evaluate(self.s, self.steps["eval"], state)

  @staticmethod
  def trial_state(state, i: int):
    return jax.tree.map(lambda x: x[i], state)

  def stack_init(self, state):
    """K copies of one initial state."""
    return self.steps["stack"](state)

  def stack_states(self, states):
    """The trials' restored states (padded) stacked along the trial axis."""
    states = list(states) + [states[-1]] * self.pad
    return jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states),
                          stacked_shardings(self.s))


def step_times(s: trainer.Program, k: int, steps: int = 10) -> dict[str, float]:
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
      states[i], out, _ = single(states[i], batch, lr_1)
    return out

  def run_vectorized():
    nonlocal stacked
    stacked, out, _ = vec["train"](stacked, batch, lr_k)
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
