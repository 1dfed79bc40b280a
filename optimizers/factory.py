"""Optimizer and learning-rate schedule from config (the trainer's `config.optimizer`/`.schedule`).

The optimizer comes wrapped in `optax.inject_hyperparams` with only `learning_rate` injected
(initial 0.0): the trainer writes each step's lr into `opt_state.hyperparams['learning_rate']`
inside the jitted step, so lr changes never recompile. Per-leaf lr multipliers (μP,
`models.mup`) are constants of the transformation, so the lr itself stays a runtime value.
"""
import math
from typing import Any, Callable, Optional

import jax
import ml_collections
import optax
from ml_collections import config_dict

from optimizers import schedules
# Names, not modules: the package re-exports functions `lamb`, `lars`, `adagrad` that shadow them.
from optimizers.adagrad import adagrad, adagrad_norm
from optimizers.lamb import lamb, resolve_mask
from optimizers.lars import lars

OPTIMIZERS = ("adamw", "lamb", "lars", "sgd", "adagrad", "adagrad_norm")
SCHEDULES = ("power", "wsd", "warmup_poly", "cosine", "linear", "constant")
_MASKS = {"default": None, "all": True}
_ADAPTATION_MASKS = ("same", "all")


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every optimizer field; None (eps, weight_decay) means that optimizer's paper default."""
  c = ml_collections.ConfigDict()
  c.name = "adamw"  # one of OPTIMIZERS
  c.b1 = 0.9  # adamw, lamb
  c.b2 = 0.999  # adamw, lamb
  c.eps = config_dict.placeholder(float)  # None: adamw 1e-8, lamb 1e-6, lars 0
  # None: adamw 1e-4 (decoupled), lamb 0.01, lars 5e-4, sgd 0 (L2 added to the gradient).
  c.weight_decay = config_dict.placeholder(float)  # adagrad, adagrad_norm: unused
  c.bias_correction = True  # lamb (False = Google/ALBERT code)
  c.phi_clip = config_dict.placeholder(tuple)  # lamb (gamma_l, gamma_u); None = identity
  c.momentum = 0.9  # sgd, lars
  c.nesterov = False  # sgd, lars
  c.trust_coefficient = 0.001  # lars
  c.initial_accumulator = 1e-2  # adagrad: b0^2 per coordinate
  c.b0 = 0.1  # adagrad_norm: initial scalar b0
  c.mask = "default"  # decay+adaptation: 'default' skips biases/norms, 'all' = every leaf
  c.adaptation_mask = "same"  # lamb: 'same' as mask, 'all' = adapt every leaf (optax.lamb)
  c.grad_clip_norm = config_dict.placeholder(float)  # global-norm clip before the optimizer
  return c


def default_schedule_config() -> ml_collections.ConfigDict:
  """Every schedule field; steps count updates, tokens are summed over realised batches."""
  c = ml_collections.ConfigDict()
  c.name = "cosine"  # one of SCHEDULES
  c.peak_lr = 1e-3  # all but 'power'
  c.warmup_steps = 0
  c.total_steps = 10_000  # cosine, linear, warmup_poly (phase length)
  c.final_lr = 0.0  # cosine, linear, wsd, warmup_poly (end_lr)
  c.stable_steps = 0  # wsd
  c.decay_steps = 0  # wsd
  c.decay_shape = "linear"  # wsd: linear | cosine | 1-sqrt
  c.decay_start = config_dict.placeholder(int)  # wsd: None = warmup_steps + stable_steps
  c.poly_power = 1.0  # warmup_poly
  c.phase_start = 0  # warmup_poly: step at which a re-warmed phase starts
  # power: min(lr_max, batch_size * a * tokens^b), Shen et al. Eq. 7, batch size in sequences.
  # Same keys as laws.power_scheduler.PowerSchedulerFit.schedule_config().
  c.a = 4.0
  c.b = -0.51
  c.lr_max = 0.02
  c.warmup_tokens = 0.0  # power
  c.decay_start_tokens = config_dict.placeholder(float)  # power: None = no final decay
  c.decay_tokens = config_dict.placeholder(float)  # power
  c.power_decay = "exp"  # power: exp | linear
  c.decay_final_ratio = 0.01  # power: lr at the end of the decay / lr at its start
  c.batch_size_rule = "none"  # none | sqrt | linear | a number p: lr * (B/B0)^p
  c.base_batch_size = config_dict.placeholder(int)  # B0, same units as the trainer's batch_size
  return c


def _choice(value, valid, field):
  if value not in valid:
    raise ValueError(f"{field}={value!r} is not valid; choose one of {list(valid)}")
  return value


def _or(value, default):
  return default if value is None else value


def _number(value, field, *, low=None, high=None, low_open=False, high_open=False,
            optional=False, integer=False):
  """Raises ValueError (one line naming `field`) unless value is a finite number in range."""
  if value is None and optional:
    return
  ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
  ok = ok and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if ok:
    return
  kind = "an integer" if integer else "a finite number"
  if low is not None and high is not None:
    rule = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  elif low is not None:
    rule = f"{'>' if low_open else '>='} {low}"
  elif high is not None:
    rule = f"{'<' if high_open else '<='} {high}"
  else:
    rule = ""
  raise ValueError(f"{field}={value!r}: must be {kind}{' ' + rule if rule else ''}"
                   f"{' (or None)' if optional else ''}.")


def validate_optimizer(opt_config, prefix: str = "config.optimizer") -> None:
  """Every numeric field the named optimizer reads, before anything is built or compiled."""
  c = opt_config.copy_and_resolve_references()
  name = _choice(c.name, OPTIMIZERS, f"{prefix}.name")
  f = lambda key: f"{prefix}.{key}"
  if name in ("adamw", "lamb"):
    _number(c.b1, f("b1"), low=0, high=1, high_open=True)
    _number(c.b2, f("b2"), low=0, high=1, high_open=True)
    _number(c.eps, f("eps"), low=0, low_open=True, optional=True)
  if name == "lars":
    _number(c.eps, f("eps"), low=0, optional=True)
    _number(c.trust_coefficient, f("trust_coefficient"), low=0, low_open=True)
  if name in ("sgd", "lars"):
    _number(c.momentum, f("momentum"), low=0, high=1, high_open=True)
  if name in ("adamw", "lamb", "lars", "sgd"):
    _number(c.weight_decay, f("weight_decay"), low=0, optional=True)
  if name == "adagrad":
    _number(c.initial_accumulator, f("initial_accumulator"), low=0, low_open=True)
  if name == "adagrad_norm":
    _number(c.b0, f("b0"), low=0, low_open=True)
  if c.phi_clip is not None:
    if len(c.phi_clip) != 2:
      raise ValueError(f"{f('phi_clip')}={c.phi_clip!r}: need (gamma_l, gamma_u), "
                       "0 <= gamma_l <= gamma_u")
    _number(c.phi_clip[0], f("phi_clip[0]"), low=0)
    _number(c.phi_clip[1], f("phi_clip[1]"), low=c.phi_clip[0])
  _number(c.grad_clip_norm, f("grad_clip_norm"), low=0, low_open=True, optional=True)


def validate_schedule(schedule_config, num_steps: Optional[int] = None,
                      prefix: str = "config.schedule") -> None:
  """Every numeric field the named schedule reads; `num_steps`: the run's steps, if known.

  The lr the trainer applies is the schedule's times `config.lr_scale` (sweeps set
  peak_lr = 1.0 and vary lr_scale), so only the schedule's own values are checked here.
  """
  c = schedule_config.copy_and_resolve_references()
  name = _choice(c.name, SCHEDULES, f"{prefix}.name")
  f = lambda key: f"{prefix}.{key}"
  if name == "power":
    _number(c.a, f("a"), low=0, low_open=True)
    _number(c.b, f("b"))
    _number(c.lr_max, f("lr_max"), low=0, low_open=True)
    _number(c.warmup_tokens, f("warmup_tokens"), low=0)
    _number(c.decay_start_tokens, f("decay_start_tokens"), low=0, optional=True)
    _number(c.decay_tokens, f("decay_tokens"), low=0, low_open=True, optional=True)
    if c.power_decay == "exp":
      _number(c.decay_final_ratio, f("decay_final_ratio"), low=0, high=1, low_open=True)
    else:
      _number(c.decay_final_ratio, f("decay_final_ratio"), low=0, high=1)
    return
  _number(c.peak_lr, f("peak_lr"), low=0, low_open=True)
  _number(c.warmup_steps, f("warmup_steps"), low=0, integer=True)
  if name in ("cosine", "linear", "wsd", "warmup_poly"):
    _number(c.final_lr, f("final_lr"), low=0)
  if name in ("cosine", "linear", "warmup_poly"):
    _number(c.total_steps, f("total_steps"), low=1, integer=True)
    if c.warmup_steps > c.total_steps:
      raise ValueError(f"{f('warmup_steps')}={c.warmup_steps}: must be <= "
                       f"{f('total_steps')}={c.total_steps}.")
  if name == "wsd":
    _number(c.stable_steps, f("stable_steps"), low=0, integer=True)
    _number(c.decay_steps, f("decay_steps"), low=0, integer=True)
    _number(c.decay_start, f("decay_start"), low=0, integer=True, optional=True)
  if name == "warmup_poly":
    _number(c.poly_power, f("poly_power"), low=0, low_open=True)
    _number(c.phase_start, f("phase_start"), low=0, integer=True)
  if num_steps is not None and c.warmup_steps > num_steps:
    raise ValueError(f"{f('warmup_steps')}={c.warmup_steps}: must be <= config.num_steps="
                     f"{num_steps} (the run would end before the warmup does).")


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """u ← m ⊙ u leaf by leaf, `multipliers` a pytree like params of Python floats (stateless)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u if m == 1.0 else (u * m).astype(u.dtype), updates,
                        multipliers), state
  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _base_optimizer(c, learning_rate, layer_axis,
                    lr_multipliers=None) -> optax.GradientTransformation:
  mask = _MASKS[c.mask]
  resolved = lambda p: resolve_mask(mask, p)
  if lr_multipliers is not None:
    scale = scale_by_tree(lr_multipliers)
    # Decay stays outside the multipliers: the per-step shrink lr·λ is what the config sets,
    # at every width (mup's MuAdam/MuSGD divide λ by the lr multiplier to the same effect).
    if c.name == "adamw":
      return optax.chain(
          optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=_or(c.eps, 1e-8)), scale,
          optax.add_decayed_weights(_or(c.weight_decay, 1e-4), mask=resolved),
          optax.scale_by_learning_rate(learning_rate))
    if c.name == "sgd":
      return optax.chain(
          scale, optax.add_decayed_weights(_or(c.weight_decay, 0.0), mask=resolved),
          optax.sgd(learning_rate, momentum=c.momentum or None, nesterov=c.nesterov))
    # lamb, lars: after the trust ratio, which would undo a multiplier applied before it;
    # adagrad, adagrad_norm (no decay): the whole step.
    return optax.chain(_base_optimizer(c, learning_rate, layer_axis), scale)
  if c.name == "adamw":
    return optax.adamw(learning_rate, b1=c.b1, b2=c.b2, eps=_or(c.eps, 1e-8),
                       weight_decay=_or(c.weight_decay, 1e-4), mask=resolved)
  if c.name == "lamb":
    return lamb(
        learning_rate, b1=c.b1, b2=c.b2, eps=_or(c.eps, 1e-6),
        weight_decay=_or(c.weight_decay, 0.01), bias_correction=c.bias_correction,
        phi_clip=None if c.phi_clip is None else tuple(c.phi_clip), mask=mask,
        layer_axis=layer_axis, adaptation_mask=None if c.adaptation_mask == "same" else True)
  if c.name == "lars":
    return lars(
        learning_rate, momentum=c.momentum, trust_coefficient=c.trust_coefficient,
        weight_decay=_or(c.weight_decay, 5e-4), eps=_or(c.eps, 0.0), nesterov=c.nesterov,
        mask=mask, layer_axis=layer_axis)
  if c.name == "sgd":
    return optax.chain(
        optax.add_decayed_weights(_or(c.weight_decay, 0.0), mask=resolved),
        optax.sgd(learning_rate, momentum=c.momentum or None, nesterov=c.nesterov))
  if c.name == "adagrad":
    return adagrad(learning_rate, initial_accumulator=c.initial_accumulator)
  return adagrad_norm(learning_rate, b0=c.b0)


def make_optimizer(opt_config, *, layer_axis=None,
                   lr_multipliers: Any = None) -> optax.GradientTransformation:
  """Optimizer named by `opt_config.name`, in `optax.inject_hyperparams` (learning_rate=0.0).

  `layer_axis`: pytree like params, int (stacked layer axis) or None per leaf; used by the
  trust-ratio optimizers (lamb, lars) so each scanned layer gets its own ratio.
  `lr_multipliers`: None, or a pytree like params of Python floats: each leaf's step is
  multiplied by its value, i.e. a per-leaf lr (μP, `models.mup.lr_multipliers_from_config`).
  adamw's decoupled decay and sgd's L2 term are not multiplied; lamb and lars multiply the
  step after the trust ratio (see `models/mup.py` for what that means for μP).
  """
  c = opt_config.copy_and_resolve_references()  # later edits to the config cannot leak in
  _choice(c.name, OPTIMIZERS, "config.optimizer.name")
  _choice(c.mask, _MASKS, "config.optimizer.mask")
  _choice(c.adaptation_mask, _ADAPTATION_MASKS, "config.optimizer.adaptation_mask")
  if c.phi_clip is not None and (len(c.phi_clip) != 2 or not 0 <= c.phi_clip[0] <= c.phi_clip[1]):
    raise ValueError(f"config.optimizer.phi_clip={c.phi_clip!r}: need (gamma_l, gamma_u), "
                     "0 <= gamma_l <= gamma_u")
  if c.grad_clip_norm is not None and not c.grad_clip_norm > 0:
    raise ValueError(f"config.optimizer.grad_clip_norm={c.grad_clip_norm!r}: need > 0 or None")

  def factory(learning_rate):
    opt = _base_optimizer(c, learning_rate, layer_axis, lr_multipliers)
    if c.grad_clip_norm is not None:
      opt = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), opt)
    return opt
  return optax.inject_hyperparams(factory)(learning_rate=0.0)


def _schedule(c) -> Callable:
  if c.name == "power":
    return lambda step, tokens, bs: schedules.power(
        tokens, bs, a=c.a, b=c.b, lr_max=c.lr_max, warmup_tokens=c.warmup_tokens,
        decay_start_tokens=c.decay_start_tokens, decay_tokens=c.decay_tokens,
        decay=c.power_decay, decay_final_ratio=c.decay_final_ratio)
  if c.name == "wsd":
    return lambda step, tokens, bs: schedules.wsd(
        step, peak=c.peak_lr, warmup_steps=c.warmup_steps, stable_steps=c.stable_steps,
        decay_steps=c.decay_steps, decay_shape=c.decay_shape, final_lr=c.final_lr,
        decay_start=c.decay_start)
  if c.name == "warmup_poly":
    return lambda step, tokens, bs: schedules.warmup_poly(
        step, peak=c.peak_lr, warmup_steps=c.warmup_steps, total_steps=c.total_steps,
        power=c.poly_power, end_lr=c.final_lr, phase_start=c.phase_start)
  if c.name == "constant":
    return lambda step, tokens, bs: schedules.constant(
        step, peak=c.peak_lr, warmup_steps=c.warmup_steps)
  fn = schedules.cosine if c.name == "cosine" else schedules.linear
  return lambda step, tokens, bs: fn(step, peak=c.peak_lr, warmup_steps=c.warmup_steps,
                                     total_steps=c.total_steps, final_lr=c.final_lr)


def learning_rate_fn(schedule_config) -> Callable:
  """`fn(step, tokens, batch_size) -> lr` for `schedule_config.name`, times (B/B0)^p.

  `power` is already proportional to batch_size (Shen et al. Eq. 7), so it refuses a second
  batch-size rule.
  """
  c = schedule_config.copy_and_resolve_references()
  _choice(c.name, SCHEDULES, "config.schedule.name")
  _choice(c.decay_shape, ("linear", "cosine", "1-sqrt"), "config.schedule.decay_shape")
  _choice(c.power_decay, ("exp", "linear"), "config.schedule.power_decay")
  try:
    p = schedules.batch_size_exponent(c.batch_size_rule)
  except ValueError:
    raise ValueError(f"config.schedule.batch_size_rule={c.batch_size_rule!r} is not valid; "
                     "choose one of ['none', 'sqrt', 'linear'] or a number") from None
  if p != 0 and c.name == "power":
    raise ValueError("config.schedule.batch_size_rule must be 'none' for name='power': the "
                     "power schedule is already proportional to batch_size")
  if p != 0 and not (c.base_batch_size or 0) > 0:
    raise ValueError(f"config.schedule.base_batch_size={c.base_batch_size!r}: need > 0 when "
                     f"batch_size_rule={c.batch_size_rule!r}")
  if c.name == "power" and (c.decay_start_tokens is None) != (c.decay_tokens is None):
    raise ValueError("config.schedule.decay_start_tokens and decay_tokens: set both or neither")
  sched = _schedule(c)
  if p == 0:
    return sched
  return lambda step, tokens, batch_size: schedules.batch_size_lr(
      sched(step, tokens, batch_size), batch_size, c.base_batch_size, p)
