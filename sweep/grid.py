"""The scaling-law grid: its points, their trainer configs and N.

  coords = validate(config)                 # every point of config.grid, checked
  cfg = trial_config(config, coords[0])     # the trainer config of one trial
  sweep_points = points(config)             # as sweep points (sweep/point.py)

The sweep's default study: `points` turns the grid into sweep points (overrides of
config.base, lr as the runtime lr_scale) and the driver fits the laws to their rows.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

import data as data_lib
from models import flops as flops_lib
from models import transformer
from optimizers import factory as opt_factory
from sweep import point as point_lib

SCHEDULES = ("cosine", "linear", "wsd", "constant", "warmup_poly")  # the ones with a peak_lr
PARAMETRIZATIONS = ("standard", "mup")


@dataclasses.dataclass(frozen=True)
class Point:
  """One grid point: one trial."""
  d_model: int
  num_layers: int
  tokens: int  # D
  batch_size: int  # B, sequences
  lr: float  # peak learning rate
  optimizer: str = "adamw"
  schedule: str = "cosine"
  parametrization: str = "standard"
  seed: int = 0

  @property
  def key(self) -> str:
    return f"{self.cell}-lr{self.lr:.6g}-s{self.seed}"

  @property
  def cell(self) -> str:
    """What a compiled train step depends on: everything but lr and seed."""
    return (f"d{self.d_model}-l{self.num_layers}-D{self.tokens}-B{self.batch_size}-"
            f"{self.optimizer}-{self.schedule}-{self.parametrization}")

  @property
  def group(self) -> str:
    """Trials that can train in one vectorised program: one cell and one seed."""
    return f"{self.cell}-s{self.seed}"

  @property
  def model(self) -> tuple:
    """What the init and eval step depend on."""
    return (self.d_model, self.num_layers, self.optimizer, self.parametrization)

  @property
  def family(self) -> str:
    """Trials whose laws are fitted together."""
    return f"{self.optimizer}-{self.schedule}-{self.parametrization}"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Point":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def learning_rates(grid) -> list[float]:
  """The lr axis: grid.learning_rates, else num_lrs log-spaced in [lr_min, lr_max]."""
  if len(grid.learning_rates):
    lrs = [float(x) for x in grid.learning_rates]
  else:
    if not (grid.lr_min > 0 and grid.lr_max >= grid.lr_min and grid.num_lrs >= 1):
      raise ValueError(f"config.grid.lr_min={grid.lr_min}, lr_max={grid.lr_max}, num_lrs="
                       f"{grid.num_lrs}: need 0 < lr_min <= lr_max and num_lrs >= 1.")
    lrs = np.geomspace(grid.lr_min, grid.lr_max, grid.num_lrs).tolist()
  if not all(lr > 0 for lr in lrs):
    raise ValueError(f"config.grid.learning_rates={tuple(lrs)}: must be positive.")
  return sorted({float(f"{lr:.6g}") for lr in lrs})


def _ints(values, field, minimum=1) -> list[int]:
  out = []
  for v in values:
    if not (isinstance(v, (int, float)) and float(v) == int(v) and int(v) >= minimum):
      raise ValueError(f"config.{field}={tuple(values)!r}: need integers >= {minimum}.")
    out.append(int(v))
  if not out:
    raise ValueError(f"config.{field} is empty.")
  return out


def _choices(values, valid, field) -> list[str]:
  values = list(values)
  bad = [v for v in values if v not in valid]
  if bad or not values:
    raise ValueError(f"config.{field}={tuple(values)!r}: choose from {list(valid)}.")
  return values


def num_steps(config, point: Point) -> int:
  return max(1, round(point.tokens / (point.batch_size * config.base.seq_len)))


def grid_points(config) -> list[Point]:
  """Every point of the grid, validated, in a stable order (cells together)."""
  g = config.grid
  models = []
  for m in g.models:
    if len(m) != 2:
      raise ValueError(f"config.grid.models: {m!r} is not a (d_model, num_layers) pair.")
    d, layers = _ints(m, "grid.models")
    if d % g.head_dim:
      raise ValueError(f"config.grid.models: d_model={d} is not a multiple of "
                       f"config.grid.head_dim={g.head_dim}.")
    models.append((d, layers))
  if not models:
    raise ValueError("config.grid.models is empty.")
  tokens = _ints(g.tokens, "grid.tokens")
  batches = _ints(g.batch_sizes, "grid.batch_sizes")
  seeds = _ints(g.seeds, "grid.seeds", minimum=0)
  optimizers = _choices(g.optimizers, opt_factory.OPTIMIZERS, "grid.optimizers")
  schedules = _choices(g.schedules, SCHEDULES, "grid.schedules")
  params = _choices(g.parametrizations, PARAMETRIZATIONS, "grid.parametrizations")
  lrs = learning_rates(g)
  for D in tokens:
    for B in batches:
      steps = D / (B * config.base.seq_len)
      if steps < 2:
        raise ValueError(f"config.grid.tokens: D={D} at B={B} (seq_len "
                         f"{config.base.seq_len}) is {steps:.2g} steps; need at least 2.")
  points = [Point(d, layers, D, B, lr, opt, sched, param, seed)
            for opt in optimizers for sched in schedules for param in params
            for d, layers in models for D in tokens for B in batches for seed in seeds
            for lr in lrs]
  return points


def validate(config) -> list[Point]:
  """Checks the sweep config before anything compiles; returns the grid."""
  point_lib.check_runtime(config)
  if not 0 <= config.warmup_fraction < 1 or not 0 <= config.decay_fraction <= 1:
    raise ValueError(f"config.warmup_fraction={config.warmup_fraction} / decay_fraction="
                     f"{config.decay_fraction}: fractions in [0, 1).")
  if config.num_evals < 2:
    raise ValueError(f"config.num_evals={config.num_evals}: need >= 2 for a loss curve.")
  if config.checkpoints_per_trial < 1:
    raise ValueError(f"config.checkpoints_per_trial={config.checkpoints_per_trial}: need >= 1.")
  return grid_points(config)


def eval_steps(steps: int, num: int) -> list[int]:
  """num log-spaced steps in [1, steps], always including the last."""
  return sorted({int(x) for x in np.round(np.geomspace(1, steps, num))} | {steps})


def model_config(config, point: Point) -> ml_collections.ConfigDict:
  m = config.base.model.copy_and_resolve_references()
  m.d_model = point.d_model
  m.num_layers = point.num_layers
  m.num_heads = point.d_model // config.grid.head_dim
  m.mlp_dim = config.grid.mlp_ratio * point.d_model
  m.parametrization = point.parametrization
  if point.parametrization == "mup":  # μP's base width: the grid's narrowest model
    m.base_d_model = min(d for d, _ in config.grid.models)
  return m


def num_params(config, point: Point) -> int:
  """N: matmul parameters (models.flops; embedding lookup excluded, readout included)."""
  cfg = transformer.TransformerConfig.from_config(model_config(config, point),
                                                  data_lib.vocab_size(config.base.data))
  return flops_lib.decoder_matmul_params(cfg)


def loss_bound(config) -> float:
  """config.loss_bound, or 1.5 x the loss of a uniform prediction over the model's
  (padded) vocabulary, which is about where training starts."""
  if config.loss_bound:
    return config.loss_bound
  cfg = transformer.TransformerConfig.from_config(config.base.model,
                                                  data_lib.vocab_size(config.base.data))
  return 1.5 * math.log(cfg.vocab_size)


def trial_config(config, point: Point, *, device_peak_flops: float = 0.0):
  """The trainer config of one trial: lr as the runtime lr_scale over a peak-1 schedule."""
  c = config.base.copy_and_resolve_references()
  steps = num_steps(config, point)
  c.model = model_config(config, point)
  c.global_batch_size = point.batch_size
  c.num_steps = steps
  c.seed = point.seed
  c.lr_scale = point.lr
  c.optimizer.name = point.optimizer
  sch = c.schedule
  sch.name = point.schedule
  sch.peak_lr = 1.0
  sch.total_steps = steps
  sch.warmup_steps = int(round(config.warmup_fraction * steps))
  sch.final_lr = 0.0
  if point.schedule == "wsd":
    sch.decay_steps = int(round(config.decay_fraction * steps))
    sch.stable_steps = max(0, steps - sch.warmup_steps - sch.decay_steps)
  c.eval_every = 0
  c.log_every = max(1, steps // 5)
  c.checkpoint_every = max(1, math.ceil(steps / config.checkpoints_per_trial))
  c.loss_bound = loss_bound(config)
  c.nan_policy = "stop"
  c.device_peak_flops = float(device_peak_flops)
  with c.unlocked():
    c.eval_steps = tuple(eval_steps(steps, config.num_evals))
  return c


# ----------------------------------------------------------------------------------------
# As sweep points.


def overrides(config, point: Point) -> dict:
  """trial_config's fields (dotted paths) that differ from config.base, but lr and seed."""
  return point_lib.overrides(config.base, trial_config(config, point))


def _row(p: Point, n: int, seq_len: int) -> dict:
  """The columns of a trial's row (report.fit_all's format)."""
  return dict(N=n, D=p.tokens, B=p.batch_size, lr=p.lr, seq_len=seq_len, d_model=p.d_model,
              num_layers=p.num_layers, optimizer=p.optimizer, schedule=p.schedule,
              parametrization=p.parametrization, seed=p.seed)


def _model(p: Point) -> str:
  return f"d{p.d_model}-l{p.num_layers}-{p.optimizer}-{p.parametrization}"


def points(config) -> list[point_lib.Point]:
  """The grid (validated) as sweep points, keyed and grouped as the grid's own points."""
  cells: dict[str, tuple] = {}
  out = []
  for p in validate(config):
    if p.cell not in cells:
      cells[p.cell] = (overrides(config, p), num_params(config, p))
    over, n = cells[p.cell]
    out.append(point_lib.Point(p.key, over, lr_scale=p.lr, seed=p.seed, cell=p.cell,
                               model=_model(p), row=_row(p, n, config.base.seq_len)))
  return out


def legacy_point(d: dict, config=None) -> point_lib.Point:
  """A point stored in the grid's own format (Point.to_dict with N, seq_len; stores from
  before sweep points) as a sweep point; its overrides need the config."""
  p = Point.from_dict(d)
  over = overrides(config, p) if config is not None else {}
  return point_lib.Point(p.key, over, lr_scale=p.lr, seed=p.seed, cell=p.cell,
                         model=_model(p), row=_row(p, d["N"], d["seq_len"]))
