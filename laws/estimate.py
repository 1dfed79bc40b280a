"""Predictions at a target (N, D) from fitted laws: lr*, B*, loss and the compute-optimal split.

Each estimate is the law at its point estimate with a percentile interval of the law at every
bootstrap draw. The laws: Step Law (docs/papers.md §4.1), Chinchilla approach 3 (§9.7).
"""
import dataclasses

import numpy as np

from laws import common


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A predicted value and its interval (NaN bounds when there are no bootstrap draws)."""
  value: float
  lo: float
  hi: float


def _estimate(point, draws, level):
  draws = np.asarray(draws, float).ravel()
  draws = draws[np.isfinite(draws)]
  if len(draws) < 2:
    return Estimate(float(point), float('nan'), float('nan'))
  lo, hi = common.percentiles(draws, level)
  return Estimate(float(point), float(lo), float(hi))


def predict(laws: dict, N: float, D: float, *, level: float = 0.95) -> dict[str, Estimate]:
  """lr*, B* and loss at N parameters and D tokens, from whichever laws are present.

  laws: the dict of `laws.report.fit_all` (keys 'step_law', 'chinchilla'). Intervals are
  percentiles of the law evaluated at every bootstrap draw. Keys: 'lr', 'batch_size' (in
  laws['step_law'].batch_unit) and 'loss'; also 'N_opt', 'D_opt' for the compute C = 6ND
  when L(N, D) is known (Hoffmann et al. 2022, Eq. 4).
  """
  out = {}
  step = laws.get('step_law')
  if step is not None:
    out['lr'] = _estimate(step.lr(N, D), step.lr(N, D, samples=True), level)
    out['batch_size'] = _estimate(step.batch_size(D), step.batch_size(D, samples=True), level)
  chin = laws.get('chinchilla')
  if chin is not None:
    out['loss'] = _estimate(chin.loss(N, D), chin.loss(N, D, samples=True), level)
    n_opt, d_opt = chin.compute_optimal(6 * N * D)
    n_s, d_s = chin.compute_optimal(6 * N * D, samples=True)
    out['N_opt'] = _estimate(n_opt, n_s, level)
    out['D_opt'] = _estimate(d_opt, d_s, level)
  return out
