"""laws/lr_optimum.py, step_law.py, chinchilla.py, critical_batch.py, power_scheduler.py,
estimate.py, serialize.py: every fit recovers the law that generated a synthetic sweep, and the
Chinchilla fit reproduces Epoch AI's replication on the points of Hoffmann et al. Fig. 4."""
import csv
import json
import os
import time

import numpy as np
import pytest

from laws import chinchilla
from laws import critical_batch
from laws import estimate
from laws import lr_optimum
from laws import power_scheduler
from laws import serialize
from laws import step_law

TESTDATA = os.path.join(os.path.dirname(__file__), '..', 'testdata')

# Step Law constants (Li et al. 2025, docs/papers.md §4.1) and a Chinchilla-like L(N, D).
LR_C, ALPHA, BETA = 1.79, -0.713, 0.307
B_C, GAMMA = 0.58, 0.571
CHIN = dict(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)


def rel(x, y):
  return abs(x / y - 1)


def asymmetric_bowl(u, a=0.6):
  """Convex in u = log(lr / lr*), minimum 0 at u = 0, u^2 near it, steeper for u > 0."""
  return (np.exp(a * u) - a * u - 1) / (a * a / 2)


def step_law_sweep(seed=0, noise=1e-4):
  """(N, D, B, lr, loss) of a 4x4 (N, D) grid; at each cell a lr x B grid around the
  Step Law optimum (grid points on fixed powers of 2, so each cell has its own offset)."""
  rng = np.random.default_rng(seed)
  rows = []
  for N in np.geomspace(1e8, 1e9, 4):
    for D in np.geomspace(2e9, 1e11, 4):
      lr_opt, b_opt = LR_C * N**ALPHA * D**BETA, B_C * D**GAMMA
      loss_opt = chinchilla.chinchilla_loss(N, D, *CHIN.values())
      k0, j0 = round(4 * np.log2(lr_opt)), round(3 * np.log2(b_opt))
      for k in range(k0 - 8, k0 + 9):
        for j in range(j0 - 6, j0 + 7):
          lr, B = 2.0**(k / 4), 2.0**(j / 3)
          bowl = 0.02 * asymmetric_bowl(np.log(lr / lr_opt)) + 0.01 * np.log(B / b_opt)**2
          rows.append((N, D, B, lr, loss_opt * (1 + bowl) * (1 + noise * rng.normal())))
  return np.array(rows).T


# ----------------------------------------------------------------------------------------
# 1. Optimal learning rate of a cell.


def test_optimal_lr_beats_grid_argmin():
  rng = np.random.default_rng(0)
  grid = np.log(2.0) * np.arange(-4, 5) + np.log(1e-3)  # factor-2 grid
  err_fit, err_grid, covered = [], [], 0
  for _ in range(100):
    x_opt = np.log(1e-3) + rng.uniform(-0.5, 0.5) * np.log(2.0)
    loss = 3.0 * (1 + 0.02 * asymmetric_bowl(grid - x_opt)) + 1e-3 * rng.normal(size=9)
    o = lr_optimum.optimal_lr(np.exp(grid), loss)
    assert o.method == 'poly3' and o.edge == ''
    err_fit.append(abs(np.log(o.params['lr']) - x_opt))
    err_grid.append(abs(np.log(o.grid_argmin) - x_opt))
    lo, hi = o.intervals['lr']
    covered += lo < np.exp(x_opt) < hi
    assert o.params['loss'] == pytest.approx(3.0, abs=0.01)
  assert np.mean(err_fit) < 0.4 * np.mean(err_grid), (np.mean(err_fit), np.mean(err_grid))
  assert np.mean(err_fit) < 0.05
  assert covered >= 95


def test_optimal_lr_flags_edge_and_ignores_diverged():
  lr = 1e-3 * 2.0 ** np.arange(6)
  loss = 3.0 + 0.05 * np.log(lr / 2e-4) ** 2  # optimum below the grid
  o = lr_optimum.optimal_lr(lr, loss)
  assert o.edge == 'low' and o.params['lr'] == lr[0] and np.isnan(o.intervals['lr'][0])
  loss = 3.0 + 0.05 * np.log(lr / 5e-3) ** 2
  loss[-2:] = np.nan  # diverged at the two largest learning rates
  o = lr_optimum.optimal_lr(lr, loss)
  assert o.n == 4 and o.edge == '' and o.method == 'poly2'
  assert o.params['lr'] == pytest.approx(5e-3, rel=1e-6)
  # Repeated learning rates (several seeds) are one grid point each.
  o2 = lr_optimum.optimal_lr(np.repeat(lr, 2), np.repeat(loss, 2))
  assert o2.params['lr'] == pytest.approx(o.params['lr']) and o2.n == 8
  with pytest.raises(ValueError):
    lr_optimum.optimal_lr(lr, np.full(6, np.nan))


# ----------------------------------------------------------------------------------------
# 2. Step Law.


def test_step_law_recovers_exponents():
  N, D, B, lr, loss = step_law_sweep()
  fit = step_law.fit_step_law(N, D, B, lr, loss, n_boot=300)
  p = fit.params
  assert rel(p['alpha'], ALPHA) < 0.05 and rel(p['beta'], BETA) < 0.05
  assert rel(p['gamma'], GAMMA) < 0.05
  assert rel(p['lr_c'], LR_C) < 0.5 and rel(p['B_c'], B_C) < 0.5
  assert fit.n_cells == 16 and 16 <= fit.n < len(loss) / 10
  assert set(fit.samples) == set(p) and all(len(v) == 300 for v in fit.samples.values())
  for k, (lo, hi) in fit.intervals.items():
    assert lo < p[k] < hi, k
  # The tolerance is a parameter: a wider plateau keeps more runs.
  assert step_law.fit_step_law(N, D, B, lr, loss, tol=0.01, n_boot=10).n > 2 * fit.n


def test_step_law_needs_two_sizes():
  N, D, B, lr, loss = step_law_sweep()
  one = N == N[0]
  with pytest.raises(ValueError, match='distinct'):
    step_law.fit_step_law(N[one], D[one], B[one], lr[one], loss[one], n_boot=10)


# ----------------------------------------------------------------------------------------
# 3. Chinchilla approach 3.


def chinchilla_points(k=8, noise=0.002, seed=0):
  rng = np.random.default_rng(seed)
  N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, k), np.geomspace(1e9, 1e12, k)))
  loss = chinchilla.chinchilla_loss(N, D, *CHIN.values())
  return N, D, loss * np.exp(noise * rng.normal(size=N.size))


def test_chinchilla_recovers_synthetic_law_with_censored_points():
  N, D, loss = chinchilla_points()
  mask = np.ones(N.size, bool)
  mask[::10] = False  # diverged trials, reported with a meaningless loss
  loss_seen = np.where(mask, loss, 50.0)
  loss_seen[3] = np.nan  # a failed trial
  fit = chinchilla.fit_chinchilla(N, D, loss_seen, mask=mask, n_boot=20)
  p = fit.params
  assert fit.n == mask.sum() - 1 and fit.n_excluded == N.size - fit.n
  assert rel(p['alpha'], CHIN['alpha']) < 0.05 and rel(p['beta'], CHIN['beta']) < 0.05
  assert rel(p['E'], CHIN['E']) < 0.02
  assert p['a'] == pytest.approx(p['beta'] / (p['alpha'] + p['beta']))
  for k, (lo, hi) in fit.intervals.items():
    assert lo <= p[k] <= hi, k
  # Masked points are left out exactly; unmasked, they enter (the Huber loss keeps their
  # pull on the parameters small, but they cost their |log residual| * delta each).
  start = [[6.0, 7.0, 0.5, 0.3, 0.3]]
  use = mask & np.isfinite(loss_seen)
  kept = chinchilla.fit_chinchilla(N[use], D[use], loss[use], grid=start, n_boot=0)
  masked = chinchilla.fit_chinchilla(N, D, loss_seen, mask=mask, grid=start, n_boot=0)
  unmasked = chinchilla.fit_chinchilla(N, D, loss_seen, grid=start, n_boot=0)
  assert masked.params == kept.params
  assert unmasked.n == N.size - 1
  assert unmasked.objective > masked.objective + (~mask).sum() * 1e-3 * 2


def test_chinchilla_gradient_matches_finite_differences():
  N, D, loss = chinchilla_points(k=4, noise=0.01)
  args = np.log(N), np.log(D), np.log(loss), 1e-3, np.arange(N.size) % 3.0
  theta = np.array([6.0, 7.5, 0.6, 0.33, 0.38])
  _, grad = chinchilla.chinchilla_objective(theta, *args)
  eps = 1e-6 * np.eye(5)
  fd = [(chinchilla.chinchilla_objective(theta + e, *args)[0]
         - chinchilla.chinchilla_objective(theta - e, *args)[0]) / 2e-6 for e in eps]
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-10)


def test_compute_optimal_minimises_loss_at_fixed_compute():
  p = CHIN
  for C in (1e20, 1e23):
    n, d = chinchilla.compute_optimal(C, p['A'], p['B'], p['alpha'], p['beta'])
    assert 6 * n * d == pytest.approx(C)
    best = chinchilla.chinchilla_loss(n, d, *p.values())
    for f in (0.9, 1.1):
      assert chinchilla.chinchilla_loss(n * f, d / f, *p.values()) > best


def read_chinchilla_points():
  with open(os.path.join(TESTDATA, 'chinchilla_svg_extracted.csv')) as f:
    rows = list(csv.DictReader(f))
  N = np.array([float(r['Model Size']) for r in rows])
  C = np.array([float(r['Training FLOP']) for r in rows])
  loss = np.array([float(r['loss']) for r in rows])
  return N, C / (6 * N), loss


def test_chinchilla_reproduces_epoch_ai_replication():
  """Besiroglu et al. 2024: E=1.817, alpha=0.3473, beta=0.3672 (grid + L-BFGS variant)."""
  N, D, loss = read_chinchilla_points()
  assert len(loss) == 245
  keep = np.ones(245, bool)
  keep[np.argsort(loss)[-5:]] = False  # the 5 highest-loss points, as Epoch AI
  start = time.perf_counter()
  fit = chinchilla.fit_chinchilla(N, D, loss, mask=keep)  # 243 starts, 100 bootstrap refits
  elapsed = time.perf_counter() - start
  p = fit.params
  print(f'Chinchilla 243 starts + {len(fit.samples["E"])} bootstraps: {elapsed:.1f} s; '
        f'{json.dumps({k: round(v, 4) for k, v in p.items()})} obj {fit.objective:.8f}')
  assert fit.n == 240 and fit.n_starts == 243
  assert abs(p['alpha'] - 0.347) < 0.01 and abs(p['beta'] - 0.367) < 0.01
  assert abs(p['E'] - 1.817) < 0.02
  assert fit.objective < 0.0010185  # the full 4,500-start optimum is 0.00101827
  assert np.median(np.abs(fit.loss(N[keep], D[keep]) / loss[keep] - 1)) < 0.01
  # Exponents of compute-optimal scaling (docs/papers.md §9.7: N_opt ∝ C^0.514).
  assert p['a'] == pytest.approx(0.514, abs=0.01)
  n_opt, d_opt = fit.compute_optimal(5.76e23)
  assert n_opt == pytest.approx(7.2e10, rel=0.1) and d_opt == pytest.approx(1.33e12, rel=0.1)
  # One start from Hoffmann et al.'s values stops early (Besiroglu et al.'s diagnosis).
  hoffmann = [np.log(406.4), np.log(410.7), np.log(1.69), 0.34, 0.28]
  single = chinchilla.fit_chinchilla(N, D, loss, mask=keep, grid=[hoffmann], n_boot=0,
                               ftol=2.2e-9, gtol=1e-5)
  assert single.objective > fit.objective * 1.05


# ----------------------------------------------------------------------------------------
# 4. Critical batch size.

B_STAR, ALPHA_B = 2e5, 0.21  # B_crit(L) = B_STAR / L^(1/ALPHA_B)


def s_min_of_loss(L):
  return 100.0 * (L - 1.5) ** (-1 / 0.76)


def mccandlish_curves(batch_sizes, noise=1e-3, seed=0):
  """Loss curves (40 log-spaced evals) where steps to reach L at batch B are
  S_min(L) (1 + B_crit(L)/B) exactly."""
  rng = np.random.default_rng(seed)
  L = np.linspace(5.0, 2.0, 2000)
  curves = []
  for B in batch_sizes:
    steps_l = critical_batch.critical_batch_steps(B, s_min_of_loss(L), B_STAR / L ** (1 / ALPHA_B))
    evals = np.geomspace(1, steps_l[-1], 40)
    loss = np.interp(np.log(evals), np.log(steps_l), L, left=5.0)
    curves.append((evals, loss * (1 + noise * rng.normal(size=40))))
  return curves


def test_steps_to_target_interpolates_in_log_steps():
  steps = np.array([10, 100, 1000, 10000])
  losses = np.array([4.0, 3.0, 3.2, 2.0])  # a worse eval: the running min stays at 3.0
  assert critical_batch.steps_to_target(steps, losses, 2.5) == pytest.approx(10 ** 3.5)
  assert critical_batch.steps_to_target(steps, losses, 3.5) == pytest.approx(10 ** 1.5)
  assert critical_batch.steps_to_target(steps, losses, 4.5) == 10
  assert critical_batch.steps_to_target(steps, losses, 1.9) == np.inf


def test_critical_batch_recovers_s_min_and_b_crit():
  rng = np.random.default_rng(0)
  B = 2.0 ** np.arange(4, 15)
  S = critical_batch.critical_batch_steps(B, 1000.0, 256.0) * np.exp(0.02 * rng.normal(size=B.size))
  fit = critical_batch.fit_critical_batch(B, S)
  p = fit.params
  assert rel(p['S_min'], 1000) < 0.05 and rel(p['B_crit'], 256) < 0.05
  assert p['E_min'] == pytest.approx(p['S_min'] * p['B_crit'])
  lo, hi = fit.intervals['B_crit']
  assert lo < 256 < hi
  # The fitted model satisfies (S/S_min - 1)(E/E_min - 1) = 1 with E = B S.
  s = critical_batch.critical_batch_steps(B, p['S_min'], p['B_crit'])
  np.testing.assert_allclose((s / p['S_min'] - 1) * (B * s / p['E_min'] - 1), 1.0)


def test_critical_batch_law_across_loss_targets():
  B = 2.0 ** np.arange(5, 16)
  law = critical_batch.fit_critical_batch_law(B, mccandlish_curves(B), [2.2, 2.6, 3.0, 3.4, 3.8],
                                    n_boot=50)
  assert rel(law.params['alpha_B'], ALPHA_B) < 0.05
  assert rel(law.params['B_star'], B_STAR) < 0.3
  for f in law.per_target:
    assert rel(f.params['B_crit'], B_STAR / f.target ** (1 / ALPHA_B)) < 0.1
    assert rel(f.params['S_min'], s_min_of_loss(f.target)) < 0.1
  lo, hi = law.intervals['alpha_B']
  assert lo < law.params['alpha_B'] < hi


# ----------------------------------------------------------------------------------------
# 5. Power scheduler.


def test_power_scheduler_calibration():
  rng = np.random.default_rng(0)
  beta, T = (a.ravel() for a in np.meshgrid([64, 128, 256, 512], np.geomspace(1e8, 1e10, 5)))
  lr = beta * 4.0 * T ** -0.51 * np.exp(0.05 * rng.normal(size=T.size))
  fit = power_scheduler.fit_power_scheduler(beta, T, lr, lr_max=0.02)
  assert rel(fit.params['b'], -0.51) < 0.05 and rel(fit.params['a'], 4.0) < 0.3
  cfg = fit.schedule_config()
  assert cfg == {'name': 'power', 'a': fit.params['a'], 'b': fit.params['b'], 'lr_max': 0.02}
  assert power_scheduler.fit_power_scheduler(beta, T, lr, n_boot=0).lr_max == lr.max()


# ----------------------------------------------------------------------------------------
# 6. Prediction and laws.json.


def test_predict_and_round_trip():
  N, D, B, lr, loss = step_law_sweep()
  step = step_law.fit_step_law(N, D, B, lr, loss, n_boot=200)
  n, d, loss = chinchilla_points(k=5, noise=0.003, seed=1)
  chin = chinchilla.fit_chinchilla(n, d, loss, grid=[[6.0, 7.0, 0.5, 0.3, 0.3]], n_boot=20)
  fitted = {'step_law': step, 'chinchilla': chin, 'notes': ['x']}
  d = json.loads(json.dumps(serialize.laws_to_dict(fitted), allow_nan=False))
  loaded = serialize.laws_from_dict(d)
  assert serialize.laws_to_dict(loaded) == d and loaded['notes'] == ['x']
  N0, D0 = 3e9, 3e11  # extrapolated beyond both sweeps
  for law_set in (fitted, loaded):
    out = estimate.predict(law_set, N0, D0)
    assert rel(out['lr'].value, LR_C * N0**ALPHA * D0**BETA) < 0.15
    assert rel(out['batch_size'].value, B_C * D0**GAMMA) < 0.3
    assert rel(out['loss'].value, chinchilla.chinchilla_loss(N0, D0, *CHIN.values())) < 0.01
    for e in out.values():
      assert e.lo <= e.value <= e.hi
  assert estimate.predict(loaded, N0, D0) == estimate.predict(fitted, N0, D0)
  assert estimate.predict({}, N0, D0) == {}
