"""The compiled program of a run: sharded init, the jitted train step, eval step, batches.

`setup(config)` builds a `Program` (model, mesh, shardings, optimizer, batch-size controller)
and its steps compile lazily into `Program.compiled`, so runs that share a Program compile once.
The loop around the steps is train/loop.py's (one trial or K vectorised). The pieces
(`setup`, `init_state`, `make_train_step`) are public so notebooks, benchmarks and the TPU
preflight build the same step without the loop around it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from train import tasks as tasks_lib
from models import mup as mup_lib
from batch_size import controllers as bs_lib
from batch_size import norm_tests
from optimizers import factory as opt_factory
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf (config.nan_policy='stop')."""


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled part of a run, built once from config and shared by every trial of it.

  Immutable: trials of one program differ only in host-side fields and runtime inputs
  (train/loop.py: Trial, TRIAL_FIELDS, checked by `check_trials`). `compiled` caches the
  jitted steps; only the train package's step builders write it.
  """
  config: ml_collections.ConfigDict
  task: tasks_lib.Task
  mesh: jax.sharding.Mesh
  rules: tuple
  graphdef: Any
  tx: optax.GradientTransformation
  lr_fn: Callable
  state_shardings: Any
  abstract_state: Any
  num_microbatches: int  # k at the start (fixed controller: always)
  micro_batch_size: int
  controller: bs_lib.Controller
  compiled: dict = dataclasses.field(default_factory=dict)  # jitted steps, reused across runs

  @property
  def adaptive(self) -> bool:
    """The batch size changes during training (accumulate/apply steps, k a runtime value)."""
    return self.controller.name != "fixed"


def validate_batch(config, mesh) -> tuple[int, int]:
  """(micro_batch_size, num_microbatches); errors name the field."""
  dp = mesh_lib.data_parallel_size(mesh)
  gb = config.global_batch_size
  if not isinstance(gb, int) or gb <= 0:
    raise ValueError(f"config.global_batch_size={gb!r}: must be a positive integer.")
  mb = config.micro_batch_size or gb
  if mb <= 0 or gb % mb:
    raise ValueError(f"config.micro_batch_size={config.micro_batch_size} must divide "
                     f"config.global_batch_size={gb} (or be 0: no accumulation).")
  if mb % dp:
    raise ValueError(f"config.global_batch_size={gb} (micro-batch {mb}) is not divisible by "
                     f"the data-parallel size {dp} (config.mesh.data x config.mesh.fsdp).")
  if mb % jax.process_count():
    raise ValueError(f"config.global_batch_size={gb}: micro-batch {mb} must divide over "
                     f"{jax.process_count()} processes.")
  seq = mesh.shape["sequence"]
  if config.get("seq_len") and config.seq_len % seq:
    raise ValueError(f"config.seq_len={config.seq_len} is not divisible by the sequence axis "
                     f"(config.mesh.sequence={seq}).")
  if config.eval_batch_size % (dp * jax.process_count()):
    raise ValueError(f"config.eval_batch_size={config.eval_batch_size} is not divisible by the "
                     f"data-parallel size {dp} x {jax.process_count()} processes.")
  return mb, gb // mb


NAN_POLICIES = ("stop", "skip")


def validate_loop(config) -> None:
  """The loop's own fields (sizes, intervals, policies), before anything is built."""
  for field, minimum in (("num_steps", 1), ("seq_len", 1), ("log_every", 1),
                         ("checkpoint_every", 1), ("keep_checkpoints", 1), ("eval_every", 0),
                         ("eval_batches", 1), ("eval_batch_size", 1), ("max_tokens", 0)):
    value = config.get(field, minimum)
    if not isinstance(value, int) or value < minimum:
      raise ValueError(f"config.{field}={value!r}: must be an integer >= {minimum}"
                       + (" (0 = off)." if minimum == 0 else "."))
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy={config.nan_policy!r} is not valid; choose one of "
                     f"{list(NAN_POLICIES)}.")
  if not (math.isfinite(config.lr_scale) and config.lr_scale > 0):
    raise ValueError(f"config.lr_scale={config.lr_scale!r}: must be a positive number.")
  if not config.loss_bound >= 0:
    raise ValueError(f"config.loss_bound={config.loss_bound!r}: must be >= 0 (0 = off).")
  source = config.get("init_from")
  if source and "://" not in source and not os.path.isdir(os.path.join(source, "checkpoints")):
    raise ValueError(f"config.init_from={source!r} has no checkpoints/: it must be the workdir "
                     "of an earlier run.")
  # Optimizer and schedule numbers (weight decay, betas, peak lr, warmup), before compiling.
  opt_factory.validate_optimizer(config.optimizer)
  opt_factory.validate_schedule(config.schedule, num_steps=config.num_steps)


def _logical_axes(abstract_state):
  """Pytree (pure dict) of logical-name tuples, from the Variables' sharding metadata."""
  specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda v: tuple(v.get_value()) if hasattr(v, "get_value") else tuple(v),
                      nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def layer_axis_tree(logical):
  """Per leaf: the index of the stacked `layers` axis, or None (for LAMB/LARS norms)."""
  return jax.tree.map(lambda names: names.index("layers") if "layers" in names else None,
                      logical, is_leaf=lambda x: isinstance(x, tuple))


def make_batch_controller(config, micro_batch_size: int) -> bs_lib.Controller:
  """The batch-size controller; the trainer's own sizes override the block's."""
  block = ml_collections.ConfigDict(config.batch_size.to_dict())
  block.micro_batch_size = micro_batch_size
  block.initial_batch_size = config.global_batch_size
  if block.controller == "fixed":
    block.min_batch_size = micro_batch_size
    block.max_batch_size = config.global_batch_size
  elif block.controller == "noise_scale" and min(block.min_batch_size,
                                                 config.global_batch_size) < 2 * micro_batch_size:
    raise ValueError(
        f"config.batch_size.min_batch_size={block.min_batch_size} and config.global_batch_size="
        f"{config.global_batch_size} must be at least 2 micro-batches "
        f"({2 * micro_batch_size}) for the noise_scale controller: B_simple compares a "
        "micro-batch gradient with the whole batch's.")
  return bs_lib.make_controller(block)


def setup(config, mesh=None) -> Program:
  validate_loop(config)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
  rules = rules_lib.as_rules(config.logical_axis_rules)
  task = tasks_lib.make_task(config, mesh)
  mb, k = validate_batch(config, mesh)
  controller = make_batch_controller(config, mb)
  lr_fn = opt_factory.learning_rate_fn(config.schedule)

  abstract_model = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0)))
  graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
  logical_params = _logical_axes(abs_params)
  logical_rest = _logical_axes(abs_rest)
  tx = opt_factory.make_optimizer(
      config.optimizer, layer_axis=layer_axis_tree(logical_params),
      lr_multipliers=mup_lib.lr_multipliers_from_config(config, logical_params))  # None unless μP

  param_shardings = rules_lib.tree_shardings(logical_params, mesh, rules)
  rest_shardings = rules_lib.tree_shardings(logical_rest, mesh, rules)
  abs_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                            nnx.to_pure_dict(abs_params))
  mesh_lib.check_divisible(abs_params, logical_params, mesh, rules)  # before anything compiles
  abs_opt = jax.eval_shape(tx.init, abs_params)
  # Optimizer moments shard like their parameters; scalars (counts, lr) replicate.
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abs_opt, param_shardings,
      transform_non_params=lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abs_control = jax.eval_shape(controller.init)
  state_shardings = {"step": replicated, "params": param_shardings, "rest": rest_shardings,
                     "opt_state": opt_shardings,
                     "control": jax.tree.map(lambda _: replicated, abs_control)}
  abstract_state = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": abs_params,
      "rest": jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                           nnx.to_pure_dict(abs_rest)),
      "opt_state": abs_opt,
      "control": abs_control,
  }
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
      state_shardings)
  return Program(config, task, mesh, rules, graphdef, tx, lr_fn, state_shardings, abstract_state,
               k, mb, controller)


def init_state(s: Program, seed: int):
  """Sharded init: parameters are created already split over the mesh (jit out_shardings)."""
  if "init" not in s.compiled:
    def init(rng):
      model = s.task.make_model(nnx.Rngs(params=rng))
      _, params, rest = nnx.split(model, nnx.Param, ...)
      params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
      return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
              "opt_state": s.tx.init(params), "control": s.controller.init()}
    s.compiled["init"] = with_mesh(s, jax.jit(init, out_shardings=s.state_shardings))
  return s.compiled["init"](jax.random.key(seed))


def batch_shardings(s: Program, leading=()):
  """NamedShardings for a batch dict; `leading` prepends unsharded axes (micro-batch k)."""
  out = {}
  for key, names in s.task.batch_axes.items():
    spec = rules_lib.logical_to_spec(names, s.rules)
    out[key] = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*leading, *spec))
  return out


def _loss_and_grad(s: Program, params, rest, micro):
  def f(p):
    model = nnx.merge(s.graphdef, p, rest)
    loss, aux = s.task.loss_fn(model, micro)
    return loss, (aux, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
  (loss, (aux, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, aux, new_rest, grads


def _sq_norm(tree):
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def _apply_update(s: Program, state, grads, loss, aux, rest, lr_inputs, measurements):
  """Optimizer update, noise scale and batch-size controller, shared by both step kinds.

  Returns (state, metrics, flags): metrics are what the loop logs; flags are what it
  acts on ('finite', 'next_microbatches'). A non-finite loss or gradient never reaches the
  state (the update is dropped); the host then stops or skips (config.nan_policy).
  """
  grad_norm = optax.global_norm(grads)
  lr = lr_inputs["lr_scale"] * s.lr_fn(lr_inputs["step"], lr_inputs["tokens"],
                                       lr_inputs["batch_size"])
  opt_state = state["opt_state"]
  opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
  updates, opt_state = s.tx.update(grads, opt_state, state["params"])
  params = optax.apply_updates(state["params"], updates)

  # McCandlish et al. 2018 App. A: B_simple from micro-batch (small) and global (big) norms.
  control = state["control"]
  measurements = measurements._replace(sq_norm_big=jnp.square(grad_norm))
  measurements, b_simple = bs_lib.with_noise_scale(
      control.noise, measurements, s.config.batch_size.noise_scale.decay)  # once per step
  tokens_after = lr_inputs["tokens"] + lr_inputs["batch_size"] * s.task.tokens_per_example
  control, _ = s.controller.update(control, measurements, lr_inputs["step"], tokens_after)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = {"step": state["step"] + 1, "params": params, "rest": rest, "opt_state": opt_state,
         "control": control}
  old = dict(state, step=state["step"] + 1)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
             "param_norm": optax.global_norm(new["params"]), "noise_scale": b_simple, **aux}
  flags = {"finite": finite, "next_microbatches": new["control"].num_microbatches}
  return new, metrics, flags


def with_mesh(s: Program, fn):
  def wrapped(*args):
    with jax.set_mesh(s.mesh), rules_lib.axis_rules(s.rules):
      return fn(*args)
  wrapped.jitted = fn
  return wrapped


def train_step_fn(s: Program):
  """The pure train step (state, batch, lr_inputs) -> (state, metrics, flags), before jit.

  batch: dict of [k, micro_batch, ...] arrays (k micro-batches accumulated with a scan; with
  k > 1 the micro-batch gradient norms also give the noise scale for free).
  lr_inputs: {'step', 'tokens', 'batch_size', 'lr_scale'} runtime scalars: the schedule is
  evaluated inside the step, so changing any of them never recompiles. Sweeps vmap this over
  a trial axis (train/vectorized.py).
  """
  mb = s.micro_batch_size

  def train_step(state, batch, lr_inputs):
    params, rest = state["params"], state["rest"]
    k = jax.tree.leaves(batch)[0].shape[0]
    if k == 1:
      loss, aux, rest, grads = _loss_and_grad(s, params, rest, jax.tree.map(lambda x: x[0], batch))
      sq_small = _sq_norm(grads)
    else:
      def body(carry, micro):
        g_acc, l_acc, sq_acc, r = carry
        loss, aux, r, g = _loss_and_grad(s, params, r, micro)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, sq_acc + _sq_norm(g), r), aux
      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss, sq_small, rest), aux = jax.lax.scan(body, (zeros, 0.0, 0.0, rest), batch)
      grads = jax.tree.map(lambda g: g / k, grads)
      loss, sq_small = loss / k, sq_small / k
      aux = jax.tree.map(lambda a: a.mean(0), aux)
    measurements = bs_lib.Measurements(sq_norm_small=sq_small, b_small=jnp.float32(mb),
                                       b_big=jnp.float32(k * mb))
    return _apply_update(s, state, grads, loss, aux, rest, lr_inputs, measurements)
  return train_step


def make_train_step(s: Program):
  """jit(train_step_fn(s)) with explicit shardings and donated state; compiled once per Program."""
  if "train_step" not in s.compiled:
    batch_sh = batch_shardings(s, leading=(None,))
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    s.compiled["train_step"] = with_mesh(s, jax.jit(
        train_step_fn(s), in_shardings=(s.state_shardings, batch_sh, replicated),
        out_shardings=(s.state_shardings, replicated, replicated), donate_argnums=(0,)))
  return s.compiled["train_step"]


def make_adaptive_steps(s: Program):
  """Steps for a batch size that changes at run time without recompiling.

  accumulate(params, rest, acc, micro) adds one micro-batch's gradient to `acc`;
  apply(state, acc, lr_inputs, grad_stats) divides by the runtime count k, updates, and asks
  the controller for the next k; grad_stats(params, rest, micro) gives the per-example
  gradient statistics of AdAdaGrad's tests (Lau et al. 2024) via vmap of grad.
  """
  if "adaptive" in s.compiled:
    return s.compiled["adaptive"]
  mb = s.micro_batch_size
  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  micro_sh = batch_shardings(s)
  acc_sh = {"grads": s.state_shardings["params"], "loss": replicated, "sq": replicated,
            "count": replicated}

  def zeros(params):
    return {"grads": jax.tree.map(jnp.zeros_like, params), "loss": jnp.float32(0),
            "sq": jnp.float32(0), "count": jnp.float32(0)}

  def accumulate(params, rest, acc, micro):
    loss, aux, rest, grads = _loss_and_grad(s, params, rest, micro)
    del aux
    return rest, {"grads": jax.tree.map(jnp.add, acc["grads"], grads),
                  "loss": acc["loss"] + loss, "sq": acc["sq"] + _sq_norm(grads),
                  "count": acc["count"] + 1}

  def apply(state, acc, lr_inputs, grad_stats):
    k = acc["count"]
    grads = jax.tree.map(lambda g: g / k, acc["grads"])
    measurements = bs_lib.Measurements(sq_norm_small=acc["sq"] / k, b_small=jnp.float32(mb),
                                       b_big=k * mb, grad_stats=grad_stats)
    return _apply_update(s, state, grads, acc["loss"] / k, {}, state["rest"], lr_inputs,
                         measurements)

  def grad_stats(params, rest, micro):
    def example_loss(p, example):
      model = nnx.merge(s.graphdef, p, rest)
      return s.task.loss_fn(model, jax.tree.map(lambda x: x[None], example))[0]
    per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, micro)
    return norm_tests.gradient_statistics(per_example)

  p_sh, r_sh = s.state_shardings["params"], s.state_shardings["rest"]
  steps = {
      "zeros": jax.jit(zeros, in_shardings=(p_sh,), out_shardings=acc_sh),
      "accumulate": jax.jit(accumulate, in_shardings=(p_sh, r_sh, acc_sh, micro_sh),
                            out_shardings=(r_sh, acc_sh), donate_argnums=(2,)),
      "apply": jax.jit(apply, in_shardings=(s.state_shardings, acc_sh, replicated, replicated),
                       out_shardings=(s.state_shardings, replicated, replicated),
                       donate_argnums=(0, 1)),
      "grad_stats": jax.jit(grad_stats, in_shardings=(p_sh, r_sh, micro_sh),
                            out_shardings=replicated),
  }
  s.compiled["adaptive"] = {name: with_mesh(s, fn) for name, fn in steps.items()}
  return s.compiled["adaptive"]


def eval_step_fn(s: Program):
  """The pure eval step (state, batch) -> metric sums, before jit (vmapped for K trials)."""
  def eval_step(state, batch):
    model = nnx.merge(s.graphdef, state["params"], state["rest"])
    model.eval()
    return s.task.eval_fn(model, batch)
  return eval_step


def make_eval_step(s: Program):
  if "eval_step" in s.compiled:
    return s.compiled["eval_step"]
  eval_step = eval_step_fn(s)
  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  s.compiled["eval_step"] = with_mesh(s, jax.jit(
      eval_step, in_shardings=(s.state_shardings, batch_shardings(s)), out_shardings=replicated))
  return s.compiled["eval_step"]


def global_batch(s: Program, local_batches: list[dict]):
  """Stacks k process-local micro-batches into global [k, micro_batch, ...] arrays."""
  shardings = batch_shardings(s, leading=(None,))
  out = {}
  for key in s.task.batch_axes:
    local = np.stack([b[key] for b in local_batches])
    global_shape = (local.shape[0], s.micro_batch_size) + local.shape[2:]
    out[key] = jax.make_array_from_process_local_data(shardings[key], local, global_shape)
  return out


def global_micro_batch(s: Program, local: dict, batch_size: int):
  shardings = batch_shardings(s)
  return {key: jax.make_array_from_process_local_data(
      shardings[key], local[key], (batch_size,) + local[key].shape[1:])
          for key in s.task.batch_axes}


def data_shard(s: Program, batch_size: int) -> tuple[int, int]:
  """(index, count) for the loaders: which rows of a global batch this process reads."""
  sharding = next(iter(batch_shardings(s).values()))
  return mesh_lib.process_batch_shard(sharding, batch_size)


def evaluate(s: Program, eval_step, state) -> dict[str, np.ndarray]:
  """Eval metrics over config.eval_batches batches: 0-d arrays, or [K] for K trials' steps."""
  cfg = s.config
  it = s.task.eval_iterator(cfg.eval_batch_size, *data_shard(s, cfg.eval_batch_size))
  sums = None
  for _, local in zip(range(cfg.eval_batches), it):
    out = eval_step(state, global_micro_batch(s, local, cfg.eval_batch_size))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  loss = np.asarray(sums["loss_sum"] / sums["count"], np.float64)
  result = {"eval_loss": loss, "eval_bits_per_byte": loss * s.task.bits_per_byte_factor}
  for key, value in sums.items():
    if key.endswith("_sum") and key != "loss_sum":
      result["eval_" + key[:-4]] = np.asarray(value / sums["count"], np.float64)
  return result


class StepRunner:
  """One trial's optimizer step from the data iterator: fused (fixed batch) or adaptive.

  train/loop.py calls it as it calls train/vectorized.py's TrialSteps for K trials.
  """

  def __init__(self, s: Program, state, lr_scale: float):
    self.s = s
    self.num_trials = 1
    self.lr_scale = np.float32(lr_scale)
    self.eval_step = make_eval_step(s)
    self.adaptive = s.adaptive
    if self.adaptive:
      self.steps = make_adaptive_steps(s)
      abs_stats = jax.eval_shape(self.steps["grad_stats"].jitted, s.abstract_state["params"],
                                 s.abstract_state["rest"], _abstract_micro(s))
      self.zero_stats = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abs_stats)
      self.k = int(jax.device_get(state["control"].num_microbatches))
    else:
      self.train_step = make_train_step(s)
      self.k = s.num_microbatches

  @property
  def batch_size(self) -> int:
    return self.k * self.s.micro_batch_size

  def evaluate(self, state) -> dict:
    return evaluate(self.s, self.eval_step, state)

  @staticmethod
  def trial_state(state, i: int):
    assert i == 0
    return state

  def __call__(self, state, data_it, lr_inputs):
    s = self.s
    if not self.adaptive:
      batch = global_batch(s, [next(data_it) for _ in range(self.k)])
      return self.train_step(state, batch, lr_inputs)
    ad = s.config.batch_size.adaptive
    acc = self.steps["zeros"](state["params"])
    stats = self.zero_stats
    rest = state["rest"]
    for i in range(self.k):
      micro = global_micro_batch(s, next(data_it), s.micro_batch_size)
      if i == 0 and s.controller.needs_grad_stats and int(lr_inputs["step"]) % ad.interval == 0:
        stats = self.steps["grad_stats"](state["params"], rest, micro)
      rest, acc = self.steps["accumulate"](state["params"], rest, acc, micro)
    state = dict(state, rest=rest)
    state, metrics, flags = self.steps["apply"](state, acc, lr_inputs, stats)
    self.k = int(jax.device_get(flags["next_microbatches"]))  # the next step's data depends on it
    return state, metrics, flags


def _abstract_micro(s: Program):
  shardings = batch_shardings(s)
  it = s.task.eval_iterator(s.micro_batch_size, *data_shard(s, s.micro_batch_size))
  local = next(iter(it))
  return {k: jax.ShapeDtypeStruct((s.micro_batch_size,) + local[k].shape[1:], local[k].dtype,
                                  sharding=shardings[k]) for k in s.task.batch_axes}
