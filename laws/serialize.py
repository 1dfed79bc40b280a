"""The laws dict to and from its JSON-ready form (laws/report.py writes it as laws.json).

A fit is stored as its `Fit.to_dict()`, whose 'type' names the class that reads it back.
"""
from typing import Any

from laws import chinchilla
from laws import common
from laws import critical_batch
from laws import lr_optimum
from laws import power_scheduler
from laws import step_law

LAW_KEYS = ('lr_optima', 'step_law', 'chinchilla', 'critical_batch', 'power_scheduler')

FIT_TYPES = {c.__name__: c for c in (common.Fit, lr_optimum.LrOptimum, step_law.StepLawFit,
                                     chinchilla.ChinchillaFit,
                                     critical_batch.CriticalBatchFit,
                                     critical_batch.CriticalBatchLaw,
                                     power_scheduler.PowerSchedulerFit)}


def fit_from_dict(d: dict[str, Any]) -> common.Fit:
  """The fit a `Fit.to_dict()` came from, of the class its 'type' names."""
  return FIT_TYPES[d['type']].from_dict(d)


def laws_to_dict(laws: dict) -> dict[str, Any]:
  """JSON-ready form of a laws dict (fits to dicts, lists of fits to lists)."""
  return {k: common.jsonable(v) for k, v in laws.items()}


def laws_from_dict(d: dict[str, Any]) -> dict:
  """Inverse of `laws_to_dict`: dicts with a 'type' back to fits."""
  def decode(v):
    if isinstance(v, dict) and v.get('type') in FIT_TYPES:
      return fit_from_dict(v)
    if isinstance(v, list) and v and all(isinstance(x, dict) and 'type' in x for x in v):
      return [decode(x) for x in v]
    return v
  return {k: decode(v) for k, v in d.items()}
