"""Fit every applicable law to a sweep's trial rows and write the report.

A row is a dict (one trial):
  N       parameters                       D     training tokens
  B       batch size (sequences/examples)  lr    peak learning rate
  loss    final loss                       status 'ok' | 'diverged' | 'failed' (default 'ok')
  optional: seq_len (tokens per sequence; Step Law's B* is then in tokens), and a loss
  curve as row['steps'], row['losses'] or row['curve'] = {'steps': [...], 'losses': [...]}.
Only 'ok' rows with a finite loss enter the fits; the others are counted and noted.

  laws = fit_all(rows, {'n_boot': 200})
  write_report(rows, laws, 'workdir/report')   # laws.json, report.md, *.png

laws.json and report.md are deterministic: the same rows and config give identical bytes.
"""
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from train import files
from laws import chinchilla
from laws import critical_batch
from laws import lr_optimum
from laws import power_scheduler
from laws import report_plots
from laws import serialize
from laws import step_law

DEFAULTS = dict(
    seed=0,
    level=0.95,           # bootstrap interval level
    tol=0.0025,           # Step Law: keep runs within this relative loss of the cell's best
    n_boot=1000,          # bootstrap draws of the OLS fits (Step Law, Power scheduler)
    lr_bandwidth=None,    # optimal_lr kernel width in log(lr); None: 1.5 grid spacings
    chinchilla_grid='small',  # 'small' (243 starts) or 'full' (4,500)
    chinchilla_n_boot=100,
    critical_batch_n_boot=200,
    loss_targets=None,    # critical batch targets; None: chosen from the curves
    n_targets=5,
    seq_len=None,         # tokens per sequence when rows do not say
    divergence_ratio=1.5,  # a run whose loss exceeds this x its cell's best leaves the lr fits
)

PLOTS = ('lr_curves.png', 'step_law.png', 'chinchilla.png', 'critical_batch.png')


# ----------------------------------------------------------------------------------------
# Fitting.


def _settings(config) -> dict[str, Any]:
  out = dict(DEFAULTS)
  if config is not None:
    for k in DEFAULTS:
      if k in config:
        v = config[k]
        out[k] = v.to_dict() if hasattr(v, 'to_dict') else v  # ConfigDict -> dict
  if out['loss_targets'] is not None:
    out['loss_targets'] = [float(t) for t in out['loss_targets']]
  return out


def _f(row, key):
  v = row.get(key)
  try:
    return float(v)
  except (TypeError, ValueError):
    return float('nan')


def _curve(row):
  c = row.get('curve') or row
  steps, losses = c.get('steps'), c.get('losses')
  if steps is None or losses is None or len(steps) < 2:
    return None
  return np.asarray(steps, float), np.asarray(losses, float)


def _usable(row):
  return row.get('status', 'ok') == 'ok' and math.isfinite(_f(row, 'loss'))


def fit_all(results: Sequence[Mapping[str, Any]], config: Mapping | None = None) -> dict:
  """Run every fit the rows support; returns the laws dict that write_report and predict read.

  Keys: counts, settings, notes (why a fit was skipped, which rows were excluded), and where
  the rows allow it lr_optima (one `LrOptimum` per (N, D, B) cell), step_law, chinchilla,
  critical_batch (one `CriticalBatchLaw` per N with curves), power_scheduler.
  config: a dict or ml_collections ConfigDict overriding `DEFAULTS`.
  """
  cfg = _settings(config)
  seed, level = cfg['seed'], cfg['level']
  counts = {'rows': len(results)}
  for status in ('ok', 'diverged', 'failed'):
    counts[status] = sum(r.get('status', 'ok') == status for r in results)
  rows = [r for r in results if _usable(r)]
  notes = []
  bad = counts['rows'] - len(rows)
  if bad:
    notes.append(f'{bad} of {counts["rows"]} rows excluded from all fits '
                 f'({counts["diverged"]} diverged, {counts["failed"]} failed, '
                 f'{bad - counts["diverged"] - counts["failed"]} ok without a finite loss).')
  undetermined = {}  # law -> why this grid does not determine it (predict refuses these)
  laws = {'counts': counts, 'settings': cfg, 'notes': notes, 'undetermined': undetermined}
  layouts = sorted({r['layout'] for r in results if r.get('layout')})
  if layouts:  # how the trials were trained (sequential or vectorised), for the record
    laws['layout'] = ', '.join(layouts)
  col = {k: np.array([_f(r, k) for r in rows]) for k in ('N', 'D', 'B', 'lr', 'loss')}

  def attempt(name, fn):
    try:
      laws[name] = fn()
    except ValueError as e:
      notes.append(f'{name} not fitted: {e}')

  # Optimal learning rate per (N, D, B) cell.
  _fit_lr_optima(rows, col, cfg, laws)
  # Step Law on the raw rows.
  seq = np.array([_f(r, 'seq_len') if 'seq_len' in r else float(cfg['seq_len'] or 1)
                  for r in rows])
  in_tokens = cfg['seq_len'] is not None or any('seq_len' in r for r in rows)
  attempt('step_law', lambda: step_law.fit_step_law(
      col['N'], col['D'], col['B'] * seq, col['lr'], col['loss'], tol=cfg['tol'],
      n_boot=cfg['n_boot'], seed=seed, level=level,
      batch_unit='tokens' if in_tokens else 'rows B unit'))

  # L(N, D) on the best loss of each (N, D) cell.
  _fit_l_of_n_d(col, cfg, laws, attempt)
  # Critical batch size per N, from the curve of each batch size's best run.
  crit = _fit_critical_batches(rows, col, cfg, laws)
  if crit:
    laws['critical_batch'] = crit

  # Power scheduler from the interior optima: lr_opt / B = a D^b.
  inner = [o for o in laws.get('lr_optima', []) if o.edge == '']
  if len(inner) >= 3 and len({o.cell['D'] for o in inner}) >= 2:
    attempt('power_scheduler', lambda: power_scheduler.fit_power_scheduler(
        [o.cell['B'] for o in inner], [o.cell['D'] for o in inner],
        [o.params['lr'] for o in inner], n_boot=cfg['n_boot'], seed=seed, level=level))
  elif 'lr_optima' in laws:
    notes.append('power_scheduler not fitted: needs interior optima at two or more D')
  return laws


def _fit_lr_optima(rows, col, cfg, laws):
  """`optimal_lr` of each (N, D, B) cell with two or more runs left once the runs that
  diverged to a finite loss are dropped; sets lr_optima and diverged_runs, adds notes."""
  cells = {}
  for i, r in enumerate(rows):
    key = (col['N'][i], col['D'][i], col['B'][i])
    if math.isfinite(col['lr'][i]) and all(map(math.isfinite, key)):
      cells.setdefault(key, []).append(i)
  optima, excluded = [], []
  for key in sorted(cells):
    idx, dropped = _drop_diverged(cells[key], col['loss'], cfg['divergence_ratio'])
    excluded += [dict(zip('NDB', key), lr=float(col['lr'][i]), loss=float(col['loss'][i]))
                 for i in dropped]
    if len(idx) >= 2:
      optima.append(lr_optimum.optimal_lr(col['lr'][idx], col['loss'][idx],
                                          bandwidth=cfg['lr_bandwidth'], tol=cfg['tol'],
                                          cell=dict(zip('NDB', key))))
  if excluded:
    laws['diverged_runs'] = excluded
    laws['notes'].append(f'{len(excluded)} runs left the learning-rate optimum fits: their '
                         f'loss is above {cfg["divergence_ratio"]:g} x their cell\'s best '
                         '(diverged runs table; fit.divergence_ratio).')
  if optima:
    laws['lr_optima'] = optima
    edges = sum(o.edge != '' for o in optima)
    if edges:
      laws['notes'].append(f'{edges} of {len(optima)} cells have their best learning rate '
                           'at the edge of the grid (edge column); widen the grid there.')


def _fit_l_of_n_d(col, cfg, laws, attempt):
  """Chinchilla approach 3 on each (N, D) cell's best loss, when the grid determines it."""
  best = {}
  for n, d, loss in zip(col['N'], col['D'], col['loss']):
    if math.isfinite(n) and math.isfinite(d):
      best[(n, d)] = min(loss, best.get((n, d), math.inf))
  if best:
    nd = np.array(sorted(best))
    loss = np.array([best[tuple(k)] for k in nd])
    distinct = len(np.unique(nd[:, 0])), len(np.unique(nd[:, 1]))
    reason = chinchilla.chinchilla_undetermined(None, *distinct)
    if not reason:
      attempt('chinchilla', lambda: chinchilla.fit_chinchilla(
          nd[:, 0], nd[:, 1], loss, grid=cfg['chinchilla_grid'],
          n_boot=cfg['chinchilla_n_boot'], seed=cfg['seed'], level=cfg['level']))
      if 'chinchilla' in laws:
        reason = chinchilla.chinchilla_undetermined(laws['chinchilla'], *distinct)
    if reason:
      laws.pop('chinchilla', None)
      laws['undetermined']['chinchilla'] = reason
      laws['notes'].append(f'chinchilla: not determined by this grid: {reason}.')


def _fit_critical_batches(rows, col, cfg, laws) -> list:
  """One critical-batch law per N with loss curves at 3 or more batch sizes."""
  crit = []
  for n in sorted({col['N'][i] for i, r in enumerate(rows) if _curve(r) is not None}):
    best_run = {}
    for i, r in enumerate(rows):
      if col['N'][i] == n and _curve(r) is not None:
        b = col['B'][i]
        if b not in best_run or col['loss'][i] < col['loss'][best_run[b]]:
          best_run[b] = i
    if len(best_run) < 3:
      laws['notes'].append(f'critical batch at N={n:.4g} not fitted: curves at {len(best_run)} '
                   'batch sizes, need 3')
      continue
    bs = sorted(best_run)
    curves = [_curve(rows[best_run[b]]) for b in bs]
    targets = cfg['loss_targets'] or _auto_targets(curves, cfg['n_targets'])
    try:
      crit.append(critical_batch.fit_critical_batch_law(
          bs, curves, targets, n_boot=cfg['critical_batch_n_boot'], seed=cfg['seed'],
          level=cfg['level'], N=n))
    except ValueError as e:
      laws['notes'].append(f'critical batch at N={n:.4g} not fitted: {e}')
      if 'not determined' in str(e):
        laws['undetermined'][f'critical_batch at N={n:.4g}'] = str(e)
  return crit


def _drop_diverged(idx, losses, ratio):
  """(kept, dropped) row indices of one cell: a run whose final loss is above `ratio` x the
  cell's best diverged to a finite loss, and would pull the fitted optimum towards it."""
  best = min(losses[i] for i in idx)
  kept = [i for i in idx if losses[i] <= ratio * best]
  return kept, [i for i in idx if losses[i] > ratio * best]


def _auto_targets(curves, k):
  """k loss targets every curve reaches: from just above the worst final best-loss up to
  halfway to the lowest starting loss."""
  reach = max(float(np.nanmin(l)) for _, l in curves)
  start = min(float(l[np.isfinite(l)][0]) for _, l in curves)
  return list(reach + (start - reach) * np.linspace(0.05, 0.5, k))


# ----------------------------------------------------------------------------------------
# Writing.


def read_laws(path: str) -> dict:
  """laws dict back from a laws.json."""
  with open(path) as f:
    return serialize.laws_from_dict(json.load(f))


def laws_json(laws: dict) -> str:
  """laws.json text: sorted keys, NaN as null, each list of numbers on one line."""
  text = json.dumps(serialize.laws_to_dict(laws), sort_keys=True, indent=1, allow_nan=False)
  one_line = lambda m: '[' + ', '.join(v.strip() for v in m[1].split(',') if v.strip()) + ']'
  return re.sub(r'\[([^\[\]{}"]*)\]', one_line, text) + '\n'


def write_report(results: Sequence[Mapping[str, Any]], laws: dict, out_dir: str) -> list[str]:
  """Writes laws.json, report.md and the plots the rows and laws allow; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def put(name, text):
    path = os.path.join(out_dir, name)
    files.atomic_write(path, text)
    written.append(path)

  plots = []
  for name, plot in zip(PLOTS, (report_plots.lr_curves, report_plots.step_law,
                                report_plots.chinchilla, report_plots.critical_batch)):
    fig = plot(results, laws)
    if fig is not None:
      path = os.path.join(out_dir, name)
      with files.atomic_open(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=100, metadata={'Software': None})
      plots.append(name)
      written.append(path)
  put('laws.json', laws_json(laws))
  put('report.md', markdown(laws, plots))
  return sorted(written)


def _g(x, fmt='.4g'):
  return '–' if x is None or not math.isfinite(x) else format(x, fmt)


def _iv(iv):
  return f'[{_g(iv[0])}, {_g(iv[1])}]'


def _param_table(fit, level):
  lines = [f'| parameter | value | {level:.0%} interval |', '|---|---|---|']
  for k, v in fit.params.items():
    lines.append(f'| {k} | {_g(v)} | {_iv(fit.intervals.get(k, (None, None)))} |')
  lines.append('')
  lines.append(f'Objective {_g(fit.objective, ".6g")} over {fit.n} points.')
  return lines


def markdown(laws: dict, plots: Sequence[str] = ()) -> str:
  """report.md text: tables of every fit in laws."""
  cfg = laws.get('settings', DEFAULTS)
  level = cfg.get('level', 0.95)
  c = laws.get('counts', {})
  out = ['# Scaling-law report', '',
         f'Rows: {c.get("rows", "?")} (ok {c.get("ok", "?")}, diverged '
         f'{c.get("diverged", "?")}, failed {c.get("failed", "?")}). Only ok rows with a '
         'finite loss enter the fits.', '']
  if laws.get('layout'):
    out += [f'Trials trained {laws["layout"]} (config.layout).', '']
  optima = laws.get('lr_optima')
  if optima:
    out += ['## Optimal learning rate per cell', '',
            'Minimum of a locally weighted cubic in log(lr); interval: where the fit is '
            f'within {cfg.get("tol", 0.0025):.2%} of its minimum.', '',
            '| N | D | B | lr* | interval | loss at lr* | grid argmin | method | edge |',
            '|---|---|---|---|---|---|---|---|---|']
    for o in optima:
      out.append(f'| {_g(o.cell["N"])} | {_g(o.cell["D"])} | {_g(o.cell["B"])} | '
                 f'{_g(o.params["lr"])} | {_iv(o.intervals["lr"])} | '
                 f'{_g(o.params["loss"], ".5g")} | {_g(o.grid_argmin)} | {o.method} | '
                 f'{o.edge or "–"} |')
    out.append('')
  diverged = laws.get('diverged_runs')
  if diverged:
    out += ['## Runs left out of the learning-rate optima', '',
            f'Final loss above {cfg.get("divergence_ratio", 1.5):g} x the best loss of their '
            '(N, D, B) cell.', '', '| N | D | B | lr | loss |', '|---|---|---|---|---|']
    out += [f'| {_g(r["N"])} | {_g(r["D"])} | {_g(r["B"])} | {_g(r["lr"])} | '
            f'{_g(r["loss"], ".5g")} |' for r in diverged] + ['']
  step = laws.get('step_law')
  if step is not None:
    out += ['## Step Law (Li et al. 2025)', '',
            'lr*(N, D) = lr_c · N^alpha · D^beta,  B*(D) = B_c · D^gamma; OLS in log space '
            f'over runs within {step.tol:.2%} of their cell\'s best ({step.n} runs, '
            f'{step.n_cells} cells), bootstrap mean and percentile interval; B in '
            f'{step.batch_unit}.', '']
    out += _param_table(step, level) + ['']
  chin = laws.get('chinchilla')
  if chin is not None:
    out += ['## L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3)', '',
            f'Huber (delta {chin.delta:g}) on log L, L-BFGS-B from {chin.n_starts} starts; '
            'a, b: N_opt ∝ C^a, D_opt ∝ C^b.', '']
    out += _param_table(chin, level) + ['']
    out += ['| C (FLOP) | N_opt | D_opt | D/N | loss |', '|---|---|---|---|---|']
    for C in _decades(chin):
      n, d = chin.compute_optimal(C)
      out.append(f'| {_g(C, ".3g")} | {_g(n, ".3g")} | {_g(d, ".3g")} | {_g(d / n, ".3g")} '
                 f'| {_g(chin.loss(n, d), ".4g")} |')
    out.append('')
  for law in laws.get('critical_batch', []):
    out += [f'## Critical batch size at N = {_g(law.N)} (McCandlish et al. 2018)', '',
            'S = S_min (1 + B_crit/B) per loss target; B_crit(L) = B_star / L^(1/alpha_B).', '',
            '| target loss | S_min | E_min | B_crit | B_crit interval |',
            '|---|---|---|---|---|']
    for f in law.per_target:
      out.append(f'| {_g(f.target, ".5g")} | {_g(f.params["S_min"])} | '
                 f'{_g(f.params["E_min"])} | {_g(f.params["B_crit"])} | '
                 f'{_iv(f.intervals["B_crit"])} |')
    out += [''] + _param_table(law, level) + ['']
  out += _irreducible_loss_section(laws.get('irreducible_loss'), level)
  power = laws.get('power_scheduler')
  if power is not None:
    out += ['## Power scheduler calibration (Shen et al. 2024)', '',
            'lr_opt / B = a · D^b over the interior per-cell optima (B in sequences).', '']
    schedule = json.dumps(power.schedule_config(), sort_keys=True)
    out += _param_table(power, level) + ['', f'Schedule config: `{schedule}`', '']
  if laws.get('undetermined'):
    out += ['## Not determined by this grid', '',
            'No numbers are reported for these laws, and `laws.predict` refuses them.', '']
    out += [f'- **{law}**: {why}' for law, why in sorted(laws['undetermined'].items())] + ['']
  if laws.get('notes'):
    out += ['## Notes', ''] + [f'- {n}' for n in laws['notes']] + ['']
  if plots:
    out += ['## Plots', ''] + [f'![{p[:-4]}]({p})' for p in plots] + ['']
  return '\n'.join(out)


def _irreducible_loss_section(floor, level):
  """Known irreducible loss (a synthetic corpus's entropy rate) beside the fitted E.

  laws['irreducible_loss'] = {'known_E', 'source', optional 'fitted_E', 'fitted_E_interval',
  'best_loss'}: added by sweep.runner for corpora whose entropy rate is known.
  """
  if not floor:
    return []
  out = ['## Irreducible loss: fitted E against the known entropy rate', '',
         f'Known E: {floor.get("source", "")}.', '',
         f'| E (nats/token) | value | {level:.0%} interval |', '|---|---|---|',
         f'| known | {_g(floor["known_E"], ".5g")} | – |']
  if floor.get('fitted_E') is not None:
    out.append(f'| fitted, L(N, D) | {_g(floor["fitted_E"], ".5g")} | '
               f'{_iv(floor.get("fitted_E_interval") or (None, None))} |')
  if floor.get('best_loss') is not None:
    out.append(f'| best loss of the sweep | {_g(floor["best_loss"], ".5g")} | – |')
  return out + ['']


def _decades(chin):
  """Compute budgets to tabulate: whole decades over the data's 6ND and two beyond."""
  if not chin.C_range:
    return []
  lo, hi = (math.log10(c) for c in chin.C_range)
  return [10.0 ** k for k in range(math.ceil(lo), math.floor(hi) + 3)]
