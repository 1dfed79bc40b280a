"""TensorBoard events and metrics.jsonl after a SIGKILL and a resume: every logged step once.

A killed process has logged steps past its last checkpoint S; the resumed process logs them
again. MetricsLogger(resume_step=S) drops them from metrics.jsonl and opens the event writer
with purge_step=S+1 (TensorBoard discards the old events from S+1 on); events are flushed
at every write, so none is lost to the kill.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

from tests import testlib
from tests.reliability import conftest as rel

STEPS = 60
CONFIG = (f"--config=configs/lm.py:tiny,num_steps={STEPS},checkpoint_every=4,"
          "log_every=1,eval_every=20")
WARMUP = "--config.schedule.warmup_steps=4"


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _events(workdir):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_sigkill_and_resume_log_each_step_once(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "train", CONFIG, WARMUP,
                             f"--workdir={workdir}"], cwd=testlib.ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
      logged = lambda: max((r["step"] for r in rel.metric_rows(workdir)), default=0)
      rel.wait_until(lambda: 8 in rel.checkpoint_steps(workdir) and logged() >= 10, proc,
                     "checkpoint 8 and step 10", poll=0.01)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  committed = max(rel.checkpoint_steps(workdir))
  if logged() <= committed:  # killed right at a save: resume from the one before instead
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(committed)))
    committed = max(rel.checkpoint_steps(workdir))
  assert logged() > committed and committed < STEPS
  # What the kill left: the steps past the checkpoint are in the events (flushed at once;
  # the kill may fall between a row's metrics.jsonl line and its events).
  before = [e.step for e in _events(workdir).Scalars("train/loss")]
  assert before == list(range(1, len(before) + 1)) and len(before) >= logged() - 1

  proc = testlib.run_cli("train", CONFIG, WARMUP, f"--workdir={workdir}", check=True)
  assert f"resumed from step {committed}" in proc.stderr

  steps = [r["step"] for r in _rows(workdir)]
  assert steps == list(range(1, STEPS + 1))
  acc = _events(workdir)
  tags = acc.Tags()["scalars"]
  assert "train/loss" in tags and "train/lr" in tags and "eval/loss" in tags, tags
  assert not any("/" not in t for t in tags), tags
  assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
  assert [e.step for e in acc.Scalars("eval/loss")] == [20, 40, 60]
  by_step = {r["step"]: r["loss"] for r in _rows(workdir)}
  for e in acc.Scalars("train/loss"):
    assert abs(e.value - by_step[e.step]) <= 1e-6 * max(1.0, abs(by_step[e.step]))
