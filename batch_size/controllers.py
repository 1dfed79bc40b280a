"""Batch-size controllers the training loop calls: fixed, ramp, noise_scale and AdAdaGrad tests.

`make_controller(config)` builds the controller named by `config.batch_size.controller`
(`config.py`). Each is a pure, jittable `update(state, measurements, step, tokens) ->
(state, num_microbatches)` whose state (`ControllerState`) is a pytree of arrays with the same
structure for every controller, including a fixed-capacity history of batch-size changes.

- fixed: `initial_batch_size` throughout.
- ramp: piecewise-constant schedule over tokens or steps (GPT-3 / MaxText rampup).
- noise_scale: batch = multiplier * B_simple (McCandlish et al. 2018, arXiv 1812.06162,
  Sec. 2.2 and App. A; `noise_scale.py`), clipped into [min, max]; docs/papers.md §9.8.
- norm_test, augmented_inner_product: AdAdaGrad's tests (Lau et al. 2024, arXiv 2402.11215;
  `norm_tests.py`); the batch only grows, up to max; docs/papers.md §3.

Units. Batch sizes are in examples (sequences); a controller returns the number of micro-batches
k = global batch / `micro_batch_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from batch_size import config as config_lib
from batch_size import noise_scale as noise_lib
from batch_size import norm_tests


class BatchSizeHistory(NamedTuple):
  """Ring buffer of the latest `capacity` batch-size changes; a checkpointable pytree.

  Entry (step, batch_size) means: from `step` on, the global batch is `batch_size` examples.
  `count` is the total number of changes ever recorded (> capacity once the oldest were lost).
  """

  steps: jax.Array  # int32 [capacity]
  batch_sizes: jax.Array  # int32 [capacity]
  count: jax.Array  # int32 []


def history_init(capacity: int, batch_size, step=0) -> BatchSizeHistory:
  """A history holding one entry: `batch_size` from `step` on."""
  steps = jnp.zeros((capacity,), jnp.int32).at[0].set(step)
  sizes = jnp.zeros((capacity,), jnp.int32).at[0].set(batch_size)
  return BatchSizeHistory(steps=steps, batch_sizes=sizes, count=jnp.ones((), jnp.int32))


def history_record(history: BatchSizeHistory, step, batch_size) -> BatchSizeHistory:
  """Appends (step, batch_size) if batch_size differs from the latest entry."""
  capacity = history.steps.shape[0]
  last = history.batch_sizes[(history.count - 1) % capacity]
  changed = jnp.asarray(batch_size, jnp.int32) != last
  i = history.count % capacity
  return BatchSizeHistory(
      steps=jnp.where(changed, history.steps.at[i].set(step), history.steps),
      batch_sizes=jnp.where(changed, history.batch_sizes.at[i].set(batch_size),
                            history.batch_sizes),
      count=history.count + changed.astype(jnp.int32))


def history_entries(history: BatchSizeHistory) -> list[tuple[int, int]]:
  """Host-side list of the retained (step, batch_size) entries, oldest first."""
  steps, sizes = np.asarray(history.steps), np.asarray(history.batch_sizes)
  count, capacity = int(history.count), steps.shape[0]
  idx = [(i % capacity) for i in range(max(0, count - capacity), count)]
  return [(int(steps[i]), int(sizes[i])) for i in idx]


class Measurements(NamedTuple):
  """What the trainer measured this step; fields a controller does not need may stay None.

  noise_scale reads sq_norm_small, sq_norm_big, b_small, b_big (see
  `noise_scale.noise_scale_update`); norm_test and augmented_inner_product read grad_stats
  (`norm_tests.gradient_statistics`). `noise`, if given, is this step's already updated
  noise-scale state (`with_noise_scale`): every controller stores it, and noise_scale reads
  B_simple from it instead of folding the two-batch norms in again. If None, noise_scale
  computes it from the norms and the other controllers keep the state's noise.
  """

  sq_norm_small: Optional[jax.Array] = None
  sq_norm_big: Optional[jax.Array] = None
  b_small: Optional[jax.Array] = None
  b_big: Optional[jax.Array] = None
  grad_stats: Optional[norm_tests.GradientStatistics] = None
  noise: Optional[noise_lib.NoiseScaleState] = None


class ControllerState(NamedTuple):
  """Same structure for every controller, so one checkpoint layout fits all."""

  num_microbatches: jax.Array  # int32 [], k for the next step
  noise: noise_lib.NoiseScaleState
  history: BatchSizeHistory


@dataclasses.dataclass(frozen=True)
class Controller:
  """A batch-size controller. `update` is pure and jittable; call it after step `step` finished.

  update(state, measurements, step, tokens) -> (state, num_microbatches for step + 1), where
  `tokens` counts tokens trained on up to and including `step` (pass float32: int32 overflows
  past 2^31 tokens). The history records the step at which each new size takes effect.
  """

  name: str
  micro_batch_size: int
  init: Callable[[], ControllerState]
  update: Callable[..., tuple[ControllerState, jax.Array]]
  needs_sq_norms: bool  # fill Measurements.sq_norm_small/big, b_small/b_big
  needs_grad_stats: bool  # fill Measurements.grad_stats


def with_noise_scale(noise: noise_lib.NoiseScaleState, measurements: Measurements,
                     decay=0.99) -> tuple[Measurements, jax.Array]:
  """Folds this step's two-batch norms into `noise`, once (McCandlish et al. 2018, App. A).

  Returns (measurements with `noise` set to the updated state, B_simple); pass the former
  to `Controller.update`, which then does not recompute the EMAs (see `Measurements`).
  """
  noise, b_simple = noise_lib.noise_scale_update(
      noise, measurements.sq_norm_small, measurements.sq_norm_big, measurements.b_small,
      measurements.b_big, decay)
  return measurements._replace(noise=noise), b_simple


def _take_noise(state: ControllerState, measurements: Measurements) -> ControllerState:
  """The state with the step's updated noise state, if the measurements carry one."""
  if measurements.noise is None:
    return state
  return state._replace(noise=measurements.noise)


def _require(measurements: Measurements, fields: Sequence[str], name: str) -> None:
  missing = [f for f in fields if getattr(measurements, f) is None]
  if missing:
    raise ValueError(f"batch-size controller {name!r} needs Measurements.{', '.join(missing)}")


@dataclasses.dataclass(frozen=True)
class _Common:
  """What every controller kind shares: the validated block and its sizes in micro-batches."""

  c: ml_collections.ConfigDict
  micro: int
  min_mb: int
  max_mb: int

  def make_state(self, num_microbatches: int) -> ControllerState:
    return ControllerState(
        num_microbatches=jnp.asarray(num_microbatches, jnp.int32),
        noise=noise_lib.noise_scale_init(),
        history=history_init(self.c.history_capacity, num_microbatches * self.micro))

  def initial_state(self) -> ControllerState:
    return self.make_state(self.c.initial_batch_size // self.micro)

  def finish(self, state: ControllerState, new_mb, step) -> tuple[ControllerState, jax.Array]:
    """Sets k for step + 1 and records a change in the history."""
    new_mb = jnp.asarray(new_mb, jnp.int32)
    history = history_record(state.history, jnp.asarray(step, jnp.int32) + 1, new_mb * self.micro)
    return state._replace(num_microbatches=new_mb, history=history), new_mb


def _fixed(m: _Common) -> Controller:
  """`initial_batch_size` on every step."""

  def update(state, measurements, step, tokens):
    del step, tokens
    return _take_noise(state, measurements), state.num_microbatches

  return Controller("fixed", m.micro, m.initial_state, update, False, False)


def _ramp(m: _Common) -> Controller:
  """Piecewise-constant schedule of (threshold, batch) over tokens or steps."""
  c, micro = m.c, m.micro
  sched = tuple(tuple(p) for p in c.ramp.schedule)
  dtype = jnp.float32 if c.ramp.unit == "tokens" else jnp.int32
  thresholds = np.asarray([p[0] for p in sched])
  levels_mb = np.asarray([int(p[1]) // micro for p in sched], np.int32)
  initial_mb = c.initial_batch_size // micro

  def ramp_mb(x):
    # Index of the last threshold <= x; -1 (before the ramp) gives initial_batch_size.
    i = jnp.sum(jnp.asarray(thresholds, dtype) <= jnp.asarray(x, dtype)) - 1
    return jnp.where(i >= 0, jnp.asarray(levels_mb)[jnp.maximum(i, 0)], initial_mb)

  def init():
    return m.make_state(int(ramp_mb(0)))

  def update(state, measurements, step, tokens):
    x = tokens if c.ramp.unit == "tokens" else jnp.asarray(step, jnp.int32) + 1
    return m.finish(_take_noise(state, measurements), ramp_mb(x), step)

  return Controller("ramp", micro, init, update, False, False)


def _noise_scale(m: _Common) -> Controller:
  """Batch = multiplier * B_simple (McCandlish et al. 2018, Sec. 2.2), clipped to [min, max]."""
  ns, micro, name = m.c.noise_scale, m.micro, "noise_scale"

  def update(state, measurements, step, tokens):
    del tokens
    if measurements.noise is None:  # not measured by the caller: fold the norms in here
      _require(measurements, ("sq_norm_small", "sq_norm_big", "b_small", "b_big"), name)
      measurements, _ = with_noise_scale(state.noise, measurements, ns.decay)
    noise = measurements.noise
    b_simple = noise_lib.noise_scale_value(noise)
    target_mb = jnp.ceil(jnp.where(jnp.isfinite(b_simple), ns.multiplier * b_simple, 0.0)
                         / micro)
    target_mb = jnp.clip(target_mb, m.min_mb, m.max_mb).astype(jnp.int32)
    if ns.only_grow:
      target_mb = jnp.maximum(target_mb, state.num_microbatches)
    act = ((noise.count >= ns.warmup_steps) & jnp.isfinite(b_simple) & (b_simple > 0)
           & (jnp.asarray(step) % ns.update_interval == 0))
    new_mb = jnp.where(act, target_mb, state.num_microbatches)
    return m.finish(state._replace(noise=noise), new_mb, step)

  return Controller(name, micro, m.initial_state, update, True, False)


def _adaptive(m: _Common) -> Controller:
  """AdAdaGrad's norm test or augmented inner-product test (Lau et al. 2024); only grows."""
  ad, micro, name = m.c.adaptive, m.micro, m.c.controller

  def update(state, measurements, step, tokens):
    del tokens
    _require(measurements, ("grad_stats",), name)
    stats = measurements.grad_stats
    if name == "norm_test":
      required = norm_tests.required_batch_norm(stats, ad.eta)
    else:
      required = norm_tests.required_batch_augmented(stats, ad.theta, ad.nu)
    grown = norm_tests.grow_batch(state.num_microbatches, required, micro, m.max_mb)
    act = jnp.asarray(step) % ad.interval == 0
    new_mb = jnp.where(act, grown, state.num_microbatches)
    return m.finish(_take_noise(state, measurements), new_mb, step)

  return Controller(name, micro, m.initial_state, update, False, True)


_KINDS = {"fixed": _fixed, "ramp": _ramp, "noise_scale": _noise_scale,
          "norm_test": _adaptive, "augmented_inner_product": _adaptive}


def make_controller(config) -> Controller:
  """Builds the controller named by `config.batch_size.controller` (root config or the block)."""
  c = config_lib.batch_size_block(config)
  if c.controller not in config_lib.CONTROLLERS:
    raise ValueError(f"config.batch_size.controller={c.controller!r}: valid choices are "
                     f"{', '.join(config_lib.CONTROLLERS)}")
  config_lib.validate_batch_size_config(c)
  micro = c.micro_batch_size
  common = _Common(c, micro, c.min_batch_size // micro, c.max_batch_size // micro)
  return _KINDS[c.controller](common)
