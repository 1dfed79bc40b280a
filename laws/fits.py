"""Scaling-law fits: pure functions of NumPy arrays, no I/O.

Every fit returns a frozen `Fit` (params, intervals, objective, n, bootstrap samples) with
`to_dict()` for laws.json and `Fit.from_dict()` to read it back. Intervals are bootstrap
percentile intervals at `level` unless a fit says otherwise.

  optimal_lr             smooth optimum of loss against log(lr) in one cell
  fit_step_law           Step Law: lr*(N, D) = c N^alpha D^beta, B*(D) = c D^gamma
  fit_chinchilla         Chinchilla approach 3: L(N, D) = E + A/N^alpha + B/D^beta
  fit_critical_batch     McCandlish et al.: S = S_min (1 + B_crit/B)
  fit_critical_batch_law B_crit(L) = B_star / L^(1/alpha_B) across loss targets
  fit_power_scheduler    Power scheduler: lr_opt/beta = a T^b
  predict                lr*, B*, loss at (N, D) with intervals from the bootstrap samples

Units are the caller's: N parameters, D tokens, B whatever unit the rows use (the Step Law
paper uses tokens, the Power scheduler sequences); each fit's docstring says which it needs.
"""
import contextlib
import ctypes
import dataclasses
import itertools
import math
from typing import Any, ClassVar

import numpy as np
from scipy import optimize


# ----------------------------------------------------------------------------------------
# Result containers.


@dataclasses.dataclass(frozen=True, eq=False)
class Fit:
  """A fitted law: point estimates, intervals, objective at the optimum, points used.

  `samples` maps each parameter to its bootstrap draws (draw j of every parameter comes from
  the same resample); `predict` propagates them into intervals.
  """
  params: dict[str, float]
  intervals: dict[str, tuple[float, float]]
  objective: float
  n: int
  samples: dict[str, np.ndarray] | None = None
  names: ClassVar[tuple[str, ...]] = ()  # the order of params (JSON sorts keys)

  def sample(self, name: str) -> np.ndarray:
    """Bootstrap draws of one parameter (the point estimate alone when there are none)."""
    if not self.samples or len(self.samples[name]) == 0:
      return np.array([self.params[name]])
    return self.samples[name]

  def values(self, samples: bool = False) -> dict:
    """params, or with samples=True every parameter's bootstrap draws."""
    return {k: self.sample(k) for k in self.params} if samples else self.params

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
    d['type'] = type(self).__name__
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'Fit':
    kind = _FIT_TYPES[d.get('type', cls.__name__)]
    kw = {}
    for f in dataclasses.fields(kind):
      v = d.get(f.name)
      if f.name == 'samples':
        v = None if v is None else {k: np.array(x, dtype=float) for k, x in v.items()}
      elif f.name == 'intervals':
        v = {k: tuple(_num(x) for x in iv) for k, iv in v.items()}
      elif f.name == 'params':
        rank = {k: i for i, k in enumerate(kind.names)}
        v = {k: _num(v[k]) for k in sorted(v, key=lambda k: rank.get(k, len(rank)))}
      elif f.name == 'objective':
        v = _num(v)
      elif f.name == 'per_target':
        v = tuple(Fit.from_dict(x) for x in v)
      elif isinstance(v, list):
        v = tuple(v)
      kw[f.name] = v
    return kind(**kw)


@dataclasses.dataclass(frozen=True, eq=False)
class LrOptimum(Fit):
  """Optimum of one (N, D, B) cell. params: lr, loss; intervals: lr.

  edge is '' for an interior optimum, 'low' / 'high' when the best grid point is the
  smallest / largest learning rate tried (then lr is that grid point and the interval is
  open, NaN, on that side). method is 'poly3' / 'poly2' (local cubic / quadratic) or
  'argmin' (too few points, or no local minimum in the fit). The fitted curve is
  loss = sum_k poly[k] (log lr - center)^k.
  """
  names = ('lr', 'loss')
  cell: dict[str, float] = dataclasses.field(default_factory=dict)
  edge: str = ''
  method: str = 'argmin'
  grid_argmin: float = float('nan')
  center: float = float('nan')
  poly: tuple = ()

  def curve(self, lr):
    """The fitted loss at learning rates lr (NaN when method is 'argmin')."""
    if not self.poly:
      return np.full(np.shape(lr), np.nan)
    return np.polynomial.polynomial.polyval(np.log(lr) - self.center, self.poly)


@dataclasses.dataclass(frozen=True, eq=False)
class StepLawFit(Fit):
  """Step Law: lr* = lr_c N^alpha D^beta, B* = B_c D^gamma (B in batch_unit).

  Methods take samples=True to evaluate at every bootstrap draw (a trailing axis).
  """
  names = ('lr_c', 'alpha', 'beta', 'B_c', 'gamma')
  tol: float = 0.0025
  n_cells: int = 0
  batch_unit: str = 'tokens'

  def lr(self, N, D, samples: bool = False):
    p = self.values(samples)
    return p['lr_c'] * np.power.outer(N, p['alpha']) * np.power.outer(D, p['beta'])

  def batch_size(self, D, samples: bool = False):
    p = self.values(samples)
    return p['B_c'] * np.power.outer(D, p['gamma'])


@dataclasses.dataclass(frozen=True, eq=False)
class ChinchillaFit(Fit):
  """L(N, D) = E + A/N^alpha + B/D^beta; params also hold the compute-optimal exponents
  a = beta/(alpha+beta) (N_opt ∝ C^a) and b = alpha/(alpha+beta) (D_opt ∝ C^b)."""
  names = ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')
  delta: float = 1e-3
  n_starts: int = 0
  n_excluded: int = 0
  C_range: tuple = ()  # (min, max) of 6ND over the points used

  def loss(self, N, D, samples: bool = False):
    p = self.values(samples)
    return chinchilla_loss(N, D, p['E'], p['A'], p['B'], p['alpha'], p['beta'])

  def compute_optimal(self, C, samples: bool = False):
    """(N_opt, D_opt) at compute C ≈ 6ND (Hoffmann et al. 2022, Eq. 4; docs/papers.md §9.7)."""
    p = self.values(samples)
    return compute_optimal(C, p['A'], p['B'], p['alpha'], p['beta'])


@dataclasses.dataclass(frozen=True, eq=False)
class CriticalBatchFit(Fit):
  """S = S_min (1 + B_crit/B) at one loss target. params: S_min, E_min, B_crit = E_min/S_min."""
  names = ('S_min', 'E_min', 'B_crit')
  target: float = float('nan')
  batch_sizes: tuple = ()
  steps: tuple = ()


@dataclasses.dataclass(frozen=True, eq=False)
class CriticalBatchLaw(Fit):
  """B_crit(L) = B_star / L^(1/alpha_B) (Kaplan et al. 2020, Eq. 1.4; Su et al. 2024).

  params: B_star, alpha_B; per_target holds the fit at each loss target.
  """
  names = ('B_star', 'alpha_B')
  per_target: tuple = ()
  N: float = float('nan')

  def b_crit(self, L, samples: bool = False):
    p = self.values(samples)
    return p['B_star'] / np.power.outer(L, 1.0 / np.asarray(p['alpha_B']))


@dataclasses.dataclass(frozen=True, eq=False)
class PowerSchedulerFit(Fit):
  """lr_opt / beta = a T^b (Shen et al. 2024, Eq. 6), beta in sequences, T in tokens."""
  names = ('a', 'b')
  lr_max: float = float('nan')

  def schedule_config(self) -> dict[str, Any]:
    """The schedule config dict that optimizers/schedules.py reads."""
    return {'name': 'power', 'a': self.params['a'], 'b': self.params['b'],
            'lr_max': self.lr_max}


_FIT_TYPES = {c.__name__: c for c in (Fit, LrOptimum, StepLawFit, ChinchillaFit,
                                      CriticalBatchFit, CriticalBatchLaw,
                                      PowerSchedulerFit)}


def _num(x):
  return float('nan') if x is None else float(x)


def _jsonable(x):
  """JSON-ready copy: arrays to lists, NaN/inf to None, nested fits to dicts."""
  if isinstance(x, Fit):
    return x.to_dict()
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  return x


def _percentiles(samples: np.ndarray, level: float) -> np.ndarray:
  """[2, k] lower/upper percentile bounds of the columns of samples."""
  q = 100 * (1 - level) / 2
  return np.percentile(samples, [q, 100 - q], axis=0)


def _columns(names, samples):
  """{name: draws} from a [n_boot, len(names)] array."""
  samples = np.asarray(samples, float).reshape(-1, len(names))
  return {k: samples[:, i] for i, k in enumerate(names)}


def _intervals(names, samples, level):
  if samples is None or len(samples) < 2:
    return {k: (float('nan'), float('nan')) for k in names}
  lo, hi = _percentiles(samples, level)
  return {k: (float(l), float(h)) for k, l, h in zip(names, lo, hi)}


def _positive_finite(*arrays):
  ok = np.ones(np.shape(arrays[0]), bool)
  for a in arrays:
    ok &= np.isfinite(a) & (np.asarray(a) > 0)
  return ok


@contextlib.contextmanager
def one_blas_thread():
  """Limits OpenBLAS to one thread inside the block (what threadpoolctl does).

  L-BFGS-B calls BLAS on 20x20 matrices; OpenBLAS's threads then wait on each other, and on
  a busy 2-core machine the 243-start Chinchilla fit took 86 s instead of 6 s. No-op where
  the libraries cannot be found (non-Linux, other BLAS).
  """
  restore = []
  try:
    with open('/proc/self/maps') as f:
      paths = sorted({line.split()[-1] for line in f if 'openblas' in line.split()[-1]})
  except OSError:
    paths = []
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for suffix in ('', '64_', '_64'):
      for prefix in ('openblas', 'scipy_openblas'):
        get = getattr(lib, f'{prefix}_get_num_threads{suffix}', None)
        put = getattr(lib, f'{prefix}_set_num_threads{suffix}', None)
        if get is not None and put is not None:
          restore.append((put, get()))
          put(1)
  try:
    yield
  finally:
    for put, n in reversed(restore):
      put(n)


# ----------------------------------------------------------------------------------------
# 1. Optimal learning rate of one cell.


def _local_poly(x, y, x0, bandwidth, deg):
  """Weighted least-squares polynomial in (x - x0), Gaussian weights; (coef, weighted RSS)."""
  w = np.exp(-0.5 * ((x - x0) / bandwidth) ** 2)
  X = np.stack([(x - x0) ** k for k in range(deg + 1)], 1)
  c = np.linalg.lstsq(X * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
  return c, float(np.sum(w * (y - X @ c) ** 2))


def _poly_min(c):
  """Offset t of the local minimum of sum_k c_k t^k nearest 0 (NaN if none)."""
  d1 = np.polynomial.polynomial.polyder(c)
  roots = np.polynomial.polynomial.polyroots(d1) if np.any(d1[1:]) else np.array([])
  d2 = np.polynomial.polynomial.polyder(d1)
  t = [r.real for r in np.atleast_1d(roots) if abs(r.imag) < 1e-12
       and np.polynomial.polynomial.polyval(r.real, d2) > 0]
  return min(t, key=abs) if t else float('nan')


def optimal_lr(lr, loss, *, bandwidth: float | None = None, tol: float = 0.0025,
               n_iter: int = 3, cell: dict | None = None) -> LrOptimum:
  """Optimal learning rate of one cell from a local polynomial in x = log(lr).

  Fits loss ≈ sum_k c_k (x - x0)^k (a cubic given 5 distinct learning rates, else a
  quadratic) by least squares with Gaussian weights of width `bandwidth` (natural-log
  units; default 1.5 grid spacings) around x0, re-centred on the fitted minimum `n_iter`
  times. The cubic term absorbs the usual asymmetry of loss-vs-lr curves (steeper above
  the optimum), which biases a quadratic towards the flat side: on a factor-2 grid the
  cubic's error is ~4x smaller than the quadratic's and the grid argmin's. The minimum is kept between the grid neighbours of the
  argmin, where a convex curve's minimum must lie. Non-finite losses (diverged runs) are
  ignored. The interval is where the fit is within relative `tol` of its minimum (the
  plateau of Li et al. 2025, Sec. 4, whose tol is 0.25%).
  """
  lr, loss = np.asarray(lr, float), np.asarray(loss, float)
  ok = _positive_finite(lr) & np.isfinite(loss)
  if not ok.any():
    raise ValueError('optimal_lr: no finite (lr, loss) points')
  x, y = np.log(lr[ok]), loss[ok]
  grid = np.unique(lr[ok])  # repeated learning rates (seeds) count once for the grid
  cell = dict(cell or {})
  i0, n = int(np.argmin(y)), len(x)
  j0 = int(np.searchsorted(grid, lr[ok][i0]))  # the argmin's place in the grid
  edge = '' if len(grid) == 1 else 'low' if j0 == 0 else 'high' if j0 == len(grid) - 1 else ''
  nan = float('nan')
  base = dict(cell=cell, edge=edge, n=n, grid_argmin=float(grid[j0]))
  lo_x = np.log(grid[j0 - 1]) if j0 > 0 else nan
  hi_x = np.log(grid[j0 + 1]) if j0 < len(grid) - 1 else nan

  def argmin(method):
    return LrOptimum(params={'lr': float(grid[j0]), 'loss': float(y[i0])},
                     intervals={'lr': (float(np.exp(lo_x)), float(np.exp(hi_x)))},
                     objective=0.0, method=method, **base)

  if len(grid) < 3 or edge:
    return argmin('argmin')
  deg = 3 if len(grid) >= 5 else 2
  bandwidth = bandwidth or 1.5 * float(np.median(np.diff(np.log(grid))))
  x0 = x[i0]
  for _ in range(n_iter + 1):
    c, rss = _local_poly(x, y, x0, bandwidth, deg)
    t = _poly_min(c)
    if not np.isfinite(t):
      return argmin('argmin')
    # Re-centre; the last pass re-fits at the final centre so the curve is centred there.
    x0 = float(np.clip(x0 + t, lo_x, hi_x))
  c, rss = _local_poly(x, y, x0, bandwidth, deg)
  t = float(np.clip(_poly_min(c), lo_x - x0, hi_x - x0))
  if not np.isfinite(t):
    return argmin('argmin')
  pv = np.polynomial.polynomial.polyval
  lmin = float(pv(t, c))
  # Interval: nearest crossings of lmin (1 + tol) on either side of the minimum.
  shifted = np.array(c, float)
  shifted[0] -= lmin * (1 + tol)
  roots = np.polynomial.polynomial.polyroots(shifted)
  real = np.array([r.real for r in roots if abs(r.imag) < 1e-9])
  below, above = real[real < t], real[real > t]
  lo = float(np.exp(x0 + below.max())) if len(below) else nan
  hi = float(np.exp(x0 + above.min())) if len(above) else nan
  return LrOptimum(params={'lr': float(np.exp(x0 + t)), 'loss': lmin},
                   intervals={'lr': (lo, hi)}, objective=rss, method=f'poly{deg}',
                   center=x0, poly=tuple(map(float, c)), **base)


# ----------------------------------------------------------------------------------------
# Log-space OLS with a row bootstrap (Step Law, Power scheduler, B_crit(L)).


def _ols_bootstrap(designs, n_boot, seed):
  """OLS of y on X for each (X, y) in designs (the same rows), with a joint row bootstrap.

  Returns [(coef, rss, draws [n_boot, k])] per design. Each draw resamples rows with
  replacement once for all designs; a draw that leaves some design rank-deficient is redrawn.
  """
  n_rows = len(designs[0][1])
  out = []
  for X, y in designs:
    k = X.shape[1]
    rank = np.linalg.matrix_rank(X) if n_rows else 0
    if n_rows <= k or rank < k:
      raise ValueError(f'{n_rows} rows of rank {rank}, need more than {k} rows of rank '
                       f'{k}: each variable needs two or more distinct values')
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    out.append((coef, float(np.sum((y - X @ coef) ** 2)), []))
  rng = np.random.default_rng(seed)
  for _ in range(10 * n_boot):
    if len(out[0][2]) == n_boot:
      break
    idx = rng.integers(0, n_rows, n_rows)
    if any(np.linalg.matrix_rank(X[idx]) < X.shape[1] for X, _ in designs):
      continue
    for (X, y), (_, _, draws) in zip(designs, out):
      draws.append(np.linalg.lstsq(X[idx], y[idx], rcond=None)[0])
  return [(c, rss, np.array(d).reshape(-1, X.shape[1]))
          for (c, rss, d), (X, _) in zip(out, designs)]


# ----------------------------------------------------------------------------------------
# 2. Step Law.


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
  ok = _positive_finite(N, D, B, lr) & np.isfinite(loss)
  N, D, B, lr, loss = N[ok], D[ok], B[ok], lr[ok], loss[ok]
  keep = step_law_keep(N, D, loss, tol)
  n_cells = len(set(zip(N[keep].tolist(), D[keep].tolist())))
  lN, lD, lB, llr = np.log(N[keep]), np.log(D[keep]), np.log(B[keep]), np.log(lr[keep])
  one = np.ones_like(lN)
  (coef_lr, rss_lr, draws_lr), (coef_b, rss_b, draws_b) = _ols_bootstrap(
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
                    intervals=_intervals(names, samples, level),
                    objective=rss_lr + rss_b, n=int(keep.sum()),
                    samples=_columns(names, samples),
                    tol=tol, n_cells=n_cells, batch_unit=batch_unit)


# ----------------------------------------------------------------------------------------
# 3. Chinchilla approach 3.

SMALL_GRID = dict(a=(0, 10, 20), b=(0, 10, 20), e=(-1, 0, 1), alpha=(0, .5, 1),
                  beta=(0, .5, 1))
FULL_GRID = dict(a=tuple(range(0, 30, 5)), b=tuple(range(0, 30, 5)),
                 e=(-1, -.5, 0, .5, 1), alpha=(0, .5, 1, 1.5, 2), beta=(0, .5, 1, 1.5, 2))


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
  a, b, e, alpha, beta = (np.asarray(v, float) for v in np.moveaxis(np.asarray(theta), -1, 0))
  s = alpha + beta
  return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta, beta / s, alpha / s], -1)


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
  use = _positive_finite(N, D, loss)
  if mask is not None:
    use &= np.asarray(mask, bool)
  if use.sum() < 6:
    raise ValueError(f'fit_chinchilla: {int(use.sum())} usable points, need at least 6')
  logN, logD, logL = np.log(N[use]), np.log(D[use]), np.log(loss[use])
  if isinstance(grid, str):
    grid = {'small': SMALL_GRID, 'full': FULL_GRID}[grid]
  if isinstance(grid, dict):
    starts = np.array(list(itertools.product(*(grid[k] for k in ('a', 'b', 'e', 'alpha',
                                                                  'beta')))), float)
  else:
    starts = np.asarray(grid, float).reshape(-1, 5)
  opts = dict(ftol=ftol, gtol=gtol, maxiter=2000)

  def solve(x0, weights=None):
    return optimize.minimize(chinchilla_objective, x0, args=(logN, logD, logL, delta, weights),
                             jac=True, method='L-BFGS-B', options=opts)

  rng = np.random.default_rng(seed)
  draws = []
  with one_blas_thread():
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
                       intervals=_intervals(names, samples, level), objective=float(best.fun),
                       n=int(use.sum()), samples=_columns(names, samples), delta=delta,
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


# ----------------------------------------------------------------------------------------
# 4. Critical batch size.


def steps_to_target(curve_steps, curve_losses, target: float) -> float:
  """First step at which a loss curve reaches `target`, interpolated in log(step).

  The curve is first made monotone by its running minimum (best loss so far), so a later
  eval that is worse does not undo reaching a loss. Returns inf if never reached, and the
  first step if the first eval is already at or below the target.
  """
  s, l = np.asarray(curve_steps, float), np.asarray(curve_losses, float)
  ok = np.isfinite(l) & (s > 0)
  s, l = s[ok], l[ok]
  if len(s) == 0:
    return float('inf')
  order = np.argsort(s)
  s, l = s[order], np.minimum.accumulate(l[order])
  hit = np.nonzero(l <= target)[0]
  if len(hit) == 0:
    return float('inf')
  j = hit[0]
  if j == 0:
    return float(s[0])
  frac = (l[j - 1] - target) / (l[j - 1] - l[j])
  return float(np.exp(np.log(s[j - 1]) + frac * (np.log(s[j]) - np.log(s[j - 1]))))


def critical_batch_steps(B, S_min, B_crit):
  """S = S_min (1 + B_crit/B) (McCandlish et al. 2018, steps/examples trade-off); E = B S."""
  return S_min * (1 + B_crit / np.asarray(B, float))


def _fit_s_e(B, S, weights=None):
  """(log S_min, log E_min) minimising sum w (log S - log(S_min + E_min/B))^2."""
  X = np.stack([np.ones_like(B), 1 / B], 1)
  c = np.linalg.lstsq(X, S, rcond=None)[0]
  x0 = np.log(np.maximum(c, [S.min() * 1e-3, (S * B).min() * 1e-3]))
  w = np.ones_like(B) if weights is None else weights
  sw = np.sqrt(w)

  def resid(p):
    return sw * (np.log(S) - np.log(np.exp(p[0]) + np.exp(p[1]) / B))

  res = optimize.least_squares(resid, x0, method='lm' if len(B) > 2 else 'trf')
  return res.x, float(np.sum(res.fun ** 2))


def fit_critical_batch(B, S, *, target: float = float('nan'), n_boot: int = 200,
                       seed: int = 0, level: float = 0.95) -> CriticalBatchFit:
  """Fit S = S_min (1 + B_crit/B), i.e. (S/S_min - 1)(E/E_min - 1) = 1 with E = B S.

  McCandlish et al. 2018 (arXiv 1812.06162, Sec. 2): B_crit = E_min / S_min.
  S are steps to reach the loss `target` at batch sizes B (any unit; E, B_crit share it).
  Least squares on log S (steps are noisy in ratio); points with infinite S (target never
  reached) are dropped. Intervals: bootstrap over the batch sizes.
  """
  B, S = np.asarray(B, float), np.asarray(S, float)
  ok = _positive_finite(B, S)
  B, S = B[ok], S[ok]
  if len(np.unique(B)) < 2:
    raise ValueError('fit_critical_batch: need steps at two or more batch sizes')
  p, rss = _fit_s_e(B, S)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(n_boot):
    counts = np.bincount(rng.integers(0, len(B), len(B)), minlength=len(B))
    if np.count_nonzero(counts) < 2 or len(np.unique(B[counts > 0])) < 2:
      continue
    draws.append(_fit_s_e(B, S, counts.astype(float))[0])

  def natural(p):
    p = np.exp(np.asarray(p).reshape(-1, 2))
    return np.stack([p[:, 0], p[:, 1], p[:, 1] / p[:, 0]], 1)

  names = CriticalBatchFit.names
  samples = natural(np.array(draws))
  return CriticalBatchFit(params=dict(zip(names, map(float, natural(p)[0]))),
                          intervals=_intervals(names, samples, level), objective=rss,
                          n=len(B), samples=_columns(names, samples), target=float(target),
                          batch_sizes=tuple(map(float, B)), steps=tuple(map(float, S)))


def critical_batch_undetermined(fit: CriticalBatchFit) -> str:
  """Why the batch sizes measured do not determine this B_crit ('' when they do).

  S = S_min (1 + B_crit/B) pins B_crit only where S bends: a B_crit far below the smallest
  batch (S flat in B) or far above the largest (E flat in B) drives the least-squares fit to
  E_min -> 0 or S_min -> 0 (values like 1e-308), which are not results.
  """
  lo_b, hi_b = min(fit.batch_sizes), max(fit.batch_sizes)
  values = [fit.params['S_min'], fit.params['E_min'], fit.params['B_crit'],
            *fit.intervals['B_crit']]
  if not all(math.isfinite(v) and v > 0 for v in values):
    return (f'B_crit {fit.params["B_crit"]:.3g} or its interval is not a finite positive '
            'number')
  b, (i_lo, i_hi) = fit.params['B_crit'], fit.intervals['B_crit']
  if b < lo_b / 10 or i_lo < lo_b / 100:
    return (f'B_crit {b:.3g} (interval from {i_lo:.3g}) is far below the smallest batch '
            f'{lo_b:g}: steps do not fall with B here; add smaller batch sizes')
  if b > 10 * hi_b or i_hi > 100 * hi_b:
    return (f'B_crit {b:.3g} (interval to {i_hi:.3g}) is far above the largest batch '
            f'{hi_b:g}: add larger batch sizes')
  return ''


def fit_critical_batch_law(batch_sizes, curves, targets, *, n_boot: int = 200,
                           seed: int = 0, level: float = 0.95,
                           N: float = float('nan')) -> CriticalBatchLaw:
  """B_crit at each loss target, then B_crit(L) = B_star / L^(1/alpha_B) across targets.

  Kaplan et al. 2020 (Eq. 1.4) form, fitted per setup by Su et al. 2024 (arXiv 2403.06563).
  curves[i] = (steps, losses) of the run at batch_sizes[i] (its best learning rate). Each
  target is fitted with `fit_critical_batch` on `steps_to_target`; the power law by OLS of
  log B_crit on log L, refitted on draw j of every target's bootstrap (one seed, so the same
  resample of runs) for intervals that carry the per-target uncertainty.
  """
  B = np.asarray(batch_sizes, float)
  per_target, reasons = [], []
  for t in sorted(map(float, targets), reverse=True):
    S = np.array([steps_to_target(s, l, t) for s, l in curves])
    try:
      fit = fit_critical_batch(B, S, target=t, n_boot=n_boot, seed=seed, level=level)
    except ValueError:
      continue
    reason = critical_batch_undetermined(fit)
    if reason:
      reasons.append(f'target {t:.4g}: {reason}')
    else:
      per_target.append(fit)
  if len(per_target) < 2:
    raise ValueError('not determined by this grid: fewer than two loss targets have a '
                     'determined B_crit' + (f' ({reasons[0]})' if reasons else ''))
  logL = np.log([f.target for f in per_target])
  X = np.stack([np.ones_like(logL), logL], 1)

  def law(log_bcrit):  # -> (B_star, alpha_B), rss
    c, *_ = np.linalg.lstsq(X, log_bcrit, rcond=None)
    return np.array([np.exp(c[0]), -1 / c[1]]), float(np.sum((log_bcrit - X @ c) ** 2))

  point, rss = law(np.log([f.params['B_crit'] for f in per_target]))
  if not (np.all(np.isfinite(point)) and point[1] > 0):
    raise ValueError(f'not determined by this grid: alpha_B = {point[1]:.3g} (B_crit does not '
                     'fall as the loss target rises); add batch sizes or longer runs')
  k = min(len(f.samples['B_crit']) for f in per_target)
  samples = np.array([law(np.log([f.samples['B_crit'][j] for f in per_target]))[0]
                      for j in range(k)]).reshape(-1, 2)
  names = CriticalBatchLaw.names
  intervals = _intervals(names, samples, level)
  if not all(math.isfinite(v) for iv in intervals.values() for v in iv):
    raise ValueError('not determined by this grid: the bootstrap interval of B_star or '
                     'alpha_B does not close; add batch sizes or loss targets')
  return CriticalBatchLaw(params=dict(zip(names, map(float, point))),
                          intervals=intervals, objective=rss,
                          n=len(per_target), samples=_columns(names, samples),
                          per_target=tuple(per_target),
                          N=float(N))


# ----------------------------------------------------------------------------------------
# 5. Power scheduler calibration.


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
  ok = _positive_finite(beta, T, lr)
  beta, T, lr = beta[ok], T[ok], lr[ok]
  X = np.stack([np.ones_like(T), np.log(T)], 1)
  [(coef, rss, draws)] = _ols_bootstrap([(X, np.log(lr / beta))], n_boot, seed)

  def natural(c):
    c = np.array(c, float).reshape(-1, 2)
    return np.stack([np.exp(c[:, 0]), c[:, 1]], 1)

  names = PowerSchedulerFit.names
  samples = natural(draws)
  return PowerSchedulerFit(params=dict(zip(names, map(float, natural(coef)[0]))),
                           intervals=_intervals(names, samples, level), objective=rss,
                           n=len(T), samples=_columns(names, samples),
                           lr_max=float(lr.max() if lr_max is None else lr_max))


# ----------------------------------------------------------------------------------------
# 6. Prediction.


@dataclasses.dataclass(frozen=True)
class Estimate:
  value: float
  lo: float
  hi: float


def _estimate(point, draws, level):
  draws = np.asarray(draws, float).ravel()
  draws = draws[np.isfinite(draws)]
  if len(draws) < 2:
    return Estimate(float(point), float('nan'), float('nan'))
  lo, hi = _percentiles(draws, level)
  return Estimate(float(point), float(lo), float(hi))


def predict(laws: dict, N: float, D: float, *, level: float = 0.95) -> dict[str, Estimate]:
  """lr*, B* and loss at N parameters and D tokens, from whichever laws are present.

  laws: the dict of `fit_all` (keys 'step_law', 'chinchilla'). Intervals are percentiles of
  the law evaluated at every bootstrap draw. Keys: 'lr', 'batch_size' (in
  laws['step_law'].batch_unit) and 'loss'; also 'N_opt', 'D_opt' for the compute C = 6ND
  when L(N, D) is known.
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


# ----------------------------------------------------------------------------------------
# laws.json.

LAW_KEYS = ('lr_optima', 'step_law', 'chinchilla', 'critical_batch', 'power_scheduler')


def laws_to_dict(laws: dict) -> dict[str, Any]:
  """JSON-ready form of a laws dict (fits to dicts, lists of fits to lists)."""
  return {k: _jsonable(v) for k, v in laws.items()}


def laws_from_dict(d: dict[str, Any]) -> dict:
  """Inverse of `laws_to_dict`: dicts with a 'type' back to fits."""
  def decode(v):
    if isinstance(v, dict) and v.get('type') in _FIT_TYPES:
      return Fit.from_dict(v)
    if isinstance(v, list) and v and all(isinstance(x, dict) and 'type' in x for x in v):
      return [decode(x) for x in v]
    return v
  return {k: decode(v) for k, v in d.items()}
