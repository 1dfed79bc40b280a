"""Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta and the compute-optimal split.

Hoffmann et al. 2022 (arXiv 2203.15556) and the Epoch AI replication, Besiroglu et al. 2024
(arXiv 2404.10102); docs/papers.md §9.7.
"""
import dataclasses
import itertools
import math

import numpy as np
from scipy import optimize

from laws import common

SMALL_GRID = dict(a=(0, 10, 20), b=(0, 10, 20), e=(-1, 0, 1), alpha=(0, .5, 1),
                  beta=(0, .5, 1))
FULL_GRID = dict(a=tuple(range(0, 30, 5)), b=tuple(range(0, 30, 5)),
                 e=(-1, -.5, 0, .5, 1), alpha=(0, .5, 1, 1.5, 2), beta=(0, .5, 1, 1.5, 2))


@dataclasses.dataclass(frozen=True, eq=False)
class ChinchillaFit(common.Fit):
  """L(N, D) = E + A/N^alpha + B/D^beta; params also hold the compute-optimal exponents
  a = beta/(alpha+beta) (N_opt ∝ C^a) and b = alpha/(alpha+beta) (D_opt ∝ C^b)."""
  names = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')
  delta: float = 1e-3
  n_starts: int = 0
  n_excluded: int = 0
  C_range: tuple = ()  # (min, max) of 6ND over the points used

  def loss(self, N, D, samples: bool = False):
    """L(N, D) (Hoffmann et al. 2022, Eq. 2)."""
    p = self.values(samples)
    return chinchilla_loss(N, D, p['E'], p['A'], p['B'], p['alpha'], p['beta'])

  def compute_optimal(self, C, samples: bool = False):
    """(N_opt, D_opt) at compute C ≈ 6ND (Hoffmann et al. 2022, Eq. 4; docs/papers.md §9.7)."""
    p = self.values(samples)
    return compute_optimal(C, p['A'], p['B'], p['alpha'], p['beta'])


def chinchilla_loss(N, D, E, A, B, alpha, beta):
  """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, Eq. 2)."""
  return E + A / np.power.outer(N, alpha) + B / np.power.outer(D, beta)


def compute_optimal(C, A, B, alpha, beta):
  """Compute-optimal (N, D) at C ≈ 6ND (Hoffmann et al. 2022, Eq. 4).

  N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
  G = (alpha A / (beta B))^(1/(alpha+beta)).
  """
  s = np.asarray(alpha) + np.asarray(beta)
  G = (np.asarray(alpha) * A / (np.asarray(beta) * B)) ** (1 / s)
  c6 = np.asarray(C, float) / 6
  return G * np.power.outer(c6, beta / s), np.power.outer(c6, alpha / s) / G


def chinchilla_objective(theta, logN, logD, logL, delta=1e-3, weights=None):
  """Huber objective of Hoffmann et al. 2022 (App. D.2) and its gradient.

    sum_i w_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

  theta = (a, b, e, alpha, beta) with A = e^a, B = e^b, E = e^e. Returns (value, grad).
  """
  a, b, e, alpha, beta = theta
  t_3xn = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
  m = t_3xn.max(0)
  ex_3xn = np.exp(t_3xn - m)
  s = ex_3xn.sum(0)
  r = m + np.log(s) - logL
  ar = np.abs(r)
  huber = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
  psi = np.clip(r, -delta, delta)  # Huber'(r)
  if weights is not None:
    huber, psi = huber * weights, psi * weights
  p_3xn = ex_3xn / s  # d LSE / d t
  grad = np.array([psi @ p_3xn[0], psi @ p_3xn[1], psi @ p_3xn[2],
                   -(psi * p_3xn[0]) @ logN, -(psi * p_3xn[1]) @ logD])
  return float(huber.sum()), grad


def _chinchilla_params(theta):
  """(E, A, B, alpha, beta, a, b) from theta = (a, b, e, alpha, beta) on the last axis."""
  a, b, e, alpha, beta = (np.asarray(v, float) for v in np.moveaxis(np.asarray(theta), -1, 0))
  s = alpha + beta
  return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta, beta / s, alpha / s], -1)


def _starts(grid) -> np.ndarray:
  """[k, 5] (a, b, e, alpha, beta) starts from 'small', 'full', a dict of axes or an array."""
  if isinstance(grid, str):
    grid = {'small': SMALL_GRID, 'full': FULL_GRID}[grid]
  if isinstance(grid, dict):
    return np.array(list(itertools.product(*(grid[k] for k in ('a', 'b', 'e', 'alpha',
                                                                'beta')))), float)
  return np.asarray(grid, float).reshape(-1, 5)


def fit_chinchilla(N, D, loss, *, mask=None, delta: float = 1e-3, grid='small',
                   n_boot: int = 100, seed: int = 0, level: float = 0.95,
                   ftol: float = 1e-12, gtol: float = 1e-9,
                   n_restarts: int = 4) -> ChinchillaFit:
  """Chinchilla approach 3 (Hoffmann et al. 2022 App. D.2; Besiroglu et al. 2024).

  Minimises `chinchilla_objective` (Huber, delta 1e-3, on log L via log-sum-exp) with
  scipy L-BFGS-B and analytic gradients from every start of `grid` and keeps the lowest
  objective. grid: 'small' (243 starts: a, b in {0,10,20}, e in {-1,0,1}, alpha, beta in
  {0,.5,1}), 'full' (Hoffmann's 4,500), a dict of axis values, or a [k, 5] array of
  (a, b, e, alpha, beta) starts. A single start stops early on this flat objective
  (Besiroglu et al. 2024), hence the grid.

  mask: True for points to use; censored points (diverged trials) are passed as False and
  excluded, as are non-finite losses. Intervals: `n_boot` bootstrap resamples of the points,
  each refitted from the best fit and `n_restarts` - 1 other local optima of the grid.
  """
  N, D, loss = (np.asarray(a, float) for a in (N, D, loss))
  use = common.positive_finite(N, D, loss)
  if mask is not None:
    use &= np.asarray(mask, bool)
  if use.sum() < 6:
    raise ValueError(f'fit_chinchilla: {int(use.sum())} usable points, need at least 6')
  logN, logD, logL = np.log(N[use]), np.log(D[use]), np.log(loss[use])
  starts = _starts(grid)
  opts = dict(ftol=ftol, gtol=gtol, maxiter=2000)

  def solve(x0, weights=None):
    return optimize.minimize(chinchilla_objective, x0, args=(logN, logD, logL, delta, weights),
                             jac=True, method='L-BFGS-B', options=opts)

  rng = np.random.default_rng(seed)
  draws = []
  with common.one_blas_thread():
    fits = [res for res in map(solve, starts) if np.isfinite(res.fun)]
    fits.sort(key=lambda r: r.fun)
    best = fits[0]
    # Each resample restarts from the best fit and from the best few other basins: refits
    # from the best fit alone stay in its basin and give confident, wrong intervals when the
    # grid admits several (2 N x 3 D: coverage of alpha 1 in 20 draws).
    restarts = [best.x] + [r.x for r in fits[1:]
                           if np.max(np.abs(r.x - best.x)) > 1e-3][:n_restarts - 1]
    for _ in range(n_boot):
      counts = np.bincount(rng.integers(0, len(logL), len(logL)), minlength=len(logL))
      refits = [solve(x0, counts.astype(float)) for x0 in restarts]
      draws.append(min(refits, key=lambda r: r.fun if np.isfinite(r.fun) else np.inf).x)
  names = ChinchillaFit.names
  samples = _chinchilla_params(np.array(draws).reshape(-1, 5))
  return ChinchillaFit(params=dict(zip(names, map(float, _chinchilla_params(best.x)))),
                       intervals=common.intervals(names, samples, level),
                       objective=float(best.fun), n=int(use.sum()),
                       samples=common.columns(names, samples), delta=delta,
                       n_starts=len(starts),
                       n_excluded=int(len(loss) - use.sum()),
                       C_range=(float(6 * np.exp(logN + logD).min()),
                                float(6 * np.exp(logN + logD).max())))


def chinchilla_undetermined(fit: ChinchillaFit | None, n_N: int, n_D: int) -> str:
  """Why a grid with n_N model sizes and n_D token budgets does not determine L(N, D)
  ('' when it does): E, A/N^alpha and B/D^beta trade off along a valley unless each of N
  and D takes at least 3 values; a fit in that valley reaches objective ~0 at any alpha."""
  if n_N < 3 or n_D < 3:
    return (f'L(N, D) needs at least 3 distinct N and 3 distinct D, the grid has {n_N} N and '
            f'{n_D} D; add ' + ' and '.join(x for x, n in (('model sizes', n_N),
                                                           ('token budgets', n_D)) if n < 3))
  if fit is None:
    return ''
  for name in ChinchillaFit.names:
    lo, hi = fit.intervals[name]
    value = fit.params[name]
    if not all(math.isfinite(v) for v in (value, lo, hi)):
      return f'{name} = {value:.3g} or its interval is not finite'
    if name in ('E', 'A', 'B') and not lo > 1e-6 * max(value, 1e-300):
      return (f'{name} = {value:.3g} with interval from {lo:.3g}: driven to 0, the grid does '
              'not pin it; add model sizes or token budgets')
    if name in ('alpha', 'beta') and not (1e-3 < lo and hi < 5):
      return (f'{name} interval [{lo:.3g}, {hi:.3g}] does not close on an exponent in '
              '(0.001, 5); add model sizes or token budgets')
  return ''
