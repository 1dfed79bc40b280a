"""Compiled programs (trainer.Program) by program key, for drivers that run many trials.

A sweep asks for the program of each trial's config; trials whose configs differ only in
host-side fields (train/loop.py: TRIAL_FIELDS, e.g. lr_scale and seed) get the same Program, so
they share its compiled steps and can run vectorised. Programs that build the same model with
the same optimizer (the caller names them by `same_init`) also share the compiled init and
eval step, which do not depend on the batch size or the schedule.
"""
from __future__ import annotations

from typing import Hashable

import jax
import numpy as np

from train import loop
from train import trainer


class Programs:
  """Programs by program key, least recently used dropped beyond `capacity`."""

  def __init__(self, mesh=None, capacity: int = 8):
    self.mesh = mesh
    self.capacity = capacity
    self._programs: dict[str, trainer.Program] = {}
    self._inits: dict[Hashable, trainer.Program] = {}

  def __len__(self) -> int:
    return len(self._programs)

  def get(self, config, *, same_init: Hashable | None = None) -> trainer.Program:
    key = loop.program_key(config)
    if key in self._programs:
      self._programs[key] = self._programs.pop(key)  # most recently used last
      return self._programs[key]
    s = trainer.setup(config, mesh=self.mesh)
    source = self._inits.setdefault(same_init, s) if same_init is not None else s
    if source is not s:
      s.compiled["eval_step"] = trainer.make_eval_step(source)
      s.compiled["init"] = _shared_init(source, s)
    self._programs[key] = s
    while len(self._programs) > self.capacity:
      self._programs.pop(next(iter(self._programs)))
    return s


def _shared_init(source: trainer.Program, s: trainer.Program):
  """s's init through source's compiled one (same model and optimizer); only the batch-size
  controller state, which records B, is s's own."""
  def init(key):
    if "init" not in source.compiled:
      trainer.init_state(source, 0)
    state = source.compiled["init"](key)
    # Via NumPy: one buffer per leaf (init may reuse an array, and the step donates them).
    control = jax.tree.map(np.array, s.controller.init())
    control = jax.device_put(control, s.state_shardings["control"])
    return dict(state, control=control)
  return init
