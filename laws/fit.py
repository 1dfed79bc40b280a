r"""Re-fit the scaling laws and rewrite the report, from a sweep's store or an imported CSV.

  python -m laws.fit --workdir=/tmp/sweep
  python -m laws.fit --workdir=/tmp/chinchilla \
      --csv=tests/testdata/chinchilla_svg_extracted.csv \
      --mapping="N:Model Size,C:Training FLOP,loss:loss" --drop_highest=5
      (the README's Chinchilla figures: Epoch AI's replication leaves out the 5 worst points)
  python -m laws.fit --workdir=/tmp/steplaw --csv=dense_lr_bs_loss.csv \
      --mapping="N:N,D:D,B:bs,lr:lr,loss:smooth loss" --constants=seq_len:2048

Without --csv the rows come from the sweep in --workdir (its sweep_config.json names the
store; --storage overrides). --mapping maps our columns (N, D, C, B, lr, loss, status,
seq_len; see laws/csv_import.py) to the CSV's. Fit settings come from --config (e.g.
`--config=configs/sweep.py:tiny --config.fit.n_boot=200`), else from the sweep's
config, else laws/report.py's defaults. Writes <workdir>/report/ (or --out). A study's sweep
(config.study) is re-analysed by its own analyse(rows, config, out_dir) instead.
"""
from __future__ import annotations

import os
import sys
import warnings

from absl import flags
from ml_collections import config_flags

from train import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config whose `fit` block "
                                          "sets the fit (optional).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (or where to write).")
_CSV = flags.DEFINE_string("csv", None, "Fit the rows of this CSV instead of the store.")
_MAPPING = flags.DEFINE_string("mapping", None, "ours:theirs pairs, comma separated, e.g. "
                               "'N:Model Size,C:Training FLOP,loss:loss'.")
_CONSTANTS = flags.DEFINE_string("constants", None, "ours:value pairs for every CSV row, "
                                 "e.g. 'seq_len:2048'.")
_STORAGE = flags.DEFINE_string("storage", None, "Optuna storage URL (default: the sweep's).")
_OUT = flags.DEFINE_string("out", None, "Report directory (default <workdir>/report).")
_DROP_HIGHEST = flags.DEFINE_integer(
    "drop_highest", 0, "Leave out the K rows with the highest loss before fitting, as Epoch "
    "AI's replication of Chinchilla does with K=5 (outliers of the digitised plot).")
cli.define_distributed_flags()  # for --traceback


def parse_pairs(text: str | None, flag: str, numbers: bool = False) -> dict:
  """'a:x,b:y z' -> {'a': 'x', 'b': 'y z'} (values as floats with numbers=True)."""
  out = {}
  for part in filter(None, (p.strip() for p in (text or "").split(","))):
    if ":" not in part:
      raise ValueError(f"--{flag}: {part!r} is not ours:theirs (e.g. 'N:Model Size').")
    key, value = (x.strip() for x in part.split(":", 1))
    if numbers:
      try:
        value = float(value)
      except ValueError:
        raise ValueError(f"--{flag}: {part!r}: the value must be a number.") from None
    out[key] = value
  return out


def drop_highest(rows: list[dict], k: int) -> list[dict]:
  """rows without the k of highest finite loss (the order of the rest kept)."""
  if k <= 0:
    return rows
  finite = [i for i, r in enumerate(rows) if isinstance(r.get("loss"), float)
            and r["loss"] == r["loss"] and abs(r["loss"]) != float("inf")]
  worst = set(sorted(finite, key=lambda i: rows[i]["loss"])[-k:])
  return [r for i, r in enumerate(rows) if i not in worst]


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=g-import-not-at-top
  import optuna
  from laws import csv_import
  from sweep import runner
  from sweep import store as store_lib
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  workdir = _WORKDIR.value
  sweep_config = None
  if os.path.exists(os.path.join(workdir, runner.CONFIG_FILE)):
    sweep_config = runner.load_config(workdir)
  config = _CONFIG.value or sweep_config
  data_config = config.base.data if config is not None and "base" in config else None
  if _CSV.value:
    mapping = parse_pairs(_MAPPING.value, "mapping")
    if not mapping:
      raise ValueError("--mapping is required with --csv (ours:theirs, e.g. 'N:Model Size').")
    rows = csv_import.import_csv(_CSV.value, mapping,
                                 constants=parse_pairs(_CONSTANTS.value, "constants", True))
    data_config = None  # someone else's corpus
  else:
    if sweep_config is None:
      runner.load_config(workdir)  # raises: not a sweep's workdir
    store = store_lib.open_store(sweep_config, workdir, _STORAGE.value)
    rows = store.rows()
    p = store.progress()
    if p["pending"]:
      print(f"note: {p['pending']} of {p['points']} trials are not finished; fitting "
            f"the {len(rows)} that are.", file=sys.stderr)
  if _DROP_HIGHEST.value < 0:
    raise ValueError(f"--drop_highest={_DROP_HIGHEST.value}: must be >= 0.")
  rows = drop_highest(rows, _DROP_HIGHEST.value)
  if not rows:
    raise ValueError(f"--workdir={workdir}: no finished trials to fit.")
  cli.check_workdir(workdir)
  out_dir = _OUT.value or os.path.join(workdir, "report")
  if not _CSV.value and runner.study(config) is not None:  # a study: its own analysis
    runner.analyse(rows, config, out_dir)
    print(f"{config.study}: analysed {len(rows)} rows; report: {out_dir}")
    return
  fitted = runner.fit_and_report(rows, config.fit if config is not None else None, out_dir,
                                 data_config=data_config)
  for family, laws in fitted.items():
    c = laws["counts"]
    fits = [k for k in ("step_law", "chinchilla", "critical_batch", "power_scheduler")
            if k in laws]
    print(f"{family or 'imported'}: {c['rows']} rows ({c['ok']} ok, {c['diverged']} diverged, "
          f"{c['failed']} failed); fitted: {', '.join(fits) or 'none'}")
    if "chinchilla" in laws:
      p = laws["chinchilla"].params
      print(f"  L(N, D) = {p['E']:.4g} + {p['A']:.4g}/N^{p['alpha']:.4f} + "
            f"{p['B']:.4g}/D^{p['beta']:.4f}")
  print(f"report: {out_dir}/report.md")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  sys.exit(cli.run(main))
