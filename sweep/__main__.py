r"""A sweep: run its trials, then analyse them (the scaling-law grid: fit the laws, report).

  python -m sweep --config=configs/sweep.py:tiny --workdir=/tmp/sweep

A config that names a study (`config.study`, see sweep/runner.py) runs that study's points
and writes its analysis to report/ instead.

Writes to the workdir: sweep.db (the Optuna trial store), sweep_config.json, trials/<id>/
(each trial's trainer workdir: checkpoints, metrics.jsonl with its eval-loss curve),
jax_cache/ (compiled steps; config.compilation_cache_dir) and report/ (laws.json,
report.md, PNG plots).

Re-running the same command resumes: finished trials are never run again, a trial that was
killed resumes from its checkpoint. Several workers may run the command at once on one store:
on one machine they share the SQLite file; on many machines pass one database to all,
  --storage=postgresql://USER:PASSWORD@HOST/DB
or set BATCHSCALE_STORAGE=postgresql://... in the environment (used when neither --storage nor
config.store.storage is given). The password can come from the URL, from that variable, or
from libpq's ~/.pgpass (or PGPASSWORD) when the URL has none: postgresql://USER@HOST/DB.
It is never logged (shown as ***) nor written to sweep_config.json, which keeps the URL
without its password, so `laws.fit` and a resumed run need the same source again.
Each worker writes its own workdir; trials/<id>/ must then be on a shared file system, e.g.
a gs:// workdir, for a retried trial to resume from its checkpoint. `--nofit` leaves the fit
to `python -m laws.fit`. Config errors print one line and exit with status 2.
"""
from __future__ import annotations

import sys
import warnings

from absl import flags
from absl import logging
from ml_collections import config_flags

from train import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config (sweep.py:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory.")
_STORAGE = flags.DEFINE_string("storage", None, "Optuna storage URL shared by the workers "
                               "(overrides config.store.storage; default sqlite in workdir).")
_LAYOUT = flags.DEFINE_enum("layout", None, ["auto", "sequential", "vectorized", "measure"],
                            "Overrides config.layout.")
_FIT = flags.DEFINE_bool("fit", True, "Fit the laws and write report/ once the grid is done.")
_MAX_TRIALS = flags.DEFINE_integer("max_trials", None, "Stop this worker after this many "
                                   "trials (the rest stay queued).")
cli.define_distributed_flags()  # for --traceback; a sweep runs one worker per host instead


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  cli.check_workdir(_WORKDIR.value)
  if flags.FLAGS.num_processes or flags.FLAGS.coordinator_address:
    raise ValueError("--num_processes/--coordinator_address: a sweep runs one independent "
                     "worker per host on a shared --storage, not one multi-host program.")
  # pylint: disable=g-import-not-at-top  (absl parses flags first; JAX loads after)
  import optuna
  from sweep import runner
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  config = _CONFIG.value
  runner.points(config)  # config errors before anything compiles
  runner.enable_compilation_cache(config, _WORKDIR.value)
  out = runner.run_sweep(config, _WORKDIR.value, storage=_STORAGE.value,
                         layout=_LAYOUT.value, fit=_FIT.value, max_trials=_MAX_TRIALS.value)
  p = out["progress"]
  logging.info("sweep: %d points, %d done, %d failed, %d pending", p["points"], p["done"],
               p["failed"], p["pending"])
  if "laws" in out:
    print(f"report: {out['report']}/report.md")
  elif "report" in out:
    print(f"report: {out['report']}/")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(cli.run(main))
