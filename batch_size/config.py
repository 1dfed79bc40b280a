"""The `config.batch_size` block: defaults, validation and the ramp-schedule helper.

Sizes are in examples (sequences); `micro_batch_size` is the global number of examples in one
micro-batch (summed over data-parallel devices) and every batch is a multiple of it. The
controllers that read the block are in `controllers.py`.
"""

from __future__ import annotations

import ml_collections

CONTROLLERS = ("fixed", "ramp", "noise_scale", "norm_test", "augmented_inner_product")
RAMP_UNITS = ("tokens", "steps")


def linear_ramp_schedule(start_batch: int, end_batch: int, increment: int, ramp_length: float,
                         start: float = 0) -> tuple[tuple[float, int], ...]:
  """Piecewise-constant ramp in equal increments (GPT-3 and MaxText style rampup).

  The batch goes start_batch, start_batch + increment, ..., end_batch; each level starts at an
  equal fraction of `ramp_length` (tokens or steps) after `start`. Feed to `ramp.schedule`.
  """
  if increment <= 0 or (end_batch - start_batch) % increment:
    raise ValueError(f"linear_ramp_schedule: end_batch - start_batch = {end_batch - start_batch} "
                     f"must be a non-negative multiple of increment = {increment}")
  levels = (end_batch - start_batch) // increment
  if levels == 0:
    return ((start, start_batch),)
  return tuple((start + ramp_length * i / levels, start_batch + i * increment)
               for i in range(levels + 1))


def default_batch_size_config() -> ml_collections.ConfigDict:
  """The `config.batch_size` block; every field a controller reads. Sizes are in examples."""
  c = ml_collections.ConfigDict()
  # One of CONTROLLERS: fixed | ramp | noise_scale | norm_test | augmented_inner_product.
  c.controller = "fixed"
  c.micro_batch_size = 32  # global examples per micro-batch; every batch is a multiple of it
  c.initial_batch_size = 256  # global batch at step 0 (fixed / noise_scale / adaptive tests)
  c.min_batch_size = 32  # noise_scale clips into [min, max]
  c.max_batch_size = 65536  # cap for noise_scale and the adaptive tests
  c.history_capacity = 64  # batch-size changes kept in the state (ring buffer)

  c.ramp = ml_collections.ConfigDict()
  c.ramp.unit = "tokens"  # tokens | steps: what the thresholds count
  # (threshold, batch_size) pairs, thresholds increasing; below the first: initial_batch_size.
  c.ramp.schedule = ((0, 256),)

  c.noise_scale = ml_collections.ConfigDict()
  c.noise_scale.decay = 0.99  # EMA decay of |G|^2 and tr(Sigma) estimates
  c.noise_scale.multiplier = 1.0  # target batch = multiplier * B_simple
  c.noise_scale.only_grow = False  # if True the batch never shrinks
  c.noise_scale.warmup_steps = 20  # measurements before the batch may change
  c.noise_scale.update_interval = 1  # change the batch only on steps divisible by this

  c.adaptive = ml_collections.ConfigDict()  # AdAdaGrad tests (Lau et al. 2024)
  c.adaptive.eta = 0.1  # norm test
  c.adaptive.theta = 0.1  # inner-product test
  c.adaptive.nu = 0.1  # orthogonality test
  c.adaptive.interval = 1  # run the test on steps divisible by this
  return c


def batch_size_block(config) -> ml_collections.ConfigDict:
  """`config.batch_size` of a root config, or `config` itself if it is the block."""
  return config.batch_size if "batch_size" in config else config


def validate_batch_size_config(config) -> None:
  """Raises ValueError with one line naming the field, its value and what is valid."""
  c = batch_size_block(config)

  def bad(field, value, valid):
    raise ValueError(f"config.batch_size.{field}={value!r}: {valid}")

  if c.controller not in CONTROLLERS:
    bad("controller", c.controller, f"valid choices are {', '.join(CONTROLLERS)}")
  micro = c.micro_batch_size
  if not isinstance(micro, int) or micro <= 0:
    bad("micro_batch_size", micro, "must be a positive int")
  for field in ("initial_batch_size", "min_batch_size", "max_batch_size"):
    v = c[field]
    if not isinstance(v, int) or v <= 0 or v % micro:
      bad(field, v, f"must be a positive multiple of micro_batch_size={micro}")
  if not c.min_batch_size <= c.max_batch_size:
    bad("min_batch_size", c.min_batch_size, f"must be <= max_batch_size={c.max_batch_size}")
  if not isinstance(c.history_capacity, int) or c.history_capacity < 1:
    bad("history_capacity", c.history_capacity, "must be a positive int")
  if c.controller == "ramp":
    if c.ramp.unit not in RAMP_UNITS:
      bad("ramp.unit", c.ramp.unit, f"valid choices are {', '.join(RAMP_UNITS)}")
    sched = tuple(tuple(p) for p in c.ramp.schedule)
    if not sched or any(len(p) != 2 for p in sched):
      bad("ramp.schedule", c.ramp.schedule, "must be a non-empty list of (threshold, batch_size)")
    thresholds = [p[0] for p in sched]
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
      bad("ramp.schedule", c.ramp.schedule, "thresholds must be strictly increasing")
    for _, b in sched:
      if int(b) != b or b <= 0 or int(b) % micro:
        bad("ramp.schedule", c.ramp.schedule,
            f"batch sizes must be positive multiples of micro_batch_size={micro}")
  if c.controller == "noise_scale":
    if not 0.0 <= c.noise_scale.decay < 1.0:
      bad("noise_scale.decay", c.noise_scale.decay, "must be in [0, 1)")
    if not c.noise_scale.multiplier > 0:
      bad("noise_scale.multiplier", c.noise_scale.multiplier, "must be > 0")
    if c.noise_scale.update_interval < 1:
      bad("noise_scale.update_interval", c.noise_scale.update_interval, "must be >= 1")
  if c.controller in ("norm_test", "augmented_inner_product"):
    for field in ("eta", "theta", "nu"):
      if not c.adaptive[field] > 0:
        bad(f"adaptive.{field}", c.adaptive[field], "must be > 0")
    if c.adaptive.interval < 1:
      bad("adaptive.interval", c.adaptive.interval, "must be >= 1")
