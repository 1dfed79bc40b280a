"""Training faults: SIGKILL at random points, SIGTERM, corrupt checkpoints, failed checkpoint
writes, NaN losses. The training parts of "preemption, crashes, corrupt state and bad input
lose nothing": every scenario ends bitwise equal to one uninterrupted run (CPU).

tests/train/test_resume.py covers all checkpoints unreadable (a clear error);
tests/train/test_adaptive_batch.py a SIGKILL of a run whose batch size adapts.
"""
import dataclasses
import errno
import json
import logging
import math
import os
import random
import re
import signal
import time

import grain
import jax
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import loop
from train import trainer
from tests import testlib
from tests.reliability import conftest as rel

KILLS = 5


def _resumed_from(log_text: str) -> int:
  found = re.findall(r"resumed from step (\d+)", log_text)
  return int(found[-1]) if found else 0


def _rows_mark(workdir):
  """Where a restarted process's rows will begin: (row count, file identity, checkpoint)."""
  path = os.path.join(workdir, "metrics.jsonl")
  inode = os.stat(path).st_ino if os.path.exists(path) else None
  return len(rel.metric_rows(workdir)), inode, max(rel.checkpoint_steps(workdir), default=0)


def _new_rows(workdir, start) -> list[dict]:
  """The rows the process started at `start` (a _rows_mark) has logged. A resume rewrites
  metrics.jsonl without the rows past its checkpoint (a new file): then its rows are those
  past that step; until then, those appended after the mark."""
  count, inode, committed = start
  path = os.path.join(workdir, "metrics.jsonl")
  rows = rel.metric_rows(workdir)
  if inode is not None and os.path.exists(path) and os.stat(path).st_ino != inode:
    return [r for r in rows if r["step"] > committed]
  return rows[count:]


def _logged_steps(log: str) -> list[int]:
  """The steps a training process's log reports (its progress lines, 'step N/TOTAL | ...')."""
  if not os.path.exists(log):
    return []
  with open(log) as f:
    return [int(s) for s in re.findall(r"\bstep (\d+)/\d+ \|", f.read())]


def _saving(workdir) -> bool:
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and any("tmp" in d for d in os.listdir(path))


@pytest.fixture(scope="module")
def kill_chain(reference, cache_env, tmp_path_factory):
  """One run interrupted by 5 SIGKILLs (seeded: one at a random time after launch, usually
  while it starts; three after random steps plus a random delay; one while a checkpoint is
  being written), then a SIGTERM after a random step, then run to the end."""
  rng = random.Random(rel.seed())
  workdir = str(tmp_path_factory.mktemp("killed"))
  logs = tmp_path_factory.mktemp("killed_logs")
  targets = sorted(rng.sample(range(1, rel.STEPS - 4), KILLS - 1))
  mid_save = rng.randrange(KILLS - 1)
  plan = [("time", rng.uniform(0.5, 3.0))]
  plan += [("save" if i == mid_save else "step", t) for i, t in enumerate(targets)]
  kills = []
  for i, (kind, where) in enumerate(plan):
    log = str(logs / f"run{i}.log")
    start_rows = _rows_mark(workdir)
    committed_before = max(rel.checkpoint_steps(workdir), default=0)
    proc = rel.popen_train(workdir, env=cache_env, log=log)
    reached = lambda t=where: any(r["step"] >= t for r in _new_rows(workdir, start_rows))
    if kind == "time":
      time.sleep(where)
    elif kind == "step":
      rel.wait_until(reached, proc, f"step {where}")
      # A random delay, cut short near the end: at ~10 ms a step, 0.3 s could finish the run.
      until = time.time() + rng.uniform(0.0, 0.3)
      near_end = lambda: any(r["step"] >= rel.STEPS - 3 for r in _new_rows(workdir, start_rows))
      while time.time() < until and not near_end():
        time.sleep(0.002)
    else:
      rel.wait_until(lambda: reached() and _saving(workdir), proc, f"a save after step {where}")
    assert proc.poll() is None, f"run {i} ended before its kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max((r["step"] for r in _new_rows(workdir, start_rows)), default=committed_before)
    kills.append(dict(kind=kind, at=where, done=done,
                      committed=max(rel.checkpoint_steps(workdir), default=0), log=log))

  # SIGTERM a few steps after the last kill's step: the grace period is what it takes to
  # finish the step, write the checkpoint and exit.
  target = rng.randint(max(targets) + 1, rel.STEPS - 2)
  log = str(logs / "sigterm.log")
  start_rows = _rows_mark(workdir)
  proc = rel.popen_train(workdir, env=cache_env, log=log)
  # The process's own progress lines say which steps it ran (metrics.jsonl's rows are
  # rewritten by each resume, and a file's identity is not a reliable mark of that).
  rel.wait_until(lambda: max(_logged_steps(log), default=0) >= target, proc, f"step {target}")
  sent = time.perf_counter()
  proc.send_signal(signal.SIGTERM)
  returncode = proc.wait(timeout=300)
  sigterm = dict(at=target, returncode=returncode, seconds=time.perf_counter() - sent,
                 done=max(_logged_steps(log)), committed=max(rel.checkpoint_steps(workdir)),
                 log=log)

  final = rel.train_cli(workdir, env=cache_env)
  # What each restart resumed from: the next process's "resumed from step N".
  next_logs = [open(k["log"]).read() for k in kills[1:]] + [open(log).read()]
  for k, text in zip(kills, next_logs):
    k["resumed"] = _resumed_from(text)
    k["lost"] = k["done"] - k["resumed"]
  sigterm["resumed"] = _resumed_from(final.stderr)
  return dict(workdir=workdir, kills=kills, sigterm=sigterm, final=final)


def test_five_sigkills_then_resume_is_bitwise_exact(reference, kill_chain):
  workdir = kill_chain["workdir"]
  rel.assert_trees_equal(rel.restore_state(reference, rel.STEPS),
                         rel.restore_state(workdir, rel.STEPS))
  # Every step logged, by any of the processes (recomputed ones twice), equals the
  # uninterrupted run's: the data order and the optimizer state survive every kill.
  expected = {r["step"]: r for r in rel.metric_rows(reference)}
  rows = rel.metric_rows(workdir)
  assert {r["step"] for r in rows} == set(expected)
  for row in rows:
    assert row == expected[row["step"]], row["step"]
  kills = kill_chain["kills"]
  rel.record("sigkill", runs=len(kills), survived=len(kills), interval=rel.INTERVAL,
             kills=[{k: v for k, v in kill.items() if k != "log"} for kill in kills],
             recomputed=sum(k["lost"] for k in kills), bitwise=True)


def test_each_restart_resumes_from_the_newest_committed_checkpoint(kill_chain):
  for k in kill_chain["kills"]:
    # Nothing committed is ever lost; what is recomputed is only the steps after it: at most
    # one interval, plus the steps that ran while the newest (asynchronous) save was written.
    assert k["resumed"] == k["committed"], k
    assert 0 <= k["lost"] == k["done"] - k["committed"], k
    assert k["committed"] >= (k["done"] // rel.INTERVAL - 1) * rel.INTERVAL, k
  assert kill_chain["sigterm"]["resumed"] == kill_chain["sigterm"]["committed"]


def test_sigterm_writes_a_checkpoint_within_the_grace_period_and_exits_zero(kill_chain):
  t = kill_chain["sigterm"]
  out = open(t["log"]).read()
  assert t["returncode"] == 0, out[-3000:]
  assert t["seconds"] < 30, t  # TPU VM / GCE spot preemption notice: 30 s
  stopped = re.findall(r"SIGTERM: checkpoint written at step (\d+)", out)
  assert stopped and int(stopped[-1]) == t["done"] == t["committed"], (t, stopped)
  rel.record("sigterm", runs=1, survived=int(t["returncode"] == 0), seconds=t["seconds"],
             at=t["done"], recomputed=t["done"] - t["resumed"])


# ----------------------------------------------------------------------------------------
# Corrupt checkpoints: each garbles the latest (step 20) in one more way.


def _largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


def _flip_array_byte(step_dir):
  """One flipped byte in the array data: orbax has no checksum and would restore it."""
  path = _largest_file(os.path.join(step_dir, "state"))
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def _garble_array_metadata(step_dir):
  path = os.path.join(step_dir, "state", "_METADATA")
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text[:len(text) // 2])


def _shift_data_state(step_dir):
  """The grain iterator state, still valid JSON, one batch off (a flipped digit does it)."""
  path = os.path.join(step_dir, "data", "process_0-of-1.json")
  state = json.load(open(path))
  state["next_index"] += 1
  with open(path, "w") as f:
    json.dump(state, f)


def _truncate_meta(step_dir):
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 3)


@pytest.mark.parametrize("garble", [_flip_array_byte, _garble_array_metadata, _shift_data_state,
                                    _truncate_meta], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(reference, cache_env, tmp_path,
                                                              garble):
  workdir = rel.copy_run(reference, tmp_path / "run", up_to=20)
  garble(os.path.join(workdir, "checkpoints", "20"))
  proc = rel.train_cli(workdir, env=cache_env)
  assert re.search(r"checkpoint at step 20 .* is unreadable", proc.stderr), proc.stderr[-3000:]
  assert "resumed from step 15" in proc.stderr
  assert any(d.startswith("20.unreadable") for d in os.listdir(f"{workdir}/checkpoints"))
  rel.assert_trees_equal(rel.restore_state(reference, rel.STEPS),
                         rel.restore_state(workdir, rel.STEPS))
  rel.record("corrupt", kind=garble.__name__.strip("_"), runs=1, survived=1,
             recomputed=20 - 15, interval=rel.INTERVAL)


# ----------------------------------------------------------------------------------------
# A checkpoint that cannot be written.


def test_failed_checkpoint_write_stops_with_one_line_and_keeps_the_previous(
    reference, cache_env, tmp_path):
  """A real write failure from the kernel in orbax's C++ writer: files are capped at 64 KiB
  (RLIMIT_FSIZE, no privileges needed), so step 25's array data (2.4 MB of params and Adam
  moments in a few OCDBT files, whose sizes vary from run to run) cannot be written, as on a
  full disk; the run's other files stay below the cap. The run stops (exit 3) with one line naming the step, the
  directory and the reason; step 20 stays; re-running on a disk with room resumes exactly."""
  workdir = rel.copy_run(reference, tmp_path / "run", up_to=20)
  proc = rel.train_cli(workdir, env=cache_env, check=False, max_file_kib=64)
  assert proc.returncode == 3, proc.stderr[-3000:]
  # tensorstore's writer threads may still print "Event loop is closed" tracebacks of
  # asyncio's (not ours) after the loop is gone; our own output is the one error line.
  # Their lines can interleave with ours (a traceback's indent before it, "raise ..." after),
  # so the line is taken from where "error:" starts.
  errors = [l[l.index("error:"):] for l in rel.log_lines(proc.stderr)[1] if "error:" in l]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith("error: checkpoint at step 25 could not be written to "
                              f"{workdir}/checkpoints: File too large"), errors
  assert "the last good checkpoint (step 20) is kept" in errors[0]
  assert not rel.traceback_of_ours(proc.stderr)
  assert rel.checkpoint_steps(workdir) == [5, 10, 15, 20]
  rel.assert_trees_equal(rel.restore_state(reference, 20), rel.restore_state(workdir, 20))

  rel.train_cli(workdir, env=cache_env)
  rel.assert_trees_equal(rel.restore_state(reference, rel.STEPS),
                         rel.restore_state(workdir, rel.STEPS))
  rel.record("write_failure", runs=1, survived=1, kind="EFBIG (RLIMIT_FSIZE)",
             recomputed=rel.STEPS - 20)


# ----------------------------------------------------------------------------------------
# In-process: disk full and poisoned batches through loop.train (one compiled Program).


@pytest.fixture(scope="module")
def setup_():
  config = testlib.tiny_config(num_steps=12, schedule=dict(warmup_steps=4), eval_every=0, log_every=1, checkpoint_every=4,
                               keep_checkpoints=20, device_peak_flops=1e12)
  return trainer.setup(config)


def _with(s, **fields):
  config = s.config.copy_and_resolve_references()
  config.update(fields)
  return dataclasses.replace(s, config=config)


def test_disk_full_in_orbax_write_path_is_reported_and_resumes(setup_, tmp_path, monkeypatch):
  """ENOSPC injected where orbax writes the data-iterator file of the second checkpoint."""
  s = _with(setup_, async_checkpointing=True)
  writes = {"n": 0}
  original = grain.checkpoint.CheckpointHandler.save

  def full_disk(self, directory, *args, **kwargs):
    writes["n"] += 1
    if writes["n"] == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full_disk)
  with pytest.raises(ckpt_lib.CheckpointWriteError) as raised:
    loop.train(s.config, str(tmp_path), setup_=s)
  message = str(raised.value)
  assert message.startswith(f"checkpoint at step 8 could not be written to {tmp_path}/")
  assert "No space left on device [errno 28]" in message
  assert "the last good checkpoint (step 4) is kept" in message
  assert rel.checkpoint_steps(tmp_path) == [4]

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", original)
  out = loop.train(s.config, str(tmp_path), setup_=s)
  assert out["status"] == "done" and out["step"] == 12
  rel.record("disk_full", runs=1, survived=1, kind="ENOSPC (injected)", recomputed=8 - 4)


class _Poisoned:
  """A train iterator whose `bad`-th batch (1-based, counted across resumes through the
  grain state) holds token ids past the vocabulary: its loss is NaN."""

  def __init__(self, inner, bad: int):
    self.inner, self.bad = inner, bad

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    if self.inner.get_state()["next_index"] == self.bad:
      batch = dict(batch, tokens=np.full_like(batch["tokens"], 10**6))
    return batch

  def get_state(self):  # grain's checkpoint handler: bytes for non-grain iterators
    return json.dumps(self.inner.get_state()).encode()

  def set_state(self, state):
    self.inner.set_state(json.loads(state))

  def start_prefetch(self):
    self.inner.start_prefetch()


def _poison(s, bad: int):
  make = s.task.train_iterator
  task = dataclasses.replace(s.task,
                             train_iterator=lambda *a, **k: _Poisoned(make(*a, **k), bad))
  return dataclasses.replace(s, task=task)


def test_nan_skip_drops_the_update_and_training_continues(setup_, tmp_path, caplog):
  s = _poison(_with(setup_, nan_policy="skip", checkpoint_every=1, async_checkpointing=False),
              bad=7)
  with caplog.at_level(logging.WARNING):
    out = loop.train(s.config, str(tmp_path), setup_=s)
  assert out["status"] == "done" and out["step"] == 12
  assert any("at step 7" in r.getMessage() and "nan_policy='skip'" in r.getMessage()
             for r in caplog.records)
  rows = {r["step"]: r for r in rel.metric_rows(tmp_path)}
  assert not math.isfinite(rows[7]["loss"])
  assert all(math.isfinite(rows[i]["loss"]) for i in rows if i != 7)
  before, skipped = rel.restore_state(tmp_path, 6), rel.restore_state(tmp_path, 7)
  assert int(skipped["step"]) == 7
  for state in (before, skipped):  # the injected lr records the step's lr, not state
    del state["step"], state["opt_state"]["hyperparams"]
  rel.assert_trees_equal(before, skipped)
  assert rows[12]["loss"] < rows[1]["loss"] - 0.5  # and it went on learning
  rel.record("nan_skip", runs=1, survived=1, kind="poisoned batch, nan_policy=skip",
             recomputed=0)


def test_nan_stop_keeps_the_last_good_checkpoint(setup_, tmp_path):
  s = _poison(_with(setup_, nan_policy="stop"), bad=7)
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 7 .*nan_policy='skip'"):
    loop.train(s.config, str(tmp_path), setup_=s)
  assert rel.checkpoint_steps(tmp_path) == [4]
  c = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  step, state, _ = c.restore(setup_.abstract_state, None)  # verified against its fingerprint
  c.close()
  assert step == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_nan_stop_through_the_cli_is_one_line_exit_3(reference, cache_env, tmp_path):
  """Resumed at step 10 with lr x 1e30: step 11's update blows up the parameters, step 12's
  gradient is NaN. One line names the step and config.nan_policy; step 10 is intact."""
  workdir = rel.copy_run(reference, tmp_path / "run", up_to=10)
  proc = rel.train_cli(workdir, "--config.lr_scale=1e30",
                       "--config.resume_allow_changes=('lr_scale',)", env=cache_env, check=False)
  _, other = rel.log_lines(proc.stderr)
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert len(other) == 1, other
  assert other[0].startswith("error: non-finite loss or gradient at step 12"), other
  assert "config.nan_policy" in other[0]
  assert rel.checkpoint_steps(workdir) == [5, 10]
  state = rel.restore_state(workdir, 10)
  rel.assert_trees_equal(rel.restore_state(reference, 10), state)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  rel.record("nan_stop", runs=1, survived=1, kind="lr x 1e30, nan_policy=stop", recomputed=0)
