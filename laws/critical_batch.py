"""Critical batch size: S = S_min (1 + B_crit/B) at a loss target, and B_crit(L) across targets.

The steps/examples trade-off of McCandlish et al. 2018 (arXiv 1812.06162) and the Kaplan et
al. 2020 form B_crit(L) = B_star / L^(1/alpha_B) as fitted by Su et al. 2024 (arXiv
2403.06563); docs/papers.md §7.
"""
import dataclasses
import math

import numpy as np
from scipy import optimize

from laws import common


@dataclasses.dataclass(frozen=True, eq=False)
class CriticalBatchFit(common.Fit):
  """S = S_min (1 + B_crit/B) at one loss target. params: S_min, E_min, B_crit = E_min/S_min."""
  names = ('S_min', 'E_min', 'B_crit')
  target: float = float('nan')
  batch_sizes: tuple = ()
  steps: tuple = ()


@dataclasses.dataclass(frozen=True, eq=False)
class CriticalBatchLaw(common.Fit):
  """B_crit(L) = B_star / L^(1/alpha_B) (Kaplan et al. 2020, Eq. 1.4; Su et al. 2024).

  params: B_star, alpha_B; per_target holds the fit at each loss target.
  """
  names = ('B_star', 'alpha_B')
  per_target: tuple = ()
  N: float = float('nan')

  def b_crit(self, L, samples: bool = False):
    """B_crit at loss L."""
    p = self.values(samples)
    return p['B_star'] / np.power.outer(L, 1.0 / np.asarray(p['alpha_B']))

  @classmethod
  def from_dict(cls, d):
    """As `Fit.from_dict`, with per_target's dicts back to `CriticalBatchFit`s."""
    fit = super().from_dict(d)
    per_target = tuple(CriticalBatchFit.from_dict(x) for x in d['per_target'])
    return dataclasses.replace(fit, per_target=per_target)


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
  ok = common.positive_finite(B, S)
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
                          intervals=common.intervals(names, samples, level), objective=rss,
                          n=len(B), samples=common.columns(names, samples),
                          target=float(target), batch_sizes=tuple(map(float, B)),
                          steps=tuple(map(float, S)))


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


def _per_target_fits(B, curves, targets, n_boot, seed, level) -> list[CriticalBatchFit]:
  """A determined `fit_critical_batch` at each loss target, highest first (ValueError if
  fewer than two targets have one)."""
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
  return per_target


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
  per_target = _per_target_fits(B, curves, targets, n_boot, seed, level)
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
  intervals = common.intervals(names, samples, level)
  if not all(math.isfinite(v) for iv in intervals.values() for v in iv):
    raise ValueError('not determined by this grid: the bootstrap interval of B_star or '
                     'alpha_B does not close; add batch sizes or loss targets')
  return CriticalBatchLaw(params=dict(zip(names, map(float, point))),
                          intervals=intervals, objective=rss,
                          n=len(per_target), samples=common.columns(names, samples),
                          per_target=tuple(per_target), N=float(N))
