"""Multi-host runs on one machine: `launch.local` starts 2 JAX processes x 4 CPU devices.

The processes join through `jax.distributed` (gloo CPU collectives), each loads only its rows
of the batch, both write the checkpoints (orbax), and only process 0 writes metrics. The loss
trajectory equals one process with 8 devices (DESIGN.md's mesh invariant), a run preempted
mid-way resumes from the checkpoint the two processes wrote, a failed process takes the others
down with it, and bad input fails in one line.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import psutil
import pytest

from train import trainer
from launch import local
from tests import testlib

STEPS = 20
VARIANT = f"tiny,num_steps={STEPS},schedule.warmup_steps=5,checkpoint_every=5,log_every=1,eval_every=0"
CONFIG = f"--config=configs/lm.py:{VARIANT},device_peak_flops=1e12"
# Data parallel across the two processes (each loads its half of the batch), tensor and
# sequence (ring attention) parallel inside each.
MESH = ("--config.mesh.data=2", "--config.mesh.tensor=2", "--config.mesh.sequence=2",
        "--config.model.attention=ring")
TIMEOUT_S = 400


def _env(compile_cache=None):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # the launcher sets the device count per process
  if compile_cache:  # a run and its resumption share compiled executables
    env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _launch_argv(workdir, *overrides):
  return [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4",
          f"--log_dir={workdir}/logs", "--", sys.executable, "-m", "train", CONFIG,
          f"--workdir={workdir}", *overrides]


def _launch(workdir, *overrides, env=None):
  proc = subprocess.run(_launch_argv(workdir, *overrides), cwd=testlib.ROOT, env=env or _env(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl (a resumed run logs a few steps twice: same values)."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  out = {}
  for row in rows:
    if row["step"] in out:
      np.testing.assert_allclose(row["loss"], out[row["step"]], rtol=1e-6)
    out[row["step"]] = row["loss"]
  return out


def _flat(tree) -> dict:
  """{'blocks/0/attn/q': array}: checkpoints come back with string keys for list indices."""
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(workdir, step):
  """Params of a checkpoint the two processes wrote, restored onto this process's device."""
  checkpointer = ocp.StandardCheckpointer()
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
  return _flat(checkpointer.restore(path, abstract)["params"])


def _assert_matches(reference, workdir):
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], reference["losses"],
                             rtol=1e-4)
  got = _params(workdir, STEPS)
  assert got.keys() == reference["params"].keys()
  for name, want in reference["params"].items():
    np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def reference():
  """One process with 8 devices (data parallel, dense attention), in-process."""
  config = testlib.tiny_config(VARIANT)
  losses, _, state = testlib.run_steps(config, steps=STEPS)
  return {"losses": losses, "params": _flat(jax.device_get(state["params"]))}


def _wait_for(path, proc, timeout=TIMEOUT_S):
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def _child_with_process_id(launcher, process_id):
  for child in psutil.Process(launcher.pid).children():
    if child.environ().get("JAX_PROCESS_ID") == str(process_id):
      return child
  raise AssertionError(f"no child with JAX_PROCESS_ID={process_id}")


def _steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_preemption(reference, tmp_path):
  """2 x 4 devices as data=2 x tensor=2 x sequence=2 with ring attention, against one
  process on 8 devices with dense attention.

  After the step-5 checkpoint only process 1 gets SIGTERM (a maintenance event on one host):
  both processes agree on a step, write its checkpoint together and exit 0. The relaunch
  resumes from that checkpoint and finishes with the reference's losses and parameters.
  """
  workdir = str(tmp_path / "run")
  env = _env(compile_cache=tmp_path / "jax_cache")
  launcher = subprocess.Popen(_launch_argv(workdir, *MESH), cwd=testlib.ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _wait_for(os.path.join(workdir, "checkpoints", "5"), launcher)
  _child_with_process_id(launcher, 1).send_signal(signal.SIGTERM)
  out, _ = launcher.communicate(timeout=180)
  assert launcher.returncode == 0, out[-4000:]
  assert "SIGTERM: checkpoint written at step" in out
  stopped = _steps(workdir)[-1]
  assert 5 <= stopped < STEPS, _steps(workdir)

  proc = _launch(workdir, *MESH, env=env)
  assert f"resumed from step {stopped}" in proc.stderr
  assert "process 1 of 2 joined" in open(os.path.join(workdir, "logs", "process_1.log")).read()
  _assert_matches(reference, workdir)


def test_coordinator_unreachable_or_peers_missing_is_one_line_exit_2(tmp_path):
  """Process 1 finds nobody at the coordinator's port; process 0 waits for a peer that never
  comes. Both give up after --coordinator_timeout_s=5 with one line, instead of hanging."""
  def start(process_id, port):
    return testlib.popen_cli(
        "train", "--config=configs/lm.py:tiny",
        f"--workdir={tmp_path}/p{process_id}", f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2", f"--process_id={process_id}", "--coordinator_timeout_s=5")
  start_time = time.time()
  procs = {1: start(1, local.free_port()), 0: start(0, local.free_port())}
  outs = {i: p.communicate(timeout=120)[0] for i, p in procs.items()}
  assert time.time() - start_time < 90
  for i, p in procs.items():
    assert p.returncode == 2, outs[i][-3000:]
    errors = [l for l in outs[i].splitlines() if l.startswith("error:")]
    assert len(errors) == 1, outs[i][-3000:]
  assert "could not reach the coordinator at 127.0.0.1:" in outs[1]
  assert "within 5 s" in outs[1]
  assert "not all 2 processes joined the coordinator" in outs[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(seq_len=60, mesh=dict(data=1, fsdp=1, tensor=1, sequence=8)),
     "config.seq_len=60 is not divisible by the sequence axis (config.mesh.sequence=8)"),
    (dict(mesh=dict(data=1, fsdp=1, tensor=8, sequence=1)),
     "config.model.num_heads=2 is not divisible by config.mesh.tensor=8"),
])
def test_bad_mesh_for_the_model_is_one_clear_error(overrides, message):
  config = testlib.tiny_config(**overrides)
  with pytest.raises(ValueError) as e:
    trainer.setup(config)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_launcher_dry_run_prints_each_process_command():
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4",
       "--port=12345", "--dry-run", "--", "python", "-m", "train",
       "--workdir=/tmp/x y"], cwd=testlib.ROOT, env=_env(), capture_output=True, text=True,
      timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert line.startswith("JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 "
                           f"JAX_PROCESS_ID={i} ")
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in line
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in line
    assert line.endswith("python -m train '--workdir=/tmp/x y'")


def test_launcher_kills_the_rest_and_returns_the_failure(tmp_path):
  """Process 1 exits 3, process 2 succeeds, process 0 would sleep for a minute: 3 comes
  back at once. Process 1 fails only once the others have logged (marker files), so a loaded
  machine that starts them late cannot make the launcher kill one before it speaks."""
  script = ("import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); "
            "print('hello from', i, os.environ['XLA_FLAGS'], flush=True); "
            f"mark = lambda j: os.path.join({str(tmp_path)!r}, f'logged_{{j}}'); "
            "open(mark(i), 'w').close(); "
            "t = time.time(); "
            "[time.sleep(0.05) for _ in iter(lambda: i == 1 and time.time() - t < 30 and "
            "not (os.path.exists(mark(0)) and os.path.exists(mark(2))), False)]; "
            "time.sleep(60) if i == 0 else sys.exit(3 if i == 1 else 0)")
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--num_processes=3", "--devices_per_process=2",
       f"--log_dir={tmp_path}", "--", sys.executable, "-c", script], cwd=testlib.ROOT,
      env=_env(), capture_output=True, text=True, timeout=60)
  assert time.time() - start < 45
  assert proc.returncode == 3, proc.stderr
  assert "hello from 0 --xla_force_host_platform_device_count=2" in proc.stdout
  assert "process 1 exited with status 3" in proc.stderr
  assert "process 0 killed after a peer failed" in proc.stderr
  assert "hello from 1" in proc.stderr  # the failed process's log tail
  assert "hello from 2" in open(tmp_path / "process_2.log").read()


def _start_launcher(tmp_path, script):
  launcher = subprocess.Popen(
      [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=1",
       f"--log_dir={tmp_path}", "--", sys.executable, "-c", script], cwd=testlib.ROOT,
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 30
  while len(psutil.Process(launcher.pid).children()) < 2 or not all(
      os.path.exists(tmp_path / f"ready_{i}") for i in range(2)):
    assert time.time() < deadline and launcher.poll() is None
    time.sleep(0.05)
  return launcher


_READY = ("import os, signal, sys, time; i = os.environ['JAX_PROCESS_ID']; {handler}; "
          "open(os.path.join({dir!r}, 'ready_' + i), 'w').close(); time.sleep(60)")


def test_launcher_turns_sigterm_into_sigterm_for_every_process(tmp_path):
  """The processes get SIGTERM (the trainer checkpoints and exits 0): so does the launcher."""
  handler = "signal.signal(signal.SIGTERM, lambda *a: (print('stopping', i), sys.exit(0)))"
  launcher = _start_launcher(tmp_path, _READY.format(handler=handler, dir=str(tmp_path)))
  launcher.send_signal(signal.SIGTERM)
  out, _ = launcher.communicate(timeout=30)
  assert launcher.returncode == 0, out
  assert "stopping 0" in out and "stopping 1" in open(tmp_path / "process_1.log").read()


def test_launcher_second_signal_kills_and_dead_launcher_leaves_no_orphans(tmp_path):
  handler = "signal.signal(signal.SIGTERM, signal.SIG_IGN)"  # a process that will not stop
  launcher = _start_launcher(tmp_path, _READY.format(handler=handler, dir=str(tmp_path)))
  launcher.send_signal(signal.SIGINT)
  time.sleep(1)  # two signals at once may be delivered as one
  launcher.send_signal(signal.SIGINT)
  out, _ = launcher.communicate(timeout=30)
  assert launcher.returncode == 128 + signal.SIGKILL, out
  assert "killing the processes still running (asked twice)" in out

  for name in ("ready_0", "ready_1"):
    os.remove(tmp_path / name)
  launcher = _start_launcher(tmp_path, _READY.format(handler=handler, dir=str(tmp_path)))
  children = psutil.Process(launcher.pid).children()
  launcher.kill()
  launcher.communicate()
  gone, alive = psutil.wait_procs(children, timeout=10)
  assert not alive, alive


def test_launcher_without_a_command_is_an_error():
  assert local.main(["--num_processes=2"]) == 2
