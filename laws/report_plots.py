"""The report's plots: learning-rate curves, Step Law, L(N, D) and critical batch size.

Each function takes the rows and the laws dict of `laws.report` and returns a
matplotlib Figure, or None when the laws hold nothing to plot.
"""
import math

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from laws import critical_batch as critical_batch_lib  # step_law, critical_batch: plots here
from laws import report  # its row and number helpers; called only at plot time
from laws import step_law as step_law_lib

# ----------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects, no pyplot state; Agg renders them).


def _plain_minor_ticks(*axes):
  """No labels on minor log ticks: on short ranges they overprint each other."""
  for ax in axes:
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _rows_ok(results):
  return [r for r in results if report._usable(r)]


def lr_curves(results, laws):
  optima = laws.get('lr_optima')
  if not optima:
    return None
  panels = sorted({(o.cell['N'], o.cell['D']) for o in optima})[:16]
  cols = min(4, len(panels))
  nrows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(4 * cols, 3.2 * nrows), layout='constrained')
  axes = fig.subplots(nrows, cols, squeeze=False).ravel()
  for ax, (n, d) in zip(axes, panels):
    for j, o in enumerate(o for o in optima if (o.cell['N'], o.cell['D']) == (n, d)):
      pts = sorted((report._f(r, 'lr'), report._f(r, 'loss')) for r in _rows_ok(results)
                   if tuple(report._f(r, k) for k in 'NDB') == (n, d, o.cell['B']))
      lr, loss = np.array(pts).T
      color = f'C{j % 10}'
      ax.plot(lr, loss, 'o-', color=color, ms=3, lw=1, label=f'B={report._g(o.cell["B"])}')
      if o.poly:
        fit_lr = o.params['lr'] * np.geomspace(0.5, 2.0, 50)
        ax.plot(fit_lr, o.curve(fit_lr), '--', color=color, lw=1)
      ax.plot(o.params['lr'], o.params['loss'], '*', color=color, ms=10, mec='k', mew=0.5)
    ax.set(xscale='log', xlabel='learning rate', ylabel='loss',
           title=f'N={report._g(n, ".3g")}, D={report._g(d, ".3g")}')
    ax.legend(fontsize=7)
    _plain_minor_ticks(ax)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  return fig


def _band(ax, x, draws_x_s, color, level):
  q = 50 * (1 - level)
  lo, hi = np.percentile(np.asarray(draws_x_s), [q, 100 - q], axis=-1)
  ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def step_law(results, laws):
  step = laws.get('step_law')
  if step is None:
    return None
  level = laws.get('settings', report.DEFAULTS).get('level', 0.95)
  rows = _rows_ok(results)
  seq_default = float(laws.get('settings', {}).get('seq_len') or 1)
  N, D, B, lr, loss = (np.array([report._f(r, k) for r in rows])
                        for k in ("N", "D", "B", "lr", "loss"))
  B = B * np.array([report._f(r, 'seq_len') if 'seq_len' in r else seq_default for r in rows])
  keep = np.isfinite(N + D + B + lr) & step_law_lib.step_law_keep(N, D, loss, step.tol)
  fig = Figure(figsize=(10, 4), layout='constrained')
  ax_lr, ax_b = fig.subplots(1, 2)
  d_grid = np.geomspace(D[keep].min() / 1.5, D[keep].max() * 1.5, 60)
  for j, n in enumerate(sorted(set(N[keep]))):
    color = f'C{j % 10}'
    sel = keep & (N == n)
    ax_lr.plot(D[sel], lr[sel], 'o', color=color, ms=3, alpha=0.6, label=f'N={report._g(n, ".3g")}')
    ax_lr.plot(d_grid, step.lr(n, d_grid), '-', color=color)
    _band(ax_lr, d_grid, step.lr(n, d_grid, samples=True), color, level)
  p = step.params
  ax_lr.set(xscale='log', yscale='log', xlabel='tokens D', ylabel='learning rate (kept runs)',
            title=f'lr* = {p["lr_c"]:.3g} N^{p["alpha"]:.3f} D^{p["beta"]:.3f}')
  ax_lr.legend(fontsize=7)
  ax_b.plot(D[keep], B[keep], 'o', color='C0', ms=3, alpha=0.6)
  ax_b.plot(d_grid, step.batch_size(d_grid), '-', color='C0')
  _band(ax_b, d_grid, step.batch_size(d_grid, samples=True), 'C0', level)
  ax_b.set(xscale='log', yscale='log', xlabel='tokens D',
           ylabel=f'batch size, {step.batch_unit} (kept runs)',
           title=f'B* = {p["B_c"]:.3g} D^{p["gamma"]:.3f}')
  _plain_minor_ticks(ax_lr, ax_b)
  return fig


def chinchilla(results, laws):
  chin = laws.get('chinchilla')
  if chin is None:
    return None
  rows = _rows_ok(results)
  N, D, loss = (np.array([report._f(r, k) for r in rows]) for k in ('N', 'D', 'loss'))
  ok = np.isfinite(N + D + loss) & (N > 0) & (D > 0)
  N, D, loss = N[ok], D[ok], loss[ok]
  C = 6 * N * D
  c_grid = np.geomspace(C.min() / 10, C.max() * 10, 120)
  n_grid = np.geomspace(N.min() / 10, N.max() * 10, 100)
  cc, nn = np.meshgrid(c_grid, n_grid)
  ll = chin.loss(nn, cc / (6 * nn))
  fig = Figure(figsize=(6.5, 5), layout='constrained')
  ax = fig.subplots()
  levels = np.quantile(ll, np.linspace(0.02, 0.9, 12))
  cs = ax.contour(cc, nn, ll, levels=np.unique(levels), cmap='viridis', linewidths=0.8)
  ax.clabel(cs, fontsize=6, fmt='%.3g')
  sc = ax.scatter(C, N, c=loss, s=10, cmap='viridis', edgecolors='k', linewidths=0.2)
  fig.colorbar(sc, ax=ax, label='final loss')
  ax.plot(c_grid, chin.compute_optimal(c_grid)[0], 'r-', lw=1.5,
          label=f'N_opt ∝ C^{chin.params["a"]:.3f}')
  ax.set(xscale='log', yscale='log', xlabel='compute C = 6ND (FLOP)', ylabel='parameters N',
         title=f'L = {chin.params["E"]:.3g} + {chin.params["A"]:.3g}/N^{chin.params["alpha"]:.3f}'
               f' + {chin.params["B"]:.3g}/D^{chin.params["beta"]:.3f}')
  ax.legend(fontsize=8)
  return fig


def critical_batch(results, laws):
  crit = laws.get('critical_batch')
  if not crit:
    return None
  level = laws.get('settings', report.DEFAULTS).get('level', 0.95)
  crit = crit[:4]
  fig = Figure(figsize=(10, 4 * len(crit)), layout='constrained')
  axes = fig.subplots(len(crit), 2, squeeze=False)
  for (ax_se, ax_b), law in zip(axes, crit):
    for j, f in enumerate(law.per_target):
      color = f'C{j % 10}'
      B, S = np.array(f.batch_sizes), np.array(f.steps)
      ax_se.plot(B * S, S, 'o', color=color, ms=4, label=f'L={f.target:.4g}')
      b = np.geomspace(B.min() / 4, B.max() * 4, 100)
      s = critical_batch_lib.critical_batch_steps(b, f.params['S_min'], f.params['B_crit'])
      ax_se.plot(b * s, s, '-', color=color, lw=1)
    ax_se.set(xscale='log', yscale='log', xlabel='examples E = B·S', ylabel='steps S',
              title=f'N={report._g(law.N, ".3g")}: (S/S_min − 1)(E/E_min − 1) = 1')
    ax_se.legend(fontsize=7)
    t = np.array([f.target for f in law.per_target])
    bc = np.array([f.params['B_crit'] for f in law.per_target])
    err = np.abs(np.array([f.intervals['B_crit'] for f in law.per_target]).T - bc)
    ax_b.errorbar(t, bc, yerr=np.nan_to_num(err), fmt='o', color='C0', ms=4)
    l_grid = np.geomspace(t.min() / 1.05, t.max() * 1.05, 60)
    ax_b.plot(l_grid, law.b_crit(l_grid), '-', color='C0')
    _band(ax_b, l_grid, law.b_crit(l_grid, samples=True), 'C0', level)
    ax_b.set(xscale='log', yscale='log', xlabel='loss target L', ylabel='B_crit',
             title=f'B_crit = {law.params["B_star"]:.3g} / L^(1/{law.params["alpha_B"]:.3f})')
    _plain_minor_ticks(ax_se, ax_b)
  return fig
