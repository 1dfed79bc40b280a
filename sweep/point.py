"""A sweep point: one trial, as overrides of the sweep's base trainer config under a key.

  p = point.Point("lamb/b64_x1", {"global_batch_size": 64, "optimizer.name": "lamb"},
                  lr_scale=1.0, row={"optimizer": "lamb", "batch_size": 64})
  cfg = point.trial_config(config, p)   # config.base with the overrides

Any study's points run alike: one trial each in the store, claimed by workers, retried,
resumed. Points of one `cell` differ only in the runtime inputs `lr_scale` (the learning-rate
multiplier) and `seed`, so they share one compiled train step, and those of one cell and seed
(a `group`) can train as one vectorised program; by default the cell is a hash of the
overrides. Points of one `model` (by default their cell) also share the compiled init and
eval step: only cells of one model and optimizer may name the same. `row`: the point's
columns in the results (the study's axes, what its analysis reads).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

from train import resume as resume_lib

RUNTIME = ("lr_scale", "seed")  # the point's own fields, never overrides
LAYOUTS = ("auto", "sequential", "vectorized", "measure")


@dataclasses.dataclass(frozen=True)
class Point:
  """One trial: config.base with `overrides` (dotted paths), `lr_scale` and `seed`."""
  key: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  lr_scale: float = 1.0
  seed: int = 0
  cell: str = ""  # '' = cell_of(overrides)
  model: str = ""  # '' = the cell
  row: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    runtime = sorted(set(RUNTIME) & set(self.overrides))
    if runtime:
      raise ValueError(f"point {self.key!r}: {runtime} are the point's own fields "
                       "(lr_scale=, seed=), not overrides.")
    if not self.cell:
      object.__setattr__(self, "cell", cell_of(self.overrides))
    if not self.model:
      object.__setattr__(self, "model", self.cell)

  @property
  def group(self) -> str:
    """Trials that can train in one vectorised program: one cell and one seed."""
    return f"{self.cell}-s{self.seed}"

  def to_dict(self) -> dict:
    return {"key": self.key, "overrides": dict(self.overrides), "lr_scale": self.lr_scale,
            "seed": self.seed, "cell": self.cell, "model": self.model, "row": dict(self.row)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Point":
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def cell_of(overrides: Mapping[str, Any]) -> str:
  """A name for the compiled program of these overrides."""
  text = json.dumps(dict(overrides), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def overrides(base, trial) -> dict:
  """The fields (dotted paths) in which the trainer config `trial` differs from `base`, but
  the runtime lr_scale and seed: what makes a trial's config a point."""
  before = resume_lib.flatten(base.copy_and_resolve_references().to_dict())
  after = resume_lib.flatten(trial.to_dict())
  return {k: v for k, v in after.items()
          if k not in RUNTIME and (k not in before or before[k] != v)}


def trial_config(config, point: Point, *, device_peak_flops: float = 0.0):
  """The trainer config of one trial: config.base with the point's overrides and runtime
  inputs. Lists (as stored) become tuples; a path the base lacks is added."""
  c = config.base.copy_and_resolve_references()
  for path, value in point.overrides.items():
    *parents, leaf = path.split(".")
    node = c
    for name in parents:
      node = node[name]
    with node.unlocked():
      node[leaf] = tuple(value) if isinstance(value, list) else value
  c.lr_scale = float(point.lr_scale)
  c.seed = int(point.seed)
  c.device_peak_flops = float(device_peak_flops)
  return c


def group_size(points) -> int:
  """The most points of one group: a vectorised program's K."""
  sizes: dict[str, int] = {}
  for p in points:
    sizes[p.group] = sizes.get(p.group, 0) + 1
  return max(sizes.values(), default=1)


def check_runtime(config) -> None:
  """Checks what every sweep config has: layout, store.*, the base's batch-size controller."""
  if config.layout not in LAYOUTS:
    raise ValueError(f"config.layout={config.layout!r}: choose from {list(LAYOUTS)}.")
  s = config.store
  if s.max_retries < 0:
    raise ValueError(f"config.store.max_retries={s.max_retries}: must be >= 0.")
  if not (s.heartbeat_s >= 1 and s.grace_s > s.heartbeat_s):
    raise ValueError(f"config.store.grace_s={s.grace_s}: must exceed "
                     f"config.store.heartbeat_s={s.heartbeat_s} (>= 1).")
  if config.layout != "sequential" and config.base.batch_size.controller != "fixed":
    raise ValueError(f"config.base.batch_size.controller={config.base.batch_size.controller!r}"
                     ": vectorised trials need 'fixed'; set config.layout='sequential'.")
