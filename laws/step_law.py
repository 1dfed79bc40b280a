"""Step Law: lr*(N, D) = lr_c N^alpha D^beta and B*(D) = B_c D^gamma.

Li et al. 2025, "Predictable Scale: Part I" (arXiv 2503.04715; docs/papers.md §4.1), fitted
as the authors' code/fit_tool.py does: log-space OLS over the near-optimal runs, bootstrap.
"""
import dataclasses

import numpy as np

from laws import common


@dataclasses.dataclass(frozen=True, eq=False)
class StepLawFit(common.Fit):
  """Step Law: lr* = lr_c N^alpha D^beta, B* = B_c D^gamma (B in batch_unit).

  Methods take samples=True to evaluate at every bootstrap draw (a trailing axis).
  """
  names = ('lr_c', 'alpha', 'beta', 'B_c', 'gamma')
  tol: float = 0.0025
  n_cells: int = 0
  batch_unit: str = 'tokens'

  def lr(self, N, D, samples: bool = False):
    """lr*(N, D)."""
    p = self.values(samples)
    return p['lr_c'] * np.power.outer(N, p['alpha']) * np.power.outer(D, p['beta'])

  def batch_size(self, D, samples: bool = False):
    """B*(D), in batch_unit."""
    p = self.values(samples)
    return p['B_c'] * np.power.outer(D, p['gamma'])


def step_law_keep(N, D, loss, tol: float = 0.0025) -> np.ndarray:
  """Mask of runs within relative `tol` of their (N, D) cell's best loss.

  Li et al. 2025 (arXiv 2503.04715), repo code/fit_tool.py: |loss / min - 1| < tol.
  """
  N, D, loss = (np.asarray(a, float) for a in (N, D, loss))
  keep = np.zeros(len(loss), bool)
  ok = np.isfinite(loss)
  for n, d in set(zip(N[ok].tolist(), D[ok].tolist())):
    in_cell = ok & (N == n) & (D == d)
    best = loss[in_cell].min()
    keep |= in_cell & (np.abs(loss / best - 1) < tol)
  return keep


def fit_step_law(N, D, B, lr, loss, *, tol: float = 0.0025, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95,
                 batch_unit: str = 'tokens') -> StepLawFit:
  """Step Law (Li et al. 2025, "Predictable Scale: Part I", arXiv 2503.04715).

    lr*(N, D) = lr_c · N^alpha · D^beta,      B*(D) = B_c · D^gamma

  by OLS in log space over the runs within `tol` of each (N, D) cell's best loss
  (`step_law_keep`), then `n_boot` bootstrap resamples of the kept rows; as in the paper's
  fit_tool.py the point estimate is the bootstrap mean of the log-space coefficients
  (prefactor exp(mean intercept)), the interval the percentile interval. The paper's B is
  in tokens; `batch_unit` records the unit of the B passed. Non-finite losses are ignored.
  """
  N, D, B, lr, loss = (np.asarray(a, float) for a in (N, D, B, lr, loss))
  ok = common.positive_finite(N, D, B, lr) & np.isfinite(loss)
  N, D, B, lr, loss = N[ok], D[ok], B[ok], lr[ok], loss[ok]
  keep = step_law_keep(N, D, loss, tol)
  n_cells = len(set(zip(N[keep].tolist(), D[keep].tolist())))
  lN, lD, lB, llr = np.log(N[keep]), np.log(D[keep]), np.log(B[keep]), np.log(lr[keep])
  one = np.ones_like(lN)
  (coef_lr, rss_lr, draws_lr), (coef_b, rss_b, draws_b) = common.ols_bootstrap(
      [(np.stack([one, lN, lD], 1), llr), (np.stack([one, lD], 1), lB)], n_boot, seed)
  names = StepLawFit.names

  def natural(c):  # [.., 5] log-space -> (lr_c, alpha, beta, B_c, gamma)
    c = np.array(c, float)
    c[..., 0], c[..., 3] = np.exp(c[..., 0]), np.exp(c[..., 3])
    return c

  log_draws = np.concatenate([draws_lr, draws_b], 1)
  point = log_draws.mean(0) if len(log_draws) else np.concatenate([coef_lr, coef_b])
  samples = natural(log_draws)
  return StepLawFit(params=dict(zip(names, map(float, natural(point)))),
                    intervals=common.intervals(names, samples, level),
                    objective=rss_lr + rss_b, n=int(keep.sum()),
                    samples=common.columns(names, samples),
                    tol=tol, n_cells=n_cells, batch_unit=batch_unit)
