"""Power scheduler calibration: lr_opt / beta = a T^b from the optima of a WSD sweep.

Shen et al. 2024 (arXiv 2408.13359), Eq. 6; docs/papers.md §2.2. optimizers/schedules.py
runs the schedule (Eq. 7) from the fitted (a, b, lr_max).
"""
import dataclasses
from typing import Any

import numpy as np

from laws import common


@dataclasses.dataclass(frozen=True, eq=False)
class PowerSchedulerFit(common.Fit):
  """lr_opt / beta = a T^b (Shen et al. 2024, Eq. 6), beta in sequences, T in tokens."""
  names = ('a', 'b')
  lr_max: float = float('nan')

  def schedule_config(self) -> dict[str, Any]:
    """The schedule config dict that optimizers/schedules.py reads."""
    return {'name': 'power', 'a': self.params['a'], 'b': self.params['b'],
            'lr_max': self.lr_max}


def fit_power_scheduler(batch_size, tokens, lr_opt, *, lr_max: float | None = None,
                        n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> PowerSchedulerFit:
  """Calibrate the Power scheduler (Shen et al. 2024, arXiv 2408.13359, Eq. 6).

    lr_opt / beta = a · T^b

  from a WSD sweep: beta batch size in sequences, T training tokens, lr_opt the optimal
  learning rate of each (beta, T). Log-space OLS with a row bootstrap. lr_max (the cap
  η_max of Eq. 7) defaults to the largest lr_opt observed.
  """
  beta, T, lr = (np.asarray(a, float) for a in (batch_size, tokens, lr_opt))
  ok = common.positive_finite(beta, T, lr)
  beta, T, lr = beta[ok], T[ok], lr[ok]
  X = np.stack([np.ones_like(T), np.log(T)], 1)
  [(coef, rss, draws)] = common.ols_bootstrap([(X, np.log(lr / beta))], n_boot, seed)

  def natural(c):
    c = np.array(c, float).reshape(-1, 2)
    return np.stack([np.exp(c[:, 0]), c[:, 1]], 1)

  names = PowerSchedulerFit.names
  samples = natural(draws)
  return PowerSchedulerFit(params=dict(zip(names, map(float, natural(coef)[0]))),
                           intervals=common.intervals(names, samples, level), objective=rss,
                           n=len(T), samples=common.columns(names, samples),
                           lr_max=float(lr.max() if lr_max is None else lr_max))
