"""Learning-rate schedules: pure, jittable functions of runtime positions (step, tokens, batch).

Positions may be traced jnp scalars; nothing branches on them in Python, so one compiled step
serves every position. Phase boundaries may be traced too. `step` counts completed updates, so
linear warmups give lr = 0 at step 0 and reach the peak at `warmup_steps`.
"""
from typing import Optional, Union

import jax.numpy as jnp

_F32 = jnp.float32


def _f(x):
  return jnp.asarray(x, _F32)


def _progress(pos, start, length):
  """Fraction of [start, start + length] covered by pos, clipped to [0, 1]."""
  return jnp.clip((_f(pos) - start) / jnp.maximum(_f(length), 1.0), 0.0, 1.0)


_DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + jnp.cos(jnp.pi * p)),
    "1-sqrt": lambda p: 1.0 - jnp.sqrt(p),
}


def _shape(name: str):
  if name not in _DECAY_SHAPES:
    raise ValueError(f"decay shape {name!r} is not one of {sorted(_DECAY_SHAPES)}")
  return _DECAY_SHAPES[name]


def power_law_lr(tokens, batch_size, *, a: float = 4.0, b: float = -0.51, lr_max: float = 0.02):
  """η_power(n) = min(η_max, β·a·n^b): Shen et al. 2024 (Power Scheduler, arXiv 2408.13359) Eq. 7.

  n = tokens seen, β = batch size in sequences (IBM/levanter units; a_tokens = a_seq/seq_len).
  """
  n = jnp.maximum(_f(tokens), 1.0)
  return jnp.minimum(_f(lr_max), _f(batch_size) * a * n ** b)


def power(
    tokens,
    batch_size,
    *,
    a: float = 4.0,
    b: float = -0.51,
    lr_max: float = 0.02,
    warmup_tokens=0,
    decay_start_tokens=None,
    decay_tokens=None,
    decay: str = "exp",
    decay_final_ratio: float = 0.01,
):
  """Power Scheduler, Shen et al. 2024 Eq. 7 with linear warmup and optional final decay.

  η(n) = (n/N_w)·η_power(N_w) for n < N_w; η_power(n) after; for n > N − N_decay
  (`decay_start_tokens`) η = f(p)·η_power(N − N_decay), p = progress through `decay_tokens`,
  f = r^p ('exp') or 1 − (1 − r)p ('linear'), r = `decay_final_ratio` (decay form:
  docs/papers.md §2.2 [MEM]). `tokens` is the real token history (summed over realised batch
  sizes) and `batch_size` the current β, so the value never depends on the planned run length
  and a mid-run batch change takes effect at once. Defaults: IBM config a=4, b=−0.51, η_max=0.02.
  """
  n = _f(tokens)
  eta = lambda m: power_law_lr(m, batch_size, a=a, b=b, lr_max=lr_max)
  n_w = _f(warmup_tokens)
  lr = jnp.where(n < n_w, n / jnp.maximum(n_w, 1.0) * eta(n_w), eta(n))
  if decay_start_tokens is None:
    return lr
  if decay_tokens is None:
    raise ValueError("power schedule: decay_start_tokens is set but decay_tokens is None")
  p = _progress(n, _f(decay_start_tokens), decay_tokens)
  if decay == "exp":
    if not decay_final_ratio > 0:
      raise ValueError("power schedule: decay='exp' needs decay_final_ratio > 0")
    f = _f(decay_final_ratio) ** p
  elif decay == "linear":
    f = 1.0 - (1.0 - decay_final_ratio) * p
  else:
    raise ValueError(f"power schedule: decay {decay!r} is not one of ['exp', 'linear']")
  return jnp.where(n > _f(decay_start_tokens), f * eta(decay_start_tokens), lr)


def _warmup_then(step, peak, warmup_steps, after):
  """Linear warmup 0 → peak over warmup_steps (Goyal et al. 2017 §2.2), then `after`."""
  s = _f(step)
  w = _f(warmup_steps)
  return jnp.where(s < w, peak * s / jnp.maximum(w, 1.0), after)


def wsd(
    step,
    *,
    peak: float,
    warmup_steps,
    stable_steps,
    decay_steps,
    decay_shape: str = "linear",
    final_lr: float = 0.0,
    decay_start=None,
):
  """Warmup-Stable-Decay (Hu et al. 2024, MiniCPM §4; shapes incl. 1-sqrt: Hägele et al. 2024 §3).

  lr = peak after warmup until `decay_start` (default warmup + stable; may be any traced
  stable-phase step, to branch a cooldown from a checkpoint), then
  final + (peak − final)·s(p) over `decay_steps`, s = 1−p | ½(1+cos πp) | 1−√p.
  """
  shape = _shape(decay_shape)
  start = _f(warmup_steps) + _f(stable_steps) if decay_start is None else _f(decay_start)
  p = _progress(step, start, decay_steps)
  after = jnp.where(_f(step) < start, _f(peak), final_lr + (peak - final_lr) * shape(p))
  return _warmup_then(step, peak, warmup_steps, after)


def warmup_poly(
    step, *, peak: float, warmup_steps, total_steps, power: float = 1.0, end_lr: float = 0.0,
    phase_start=0,
):
  """LAMB/BERT recipe: linear warmup, then η = end + (peak − end)(1 − p)^power (You et al. 2020 §4).

  p runs over [warmup, total] of the phase (Google BERT decays over [0, total] and jumps by
  peak·warmup/total at the warmup end; this keeps it continuous). `phase_start` restarts the
  phase, re-warming from 0 as in the 64k/32k mixed-batch run; steps are then phase-relative.
  """
  s = jnp.maximum(_f(step) - _f(phase_start), 0.0)
  p = _progress(s, _f(warmup_steps), _f(total_steps) - _f(warmup_steps))
  return _warmup_then(s, peak, warmup_steps, end_lr + (peak - end_lr) * (1.0 - p) ** power)


def cosine(step, *, peak: float, warmup_steps, total_steps, final_lr: float = 0.0):
  """Warmup + cosine to final_lr at total_steps (Loshchilov & Hutter 2017, SGDR Eq. 5)."""
  p = _progress(step, _f(warmup_steps), _f(total_steps) - _f(warmup_steps))
  return _warmup_then(step, peak, warmup_steps, final_lr + (peak - final_lr) * _shape("cosine")(p))


def linear(step, *, peak: float, warmup_steps, total_steps, final_lr: float = 0.0):
  """Warmup + linear decay η(1 − t/T) (Defazio et al. 2023; docs/papers.md §9.4)."""
  p = _progress(step, _f(warmup_steps), _f(total_steps) - _f(warmup_steps))
  return _warmup_then(step, peak, warmup_steps, final_lr + (peak - final_lr) * (1.0 - p))


def constant(step, *, peak: float, warmup_steps=0):
  """Warmup + constant peak."""
  return _warmup_then(step, peak, warmup_steps, _f(peak))


_RULES = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}


def batch_size_exponent(rule: Union[str, float]) -> float:
  """p for `batch_size_lr`: 'linear' 1, 'sqrt' 0.5, 'none' 0, or a number (also as a string)."""
  if isinstance(rule, str) and rule in _RULES:
    return _RULES[rule]
  try:
    return float(rule)
  except ValueError:
    raise ValueError(
        f"batch-size rule {rule!r} is not one of {sorted(_RULES)} or a number") from None


def batch_size_lr(lr0, batch_size, base_batch_size, rule: Union[str, float] = "sqrt"):
  """lr(B) = lr(B0)·(B/B0)^p: p=1 Goyal et al. 2017 / Granziol et al. 2022 (SGD); p=0.5 Hoffer
  et al. 2017 §4 and Granziol et al. (Adam) (docs/papers.md §5, §6). B and B0 in the same units.
  """
  p = batch_size_exponent(rule)
  return _f(lr0) * (_f(batch_size) / _f(base_batch_size)) ** p
