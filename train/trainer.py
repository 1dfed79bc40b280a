"""The training loop: sharded init, one jitted step, eval, logging, checkpoints, resume.

`train(config, workdir)` is what `train` and the sweep driver call. The pieces
(`setup`, `init_state`, `make_train_step`) are public so notebooks and benchmarks build the
same step without the loop around it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import tasks as tasks_lib
from models import flops as flops_lib
from models import mup as mup_lib
from batch_size import controllers as bs_lib
from optimizers import factory as opt_factory
from sharding import mesh as mesh_lib
from sharding import rules as rules_lib


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf (config.nan_policy='stop')."""


@dataclasses.dataclass
class Setup:
  """Everything the step and the loop share, built once from config."""
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


def setup(config, mesh=None) -> Setup:
  validate_loop(config)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
  rules = rules_lib.as_rules(config.logical_axis_rules)
  task = tasks_lib.make_task(config)
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
  return Setup(config, task, mesh, rules, graphdef, tx, lr_fn, state_shardings, abstract_state,
               k, mb, controller)


def init_state(s: Setup, seed: int):
  """Sharded init: parameters are created already split over the mesh (jit out_shardings)."""
  if "init" not in s.compiled:
    def init(rng):
      model = s.task.make_model(nnx.Rngs(params=rng))
      _, params, rest = nnx.split(model, nnx.Param, ...)
      params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
      return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": rest,
              "opt_state": s.tx.init(params), "control": s.controller.init()}
    s.compiled["init"] = _with_mesh(s, jax.jit(init, out_shardings=s.state_shardings))
  return s.compiled["init"](jax.random.key(seed))


def batch_shardings(s: Setup, leading=()):
  """NamedShardings for a batch dict; `leading` prepends unsharded axes (micro-batch k)."""
  out = {}
  for key, names in s.task.batch_axes.items():
    spec = rules_lib.logical_to_spec(names, s.rules)
    out[key] = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*leading, *spec))
  return out


def _loss_and_grad(s: Setup, params, rest, micro):
  def f(p):
    model = nnx.merge(s.graphdef, p, rest)
    loss, aux = s.task.loss_fn(model, micro)
    return loss, (aux, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))
  (loss, (aux, new_rest)), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, aux, new_rest, grads


def _sq_norm(tree):
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def _apply_update(s: Setup, state, grads, loss, aux, rest, lr_inputs, measurements):
  """Optimizer update, noise scale and batch-size controller, shared by both step kinds.

  A non-finite loss or gradient never reaches the state (the update is dropped); the host
  then stops or skips according to config.nan_policy.
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
  noise, b_simple = bs_lib.noise_scale_update(
      control.noise, measurements.sq_norm_small, measurements.sq_norm_big,
      measurements.b_small, measurements.b_big, s.config.batch_size.noise_scale.decay)
  if s.controller.name != "noise_scale":  # that controller updates the same EMAs itself
    control = control._replace(noise=noise)
  tokens_after = lr_inputs["tokens"] + lr_inputs["batch_size"] * s.task.tokens_per_example
  control, _ = s.controller.update(control, measurements, lr_inputs["step"], tokens_after)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = {"step": state["step"] + 1, "params": params, "rest": rest, "opt_state": opt_state,
         "control": control}
  old = dict(state, step=state["step"] + 1)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite,
             "param_norm": optax.global_norm(new["params"]), "noise_scale": b_simple,
             "next_microbatches": new["control"].num_microbatches, **aux}
  return new, metrics


def _with_mesh(s: Setup, fn):
  def wrapped(*args):
    with jax.set_mesh(s.mesh), rules_lib.axis_rules(s.rules):
      return fn(*args)
  wrapped.jitted = fn
  return wrapped


def train_step_fn(s: Setup):
  """The pure train step (state, batch, lr_inputs) -> (state, metrics), before jit.

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


def make_train_step(s: Setup):
  """jit(train_step_fn(s)) with explicit shardings and donated state; compiled once per Setup."""
  if "train_step" not in s.compiled:
    batch_sh = batch_shardings(s, leading=(None,))
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    s.compiled["train_step"] = _with_mesh(s, jax.jit(
        train_step_fn(s), in_shardings=(s.state_shardings, batch_sh, replicated),
        out_shardings=(s.state_shardings, replicated), donate_argnums=(0,)))
  return s.compiled["train_step"]


def make_adaptive_steps(s: Setup):
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
    return bs_lib.gradient_statistics(per_example)

  p_sh, r_sh = s.state_shardings["params"], s.state_shardings["rest"]
  steps = {
      "zeros": jax.jit(zeros, in_shardings=(p_sh,), out_shardings=acc_sh),
      "accumulate": jax.jit(accumulate, in_shardings=(p_sh, r_sh, acc_sh, micro_sh),
                            out_shardings=(r_sh, acc_sh), donate_argnums=(2,)),
      "apply": jax.jit(apply, in_shardings=(s.state_shardings, acc_sh, replicated, replicated),
                       out_shardings=(s.state_shardings, replicated), donate_argnums=(0, 1)),
      "grad_stats": jax.jit(grad_stats, in_shardings=(p_sh, r_sh, micro_sh),
                            out_shardings=replicated),
  }
  s.compiled["adaptive"] = {name: _with_mesh(s, fn) for name, fn in steps.items()}
  return s.compiled["adaptive"]


def make_eval_step(s: Setup):
  if "eval_step" in s.compiled:
    return s.compiled["eval_step"]

  def eval_step(state, batch):
    model = nnx.merge(s.graphdef, state["params"], state["rest"])
    model.eval()
    return s.task.eval_fn(model, batch)

  replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  s.compiled["eval_step"] = _with_mesh(s, jax.jit(
      eval_step, in_shardings=(s.state_shardings, batch_shardings(s)), out_shardings=replicated))
  return s.compiled["eval_step"]


def global_batch(s: Setup, local_batches: list[dict]):
  """Stacks k process-local micro-batches into global [k, micro_batch, ...] arrays."""
  shardings = batch_shardings(s, leading=(None,))
  out = {}
  for key in s.task.batch_axes:
    local = np.stack([b[key] for b in local_batches])
    global_shape = (local.shape[0], s.micro_batch_size) + local.shape[2:]
    out[key] = jax.make_array_from_process_local_data(shardings[key], local, global_shape)
  return out


def global_micro_batch(s: Setup, local: dict, batch_size: int):
  shardings = batch_shardings(s)
  return {key: jax.make_array_from_process_local_data(
      shardings[key], local[key], (batch_size,) + local[key].shape[1:])
          for key in s.task.batch_axes}


def data_shard(s: Setup, batch_size: int) -> tuple[int, int]:
  """(index, count) for the loaders: which rows of a global batch this process reads."""
  sharding = next(iter(batch_shardings(s).values()))
  return mesh_lib.process_batch_shard(sharding, batch_size)


def evaluate(s: Setup, eval_step, state) -> dict:
  cfg = s.config
  it = s.task.eval_iterator(cfg.eval_batch_size, *data_shard(s, cfg.eval_batch_size))
  sums = None
  for _, local in zip(range(cfg.eval_batches), it):
    out = eval_step(state, global_micro_batch(s, local, cfg.eval_batch_size))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  loss = float(sums["loss_sum"] / sums["count"])
  result = {"eval_loss": loss, "eval_bits_per_byte": loss * s.task.bits_per_byte_factor}
  for key, value in sums.items():
    if key.endswith("_sum") and key != "loss_sum":
      result["eval_" + key[:-4]] = float(value / sums["count"])
  return result


# Fields a resume may change without declaring them: the declaration itself, and the
# accelerator peak (MFU reporting only; sweeps re-measure it on CPU in every process).
RESUME_UNCHECKED = ("resume_allow_changes", "device_peak_flops")
CONFIG_HISTORY = "config_history.jsonl"


def config_hash(config) -> str:
  fields = json.loads(config.to_json(sort_keys=True))
  for key in RESUME_UNCHECKED:
    fields.pop(key, None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _references(config, prefix: str = "") -> dict:
  """Dotted key -> FieldReference for fields that share a reference (e.g. schedule.total_steps
  = get_ref('num_steps')); resolved copies have none."""
  out = {}
  for key, value in getattr(config, "_fields", {}).items():
    if isinstance(value, ml_collections.FieldReference):
      out[f"{prefix}{key}"] = value
      value = value.get()
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_references(value, f"{prefix}{key}."))
  return out


def _short(value) -> str:
  text = json.dumps(value) if not isinstance(value, str) else repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def check_resume_config(cfg, workdir: str, steps) -> dict:
  """Compares cfg with the config of the run whose checkpoints (`steps`) are in workdir.

  The previous config comes from workdir/config.json (else the checkpoint meta's
  config_hash). Fields that differ raise ValueError in one line unless cfg declares them in
  cfg.resume_allow_changes (a field that references a declared one, like
  schedule.total_steps -> num_steps, follows it); returns the allowed {field: [old, new]}.
  """
  if not steps:
    return {}
  where = f"--workdir={workdir}'s checkpoint"
  allowed = tuple(cfg.get("resume_allow_changes") or ())
  new = _flatten(json.loads(cfg.to_json_best_effort(sort_keys=True)))
  unknown = [k for k in allowed if k not in new]
  if unknown:
    raise ValueError(f"config.resume_allow_changes names {', '.join(unknown)}, which the "
                     "config has no field for (use dotted names, e.g. 'schedule.peak_lr').")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    meta_path = os.path.join(workdir, "checkpoints", str(steps[-1]), "meta", "metadata")
    try:
      with open(meta_path) as f:
        stored = json.load(f).get("config_hash")
    except (OSError, ValueError):
      return {}  # unreadable meta: the restore reports the checkpoint
    if stored and stored != config_hash(cfg):
      raise ValueError(
          f"the config differs from the one that wrote {where} (config hash {stored}, this run "
          f"{config_hash(cfg)}; {path} is missing, so the fields cannot be named): resume with "
          "the same config, or use a new --workdir.")
    return {}
  with open(path) as f:
    old = _flatten(json.load(f))
  missing = object()
  changed = {k: [old.get(k, missing), new.get(k, missing)] for k in sorted(set(old) | set(new))
             if k not in RESUME_UNCHECKED and old.get(k, missing) != new.get(k, missing)}
  refs = _references(cfg)
  declared = set(allowed) | {k for k, r in refs.items()
                             if any(refs.get(a) is r for a in allowed)}
  refused = [k for k in changed if k not in declared]
  if refused:
    def show(v):
      return "unset" if v is missing else _short(v)
    diffs = "; ".join(f"config.{k}: {show(changed[k][1])} in this run, {show(changed[k][0])} "
                      f"in {where}" for k in refused)
    roots = []  # a field that references another one follows it: declare the first only
    for k in refused:
      if k not in refs or not any(refs.get(r) is refs[k] for r in roots):
        roots.append(k)
    raise ValueError(
        f"{diffs}. Resume with the checkpoint's config, use a new --workdir, or, if the "
        f"change keeps the run meaningful, declare it: --config.resume_allow_changes=\"{tuple(roots)}\".")
  return {k: [None if o is missing else o, None if n is missing else n]
          for k, (o, n) in changed.items()}


class _Preemption:
  """SIGTERM (TPU VM preemption, `kill`) asks the loop to checkpoint and exit cleanly.

  With several processes all must stop after the same step (one that stops alone leaves the
  others waiting in a collective): JAX's preemption sync manager, started by
  `jax.distributed.initialize`, catches SIGTERM and agrees on that step (`check`).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multihost = jax.process_count() > 1

  def check(self, step: int) -> None:
    """Call once per step, with the same step on every process."""
    if self._multihost and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)

  def __enter__(self):
    if self._multihost:
      return self  # JAX's notifier owns SIGTERM
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _peak_flops(config) -> float | None:
  if config.device_peak_flops:
    return config.device_peak_flops
  peak = flops_lib.device_peak_flops()
  if peak is None and jax.default_backend() == "cpu":
    peak = flops_lib.measure_matmul_peak(seconds=0.5) / len(jax.local_devices())
  return peak


class _StepRunner:
  """Runs one optimizer step from the data iterator: fused (fixed batch) or adaptive."""

  def __init__(self, s: Setup, state):
    self.s = s
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
    state, metrics = self.steps["apply"](state, acc, lr_inputs, stats)
    self.k = int(jax.device_get(metrics["next_microbatches"]))  # the next step's data depends on it
    return state, metrics


def _abstract_micro(s: Setup):
  shardings = batch_shardings(s)
  it = s.task.eval_iterator(s.micro_batch_size, *data_shard(s, s.micro_batch_size))
  local = next(iter(it))
  return {k: jax.ShapeDtypeStruct((s.micro_batch_size,) + local[k].shape[1:], local[k].dtype,
                                  sharding=shardings[k]) for k in s.task.batch_axes}


def train(config, workdir: str, *, setup_=None, hooks=()) -> dict:
  """Trains to config.num_steps (resuming from workdir) and returns the final metrics.

  Returns {'status': 'done'|'preempted'|'stopped', 'step', last metrics..., eval...}; a
  non-finite loss raises NonFiniteLossError (config.nan_policy='stop') after keeping the
  checkpoints. `hooks` are called as hook(step, metrics) on every logged step (sweeps record
  curves); one that returns True stops the run there, with a checkpoint.
  """
  s = setup_ or setup(config)
  cfg = s.config
  tasks_lib.check_eval_split(cfg, s.task)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=cfg.keep_checkpoints,
                                       async_save=cfg.async_checkpointing)
  try:  # before the restore, and before config.json is overwritten
    changes = check_resume_config(cfg, workdir, checkpointer.all_steps())
  except ValueError:
    checkpointer.close()
    raise
  if jax.process_index() == 0:
    if changes:
      with open(os.path.join(workdir, CONFIG_HISTORY), "a") as f:
        f.write(json.dumps({"time": time.time(), "step": checkpointer.all_steps()[-1],
                            "changes": changes}, sort_keys=True) + "\n")
      logging.info("resuming with declared config changes: %s", changes)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))

  eval_step = make_eval_step(s)
  data_it = s.task.train_iterator(s.micro_batch_size, *data_shard(s, s.micro_batch_size))

  meta = {"tokens": 0, "examples": 0, "config_hash": config_hash(cfg)}
  if checkpointer.all_steps():
    _, state, meta = checkpointer.restore(s.abstract_state, data_it)
    meta = dict(meta, config_hash=config_hash(cfg))  # later checkpoints: this run's config
    logging.info("resumed from step %d in %s", int(state["step"]), workdir)
  elif cfg.init_from:
    # A new phase of an earlier run (e.g. BERT's long-sequence phase): its params, optimizer
    # state, step and token count carry over; the data pipeline and batch control start fresh.
    source = ckpt_lib.Checkpointer(os.path.join(cfg.init_from, "checkpoints"), async_save=False)
    _, state, old_meta = source.restore(s.abstract_state, None)
    source.close()
    state = dict(state, control=init_state(s, cfg.seed)["control"])  # fresh batch control
    meta.update(tokens=old_meta["tokens"], examples=old_meta["examples"])
    logging.info("initialised from step %d of %s", int(state["step"]), cfg.init_from)
  else:
    state = init_state(s, cfg.seed)
  step = int(jax.device_get(state["step"]))

  run_step = _StepRunner(s, state)
  logger = metrics_lib.MetricsLogger(workdir, total_steps=cfg.num_steps, resume_step=step)
  peak = _peak_flops(cfg)
  timer = metrics_lib.StepTimer()
  status, last, pending = "done", {}, None
  window_examples, compiling = 0, True
  eval_steps = frozenset(cfg.get("eval_steps") or ())  # extra evals (sweeps: log-spaced)

  def flush(pending_item):
    """Host side of a finished step (pulled one step late so the device stays busy)."""
    nonlocal last
    p_step, p_metrics, p_meta = pending_item
    m = {k: v.item() for k, v in jax.device_get(p_metrics).items()}
    finite = bool(m.pop("finite"))
    m.pop("next_microbatches")
    if not math.isfinite(m["noise_scale"]):
      m.pop("noise_scale")
    if not finite or (cfg.loss_bound and m["loss"] > cfg.loss_bound):
      msg = (f"non-finite loss or gradient at step {p_step} (loss={m['loss']}, "
             f"grad_norm={m['grad_norm']})" if not finite else
             f"loss {m['loss']:.4f} above config.loss_bound={cfg.loss_bound} at step {p_step}")
      if cfg.nan_policy == "stop" or finite:
        checkpointer.wait()  # the save in flight is the last good checkpoint: finish it
        good = checkpointer.latest_step()
        checkpointer.close()
        kept = (f"the last good checkpoint (step {good}) is kept" if good is not None
                else "no checkpoint was written yet")
        raise NonFiniteLossError(f"{msg}; {kept}. "
                                 "Lower the learning rate or set config.nan_policy='skip'.")
      logging.warning("%s: update skipped (config.nan_policy='skip')", msg)
    m.update(step=p_step, **p_meta)
    last = m
    return m

  def finished() -> bool:
    return step >= cfg.num_steps or bool(cfg.max_tokens and meta["tokens"] >= cfg.max_tokens)

  with _Preemption() as preemption:
    while not finished():
      batch_size = run_step.batch_size
      lr_inputs = {"step": np.int32(step), "tokens": np.float32(meta["tokens"]),
                   "batch_size": np.float32(batch_size), "lr_scale": np.float32(cfg.lr_scale)}
      state, metrics = run_step(state, data_it, lr_inputs)
      step += 1
      preemption.check(step)
      meta["tokens"] += batch_size * s.task.tokens_per_example
      meta["examples"] += batch_size
      window_examples += batch_size
      timer.tick()
      if pending is not None:
        flush(pending)
      if compiling:  # the first step compiled: keep it out of the throughput
        jax.block_until_ready(metrics)
        timer.lap()
        window_examples, compiling = 0, False
      pending = (step, metrics, {"tokens": meta["tokens"], "examples": meta["examples"],
                                 "batch_size": batch_size})

      last_step = finished()
      is_log = step % cfg.log_every == 0 or last_step or step in eval_steps
      is_eval = ((cfg.eval_every and (step % cfg.eval_every == 0 or last_step))
                 or step in eval_steps)
      is_ckpt = step % cfg.checkpoint_every == 0 or last_step or preemption.requested
      if is_log or is_eval or is_ckpt:
        m = flush(pending)
        pending = None
        if is_log:
          steps_in_window = timer.steps
          dt = timer.lap()
          examples_per_s = window_examples / (dt * max(steps_in_window, 1))
          window_examples = 0
          m.update(step_time_s=dt, tokens_per_s=examples_per_s * s.task.tokens_per_example)
          if peak:
            m["mfu"] = examples_per_s * s.task.flops_per_example / s.mesh.size / peak
        if is_eval:
          m.update(evaluate(s, eval_step, state))
        if is_log or is_eval:
          logger.write(m)
          logger.progress(m, m.get("step_time_s", 0.0))
        # A hook that returns True ends the run here (e.g. a study stopping at a target loss).
        stop = any([bool(hook(step, m)) for hook in hooks])
        if is_ckpt or stop:
          checkpointer.save(step, state, data_it, meta, force=True)
        if stop:
          status = "stopped"
          break
      if is_ckpt and preemption.requested:  # a SIGTERM after is_ckpt is saved next step
        logging.warning("SIGTERM: checkpoint written at step %d; exiting", step)
        status = "preempted"
        break
  if pending is not None:
    flush(pending)
  checkpointer.close()
  logger.close()
  history = bs_lib.history_entries(jax.device_get(state["control"].history))
  return {"status": status, "step": step, "batch_history": history, **last}
