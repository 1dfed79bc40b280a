"""Import other people's sweeps from CSV into trial rows that `report.fit_all` reads.

A mapping names, for each of our columns, the CSV column that holds it:

  Step Law (github.com/step-law/steplaw, data/dense_lr_bs_loss.csv):
    import_csv(path, {'N': 'N', 'D': 'D', 'B': 'bs', 'lr': 'lr', 'loss': 'smooth loss'},
               constants={'seq_len': 2048})
  Chinchilla points (Epoch AI, data/svg_extracted_data.csv), D derived as C / (6N):
    import_csv(path, {'N': 'Model Size', 'C': 'Training FLOP', 'loss': 'loss'})

Our columns: N (parameters), D (tokens), C (training FLOP, used only to derive D = C/(6N)),
B (batch size, sequences), lr, loss, status, seq_len. Columns a fit does not need may be
left out. Numbers are read as floats (empty cells as NaN); status defaults to 'ok'.
"""
import csv
import io
import os
from typing import Any, Iterable

COLUMNS = ('N', 'D', 'C', 'B', 'lr', 'loss', 'status', 'seq_len')


def import_csv(source: str | os.PathLike | Iterable[str], mapping: dict[str, str], *,
               constants: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """Rows {N, D, B, lr, loss, status, ...} from a CSV path (or open file, or lines).

  mapping: our column -> CSV column. constants: our column -> a value for every row.
  Raises ValueError naming our unknown keys, or the mapped CSV columns that are missing
  (listing the columns the file has).
  """
  unknown = sorted(set(mapping) - set(COLUMNS))
  if unknown:
    raise ValueError(f'unknown target column(s) {unknown}; valid: {list(COLUMNS)}')
  if isinstance(source, (str, os.PathLike)):
    with open(source, newline='') as f:
      return import_csv(io.StringIO(f.read()), mapping, constants=constants)
  reader = csv.DictReader(source)
  available = list(reader.fieldnames or [])
  missing = [f'{ours!r} -> {theirs!r}' for ours, theirs in mapping.items()
             if theirs not in available]
  if missing:
    raise ValueError(f'CSV column(s) missing: {", ".join(missing)}; the file has '
                     f'columns {available}')
  rows = []
  for record in reader:
    row = dict(constants or {})
    for ours, theirs in mapping.items():
      row[ours] = record[theirs] if ours == 'status' else _float(record[theirs])
    if 'D' not in row and 'C' in row and 'N' in row:
      row['D'] = row['C'] / (6 * row['N'])  # C ≈ 6ND (Kaplan et al. 2020)
    row.setdefault('status', 'ok')
    rows.append(row)
  return rows


def _float(text: str) -> float:
  text = text.strip()
  return float(text) if text else float('nan')
