"""laws/report.py and laws/csv_import.py: fit_all on a synthetic sweep,
the files write_report leaves, laws.json round trips, determinism, CSV import."""
import io
import json
import os

import numpy as np
import pytest

from laws import chinchilla
from laws import critical_batch
from laws import csv_import, report
from laws import estimate
from laws import serialize

TESTDATA = os.path.join(os.path.dirname(__file__), '..', 'testdata')
FAST = dict(n_boot=100, chinchilla_n_boot=10, critical_batch_n_boot=30,
            chinchilla_grid=dict(a=[5, 10], b=[5, 10], e=[0, 1], alpha=[.3, .6], beta=[.3, .6]))
SEQ_LEN = 128


def curve(B, final_step, rng):
  """Loss curve where reaching loss L at batch B takes S_min(L) (1 + B_crit(L)/B) steps."""
  L = np.linspace(8.0, 2.3, 500)
  steps_l = critical_batch.critical_batch_steps(B, 20 * (L - 2.2) ** -1.3, 3e3 / L ** 4)
  steps = np.unique(np.geomspace(1, final_step, 30).round())
  losses = np.interp(np.log(steps), np.log(steps_l), L, left=8.0)
  return steps.tolist(), (losses * (1 + 1e-3 * rng.normal(size=len(steps)))).tolist()


def synthetic_rows(seed=0):
  """A 3 N x 3 D x 4 B x 7 lr sweep around the Step Law optimum (B in sequences of SEQ_LEN
  tokens; the lr grid has a random offset per point); lr above 4x the optimum
  diverges; one trial failed; loss curves for the smallest model."""
  rng = np.random.default_rng(seed)
  rows = []
  for N in (1e6, 4e6, 1.6e7):
    for D in (1e8, 4e8, 1.6e9):
      lr_opt, b_opt = 1.79 * N ** -0.713 * D ** 0.307, 0.58 * D ** 0.571
      loss_opt = chinchilla.chinchilla_loss(N, D, 1.8, 480.0, 2100.0, 0.35, 0.37)
      b_center = 2.0 ** round(np.log2(b_opt / SEQ_LEN))
      for B in b_center * 2.0 ** np.arange(-2, 2):
        for k in range(-3, 4):
          lr = float(lr_opt * 2.0 ** (k + rng.uniform(-0.5, 0.5)))
          u, v = np.log(lr / lr_opt), np.log(B * SEQ_LEN / b_opt)
          loss = loss_opt * (1 + 0.02 * u * u + 0.01 * v * v) * (1 + 1e-4 * rng.normal())
          row = dict(N=N, D=D, B=B, lr=lr, loss=float(loss), status='ok', seq_len=SEQ_LEN)
          if lr > 4 * lr_opt:
            row.update(status='diverged', loss=float('nan'))
          elif N == 1e6:
            row['steps'], row['losses'] = curve(B, D / (B * SEQ_LEN), rng)
          rows.append(row)
  rows[5].update(status='failed', loss=None)
  return rows


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  rows = synthetic_rows()
  fitted = report.fit_all(rows, FAST)
  out = tmp_path_factory.mktemp('report')
  paths = report.write_report(rows, fitted, str(out))
  return rows, fitted, out, paths


def test_fit_all_fits_every_law_and_notes_excluded_rows(sweep):
  rows, fitted, _, _ = sweep
  counts = fitted['counts']
  assert counts['rows'] == 252 and counts['failed'] == 1
  assert counts['diverged'] == sum(r['status'] == 'diverged' for r in rows) > 0
  assert counts['ok'] == 252 - counts['diverged'] - 1
  assert any('diverged' in n for n in fitted['notes'])
  for key in ('lr_optima', 'step_law', 'chinchilla', 'critical_batch', 'power_scheduler'):
    assert key in fitted, (key, fitted['notes'])
  assert len(fitted['lr_optima']) == 36  # every (N, D, B) cell
  assert len(fitted['critical_batch']) == 1 and fitted['critical_batch'][0].N == 1e6
  step = fitted['step_law']
  assert step.params['alpha'] == pytest.approx(-0.713, abs=0.1)
  assert step.params['gamma'] == pytest.approx(0.571, abs=0.1)
  assert fitted['chinchilla'].n == 9


def test_write_report_files(sweep):
  _, fitted, out, paths = sweep
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(['laws.json', 'report.md', *report.PLOTS])
  for p in paths:
    assert os.path.getsize(p) > 0
  with open(out / 'lr_curves.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  md = (out / 'report.md').read_text()
  for title in ('Step Law', 'Chinchilla', 'Critical batch', 'Power scheduler', 'Notes'):
    assert title in md
  assert "'name': 'power'" not in md and '"name": "power"' in md


def test_laws_json_round_trips(sweep, tmp_path):
  rows, fitted, out, _ = sweep
  text = (out / 'laws.json').read_text()
  loaded = report.read_laws(str(out / 'laws.json'))
  assert report.laws_json(loaded) == text
  report.write_report(rows, loaded, str(tmp_path))  # the report re-made from laws.json
  assert (tmp_path / 'report.md').read_text() == (out / 'report.md').read_text()
  d = json.loads(text)
  assert d['chinchilla']['params'].keys() == fitted['chinchilla'].params.keys()
  assert d['chinchilla']['objective'] == fitted['chinchilla'].objective
  assert set(d['chinchilla']['intervals']) == set(fitted['chinchilla'].params)
  pred = estimate.predict(loaded, 1e7, 1e9)
  assert pred == estimate.predict(fitted, 1e7, 1e9)
  assert set(pred) == {'lr', 'batch_size', 'loss', 'N_opt', 'D_opt'}


def test_report_is_deterministic(sweep, tmp_path):
  rows, _, out, _ = sweep
  report.write_report(rows, report.fit_all(synthetic_rows(), FAST), str(tmp_path))
  for name in ('laws.json', 'report.md'):
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_write_report_writes_what_it_can(tmp_path):
  rows = [r for r in synthetic_rows() if 'steps' not in r]  # no curves
  fitted = report.fit_all(rows, FAST)
  assert 'critical_batch' not in fitted
  names = {os.path.basename(p) for p in report.write_report(rows, fitted, str(tmp_path))}
  assert 'critical_batch.png' not in names and 'step_law.png' in names
  assert 'chinchilla' in fitted['undetermined']  # the rows without curves hold 2 N
  only_loss = [dict(N=r['N'], D=r['D'], loss=r['loss'], status=r['status'])
               for r in synthetic_rows()]
  fitted = report.fit_all(only_loss, FAST)
  assert set(serialize.LAW_KEYS) & set(fitted) == {'chinchilla'}
  assert any(n.startswith('step_law not fitted') for n in fitted['notes'])
  names = {os.path.basename(p) for p in report.write_report(only_loss, fitted, str(tmp_path / 'b'))}
  assert names == {'laws.json', 'report.md', 'chinchilla.png'}


# ----------------------------------------------------------------------------------------
# CSV import.

CHINCHILLA_MAP = {'N': 'Model Size', 'C': 'Training FLOP', 'loss': 'loss'}


def test_import_chinchilla_csv_derives_tokens():
  rows = csv_import.import_csv(os.path.join(TESTDATA, 'chinchilla_svg_extracted.csv'),
                               CHINCHILLA_MAP)
  assert len(rows) == 245
  r = rows[0]
  assert r['N'] == pytest.approx(6795600349.289497) and r['loss'] == pytest.approx(5.005582)
  assert r['D'] == pytest.approx(9.993852799709755e18 / (6 * 6795600349.289497))
  assert r['status'] == 'ok' and 'B' not in r and 'lr' not in r
  fitted = report.fit_all(rows, dict(FAST, chinchilla_n_boot=5))  # intervals needed
  assert fitted['chinchilla'].n == 245


def test_import_csv_mapping_constants_and_status():
  text = io.StringIO('params,tokens,bs,lr,smooth loss,state\n'
                     '1e8,2e9,64,1e-3,3.1,ok\n'
                     '1e8,2e9,64,4e-3,,diverged\n')
  rows = csv_import.import_csv(text, {'N': 'params', 'D': 'tokens', 'B': 'bs', 'lr': 'lr',
                                      'loss': 'smooth loss', 'status': 'state'},
                               constants={'seq_len': 2048})
  assert rows[0] == dict(N=1e8, D=2e9, B=64.0, lr=1e-3, loss=3.1, status='ok', seq_len=2048)
  assert rows[1]['status'] == 'diverged' and np.isnan(rows[1]['loss'])


def test_import_csv_missing_column_names_it():
  path = os.path.join(TESTDATA, 'chinchilla_svg_extracted.csv')
  with pytest.raises(ValueError) as e:
    csv_import.import_csv(path, {'N': 'Model Size', 'D': 'tokens', 'loss': 'loss'})
  msg = str(e.value)
  assert "'tokens'" in msg and "'Training FLOP'" in msg and "'Model Size'" in msg
  assert "'loss'" not in msg.split(';')[0]
  with pytest.raises(ValueError, match='unknown'):
    csv_import.import_csv(path, {'params': 'Model Size'})


def test_runs_far_above_their_cells_best_leave_the_lr_optima():
  """A run that diverged to a finite loss (3x the cell's best) would pin lr* next to it."""
  lrs = [0.01, 0.02, 0.04, 0.08, 0.16]
  losses = [2.2, 2.1, 2.05, 2.12, 6.3]
  rows = [dict(N=1e4, D=1e6, B=8, lr=lr, loss=l) for lr, l in zip(lrs, losses)]
  laws = report.fit_all(rows, {'n_boot': 10})
  assert laws['diverged_runs'] == [dict(N=1e4, D=1e6, B=8, lr=0.16, loss=6.3)]
  [optimum] = laws['lr_optima']
  assert optimum.n == 4 and optimum.params['loss'] >= 2.05 * (1 - 0.0025)
  assert 'Runs left out of the learning-rate optima' in report.markdown(laws)
  kept = report.fit_all(rows, {'n_boot': 10, 'divergence_ratio': 10.0})
  assert 'diverged_runs' not in kept and kept['lr_optima'][0].n == 5


def test_degenerate_critical_batch_is_not_determined():
  """Steps that do not depend on B drive the fit to E_min -> 0 (the 1e-308 of an earlier
  report): the law must say it is not determined, never print the number."""
  steps = np.arange(1, 65, dtype=float)
  losses = 3.0 / np.sqrt(steps)  # the same curve at every batch size
  curves = [(steps, losses)] * 3
  with pytest.raises(ValueError, match='not determined by this grid'):
    critical_batch.fit_critical_batch_law([8, 16, 32], curves, [1.0, 0.8, 0.6], n_boot=20)
  rows = [dict(N=1e4, D=1e6, B=b, lr=0.01, loss=float(losses[-1]),
               curve={'steps': steps.tolist(), 'losses': losses.tolist()}) for b in (8, 16, 32)]
  out = report.fit_all(rows, {'n_boot': 10, 'critical_batch_n_boot': 20})
  assert 'critical_batch' not in out
  assert any('not determined by this grid' in n for n in out['notes'])
  assert '1e-308' not in report.markdown(out) and 'e-3' not in report.laws_json(out)
