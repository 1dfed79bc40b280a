"""Adaptive batch size in the trainer: growth, noise-scale logging, exact resume."""
import json
import os
import signal

import jax
import numpy as np

from tests import testlib
from tests.reliability import conftest as rel

ADAPTIVE = ("--config=configs/lm.py:tiny,num_steps=30,schedule.warmup_steps=10,checkpoint_every=10,"
            "log_every=1,eval_every=0,micro_batch_size=8,global_batch_size=8")
FLAGS = ("--config.batch_size.controller=norm_test", "--config.batch_size.adaptive.eta=0.3",
         "--config.batch_size.max_batch_size=96")


def _batch_sizes(workdir):
  rows = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    rows[row["step"]] = row["batch_size"]
  return [rows[k] for k in sorted(rows)]


def test_norm_test_grows_batch_and_resumes_exactly(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  testlib.run_cli("train", ADAPTIVE, *FLAGS, f"--workdir={straight}", check=True)
  sizes = _batch_sizes(straight)
  assert sizes[0] == 8 and sizes[-1] > 8, sizes
  assert all(b >= a for a, b in zip(sizes, sizes[1:])), "the batch never shrinks"
  assert all(b % 8 == 0 for b in sizes)

  proc = testlib.popen_cli("train", ADAPTIVE, *FLAGS, f"--workdir={resumed}")
  rel.wait_until(lambda: 20 in rel.checkpoint_steps(resumed), proc, "checkpoint 20", poll=0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  testlib.run_cli("train", ADAPTIVE, *FLAGS, f"--workdir={resumed}", check=True)
  assert _batch_sizes(resumed) == sizes
  rel.assert_trees_equal(rel.restore_state(straight, 30)["params"],
                         rel.restore_state(resumed, 30)["params"])


def test_fixed_batch_with_micro_batches_logs_noise_scale():
  config = testlib.tiny_config(micro_batch_size=4, mesh=dict(data=1, fsdp=1, tensor=1,
                                                             sequence=1))
  config.batch_size.noise_scale.decay = 0.5
  _, s, state = testlib.run_steps(config, num_devices=1, steps=6)
  assert s.num_microbatches == 4 and not s.adaptive
  b_simple = float(jax.device_get(
      state["control"].noise.trace_ema / state["control"].noise.sq_norm_ema))
  assert np.isfinite(b_simple) and b_simple > 0
