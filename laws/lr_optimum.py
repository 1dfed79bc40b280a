"""Optimal learning rate of one (N, D, B) cell: the smooth minimum of loss against log(lr).

The interval is the plateau of Li et al. 2025 (Step Law, Sec. 4; docs/papers.md §4.1): the
learning rates whose fitted loss is within a relative tol of the minimum.
"""
import dataclasses

import numpy as np

from laws import common


@dataclasses.dataclass(frozen=True, eq=False)
class LrOptimum(common.Fit):
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


def _plateau(c, x0, t, lmin, tol):
  """(lo, hi) learning rates of the nearest crossings of lmin (1 + tol) either side of the
  minimum at offset t of the curve sum_k c_k (x - x0)^k (NaN where there is none)."""
  shifted = np.array(c, float)
  shifted[0] -= lmin * (1 + tol)
  roots = np.polynomial.polynomial.polyroots(shifted)
  real = np.array([r.real for r in roots if abs(r.imag) < 1e-9])
  below, above = real[real < t], real[real > t]
  lo = float(np.exp(x0 + below.max())) if len(below) else float('nan')
  hi = float(np.exp(x0 + above.min())) if len(above) else float('nan')
  return lo, hi


def optimal_lr(lr, loss, *, bandwidth: float | None = None, tol: float = 0.0025,
               n_iter: int = 3, cell: dict | None = None) -> LrOptimum:
  """Optimal learning rate of one cell from a local polynomial in x = log(lr).

  Fits loss ≈ sum_k c_k (x - x0)^k (a cubic given 5 distinct learning rates, else a
  quadratic) by least squares with Gaussian weights of width `bandwidth` (natural-log
  units; default 1.5 grid spacings) around x0, re-centred on the fitted minimum `n_iter`
  times. The cubic term absorbs the usual asymmetry of loss-vs-lr curves (steeper above
  the optimum), which biases a quadratic towards the flat side: on a factor-2 grid the
  cubic's error is ~4x smaller than the quadratic's and the grid argmin's. The minimum is
  kept between the grid neighbours of the argmin, where a convex curve's minimum must lie.
  Non-finite losses (diverged runs) are ignored. The interval is where the fit is within
  relative `tol` of its minimum (the plateau of Li et al. 2025, Sec. 4, whose tol is 0.25%;
  docs/papers.md §4.1).
  """
  lr, loss = np.asarray(lr, float), np.asarray(loss, float)
  ok = common.positive_finite(lr) & np.isfinite(loss)
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
  lmin = float(np.polynomial.polynomial.polyval(t, c))
  return LrOptimum(params={'lr': float(np.exp(x0 + t)), 'loss': lmin},
                   intervals={'lr': _plateau(c, x0, t, lmin, tol)}, objective=rss,
                   method=f'poly{deg}', center=x0, poly=tuple(map(float, c)), **base)
