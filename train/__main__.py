r"""One training run.

  python -m train --config=configs/lm.py:tiny --workdir=/tmp/lm_tiny

Re-running with the same workdir resumes from its last checkpoint. Multi-host: pass
--coordinator_address/--num_processes/--process_id (or the JAX_* environment variables; TPU
VMs need none). Config errors print one line naming the field and exit with status 2; a run
that stops on a fault (a NaN loss with config.nan_policy='stop', a checkpoint that cannot be
written) prints one line and exits with status 3. SIGTERM checkpoints and exits 0.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py:variant).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_workdir(_WORKDIR.value)
  cli.start_distributed()
  from train import loop  # pylint: disable=g-import-not-at-top  (after distributed init)
  result = loop.train(_CONFIG.value, _WORKDIR.value)
  logging.info("finished: %s", {k: v for k, v in result.items() if not isinstance(v, dict)})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(cli.run(main))
