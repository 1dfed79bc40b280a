"""launch/tpu_vm.py and launch/common.py: the exact gcloud commands, the remote scripts run in a
real bash, validation errors, and the babysit decisions on fake state sequences."""
import importlib.metadata
import os
import shutil
import subprocess
import time

import pytest

from launch import common
from launch import tpu_vm
from launch.tpu_vm import Action
from tests import testlib

WHERE = ["--zone=us-central2-b", "--project=proj"]


def opts(**kw):
  base = dict(name="lm125m", zone="us-central2-b", project="proj", accelerator="v4-32",
              config="configs/lm.py:125m", workdir="gs://bucket/lm125m")
  base.update(kw)
  return tpu_vm.Options(**base)


# --- accelerator names ------------------------------------------------------------------------

@pytest.mark.parametrize("name, chips, topology, devices, image", [
    ("v4-8", 4, "v4:2x2x1", 4, "tpu-ubuntu2204-base"),
    ("v4-32", 16, "v4:2x2x4", 16, "tpu-ubuntu2204-base"),
    ("v5litepod-16", 16, "v5e:4x4", 16, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", 8, "v5e:2x4", 8, "v2-alpha-tpuv5-lite"),
    ("v5p-64", 32, "v5p:2x4x4", 32, "v2-alpha-tpuv5"),
    ("v5p-1024", 512, "v5p:8x8x8", 512, "v2-alpha-tpuv5"),
    ("v6e-8", 8, "v6e:2x4", 8, "v2-alpha-tpuv6e"),
    ("v3-8", 4, "v3:2x2", 8, "tpu-ubuntu2204-base"),
])
def test_accelerator_types(name, chips, topology, devices, image):
  tpu = common.parse_accelerator_type(name)
  assert (tpu.chips, tpu.topology, tpu.num_devices) == (chips, topology, devices)
  assert tpu.accelerator_type == name
  assert tpu_vm.runtime_version(opts(accelerator=name)) == image


@pytest.mark.parametrize("name, hint", [
    ("v4-7", "multiples of 8"), ("v5litepod-12", "sizes 1, 4, 8"), ("v9-8", "unknown TPU"),
    ("v5e-16", "use v5litepod-16"), ("tpu", "GENERATION-COUNT"), ("", "GENERATION-COUNT")])
def test_bad_accelerator_types(name, hint):
  with pytest.raises(ValueError, match=hint):
    common.parse_accelerator_type(name)


def test_jax_pin_is_the_installed_jax_and_libtpu_pin_fits_its_tpu_extra():
  assert common.pinned_version("jax") == importlib.metadata.version("jax")
  libtpu = common.pinned_version("libtpu", os.path.join(common.ROOT, "requirements-tpu.txt"))
  wanted = [r for r in importlib.metadata.requires("jax") if r.startswith("libtpu")
            and 'extra == "tpu"' in r]
  assert wanted, importlib.metadata.requires("jax")
  prefix = wanted[0].split("==")[1].split(";")[0].strip().rstrip("*").rstrip(".")
  assert libtpu.startswith(prefix + "."), (libtpu, wanted)


# --- commands ---------------------------------------------------------------------------------

def test_create_tpu_vm_spot_and_preemptible():
  assert tpu_vm.create_commands(opts(spot=True)) == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "lm125m", "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base", *WHERE, "--spot"]]
  assert tpu_vm.create_commands(opts(preemptible=True))[0][-1] == "--preemptible"
  assert "--spot" not in tpu_vm.create_commands(opts())[0]


def test_create_and_delete_queued_resource():
  o = opts(queued=True, spot=True, accelerator="v5litepod-16")
  assert tpu_vm.create_commands(o) == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "lm125m", "--node-id=lm125m",
      "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", *WHERE,
      "--spot"]]
  assert tpu_vm.delete_commands(o) == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "lm125m", "--force", "--quiet",
      *WHERE]]
  assert tpu_vm.describe_command(o)[-3] == "--format=value(state.state)"
  assert tpu_vm.describe_command(opts())[5:] == ["lm125m", "--format=value(state)", *WHERE]


def test_copy_tarball_to_all_workers():
  pack, scp, unpack = tpu_vm.copy_commands(opts(), root="/src/batchscale")
  assert pack[:2] == ["bash", "-c"]
  assert pack[2].startswith("cd /src/batchscale && git ls-files -z --cached --others "
                            "--exclude-standard | tar")
  assert "/tmp/batchscale-lm125m.tar.gz" in pack[2]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/batchscale-lm125m.tar.gz",
                 "lm125m:batchscale.tar.gz", "--worker=all", *WHERE]
  assert unpack[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm125m", "--worker=all"]
  assert unpack[7] == ("--command=rm -rf $HOME/batchscale && mkdir -p $HOME/batchscale && "
                       "tar -xzf $HOME/batchscale.tar.gz -C $HOME/batchscale")


def test_pack_holds_the_checkout_without_git_or_ignored_files():
  o = opts(name=f"packtest{os.getpid()}")
  pack = tpu_vm.copy_commands(o)[0]
  try:
    assert subprocess.run(pack, cwd="/", timeout=120).returncode == 0
    listing = subprocess.run(["tar", "-tzf", tpu_vm.tarball_path(o)], capture_output=True,
                             text=True, check=True).stdout.split()
  finally:
    if os.path.exists(tpu_vm.tarball_path(o)):
      os.remove(tpu_vm.tarball_path(o))
  assert {"requirements.txt", "requirements-tpu.txt", "launch/tpu_vm.py"} <= set(listing)
  assert not any(name.startswith(".git/") or "__pycache__" in name for name in listing)


def test_copy_by_git_clone():
  (clone,) = tpu_vm.copy_commands(opts(git_url="https://github.com/x/batchscale", git_ref="v1"))
  assert "--worker=all" in clone
  assert clone[7] == ("--command=rm -rf $HOME/batchscale && git clone --quiet "
                      "https://github.com/x/batchscale $HOME/batchscale && "
                      "git -C $HOME/batchscale checkout --quiet v1")


def test_install_pins_tpu_jax_to_the_requirements():
  (install,) = tpu_vm.install_commands(opts())
  assert install[5:7] == ["lm125m", "--worker=all"]
  script = install[7]
  assert "uv venv --seed --python 3.11 $HOME/batchscale-venv" in script
  version = common.pinned_version("jax")
  assert script.endswith("$HOME/batchscale-venv/bin/python -m pip install --quiet -r "
                         f'requirements.txt -r requirements-tpu.txt "jax[tpu]=={version}"')


def test_start_runs_on_all_workers_under_nohup_with_a_log():
  (start,) = tpu_vm.start_commands(opts(args=("--config.num_steps=100",)))
  assert start[5:7] == ["lm125m", "--worker=all"]
  script = start[7]
  assert "export TPU_WORKER_HOSTNAMES=$H" in script and "export TPU_WORKER_ID=$W" in script
  assert ("nohup bash -c '$HOME/batchscale-venv/bin/python -m train "
          "--config=configs/lm.py:125m --workdir=gs://bucket/lm125m "
          "--config.num_steps=100 & echo") in script
  assert script.endswith("> $HOME/batchscale-run/train.log 2>&1 < /dev/null &")
  sweep = tpu_vm.start_commands(opts(job="sweep"))[0][7]
  assert "-m sweep" in sweep and "batchscale-run/sweep.log" in sweep


def _bash(script, home, env=None):
  return subprocess.run(["bash", "-c", script], env=dict(os.environ, HOME=str(home), **(env or {})),
                        capture_output=True, text=True, timeout=60)


def _wait_for(path, timeout=20.0):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)
  time.sleep(0.05)


def test_remote_scripts_in_bash(tmp_path):
  """start/status/stop as a worker's shell runs them, with a fake venv python and metadata."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  fake_python = venv / "bin" / "python"
  fake_python.write_text("#!/bin/bash\n"
                         'echo "args: $*"; echo "hosts=$TPU_WORKER_HOSTNAMES id=$TPU_WORKER_ID"\n'
                         '[ -n "$FAKE_SLEEP" ] && exec sleep "$FAKE_SLEEP"; exit ${FAKE_EXIT:-0}\n')
  fake_python.chmod(0o755)
  (tmp_path / "code").mkdir()
  metadata = tmp_path / "metadata"
  metadata.mkdir()
  (metadata / "agent-worker-number").write_text("1")
  (metadata / "worker-network-endpoints").write_text("w-0:x:10.0.0.1,w-1:x:10.0.0.2")
  o = opts(code_dir=str(tmp_path / "code"), venv_dir=str(venv), run_dir=str(tmp_path / "run"),
           metadata_url=f"file://{metadata}", args=("--config.num_steps=3",))
  start, status, stop = (tpu_vm.start_commands(o)[0][7].removeprefix("--command="),
                         tpu_vm.status_command(o)[7].removeprefix("--command="),
                         tpu_vm.stop_commands(o)[0][7].removeprefix("--command="))
  run = tmp_path / "run"

  assert tpu_vm.job_state(0, _bash(status, tmp_path).stdout) == "none"
  assert _bash(start, tmp_path).returncode == 0
  _wait_for(run / "exit_code")
  log = (run / "train.log").read_text()
  assert ("args: -m train --config=configs/lm.py:125m "
          "--workdir=gs://bucket/lm125m --config.num_steps=3") in log
  if shutil.which("curl"):
    assert "hosts=10.0.0.1,10.0.0.2 id=1" in log
  assert tpu_vm.job_state(0, _bash(status, tmp_path).stdout) == "done"

  (run / "exit_code").unlink()
  assert _bash(start, tmp_path, {"FAKE_EXIT": "3"}).returncode == 0
  _wait_for(run / "exit_code")
  assert tpu_vm.job_state(0, _bash(status, tmp_path).stdout) == "failed"

  assert _bash(start, tmp_path, {"FAKE_SLEEP": "30"}).returncode == 0
  _wait_for(run / "pid")
  assert tpu_vm.job_state(0, _bash(status, tmp_path).stdout) == "running"
  again = _bash(start, tmp_path)
  assert again.returncode == 3 and "already running" in again.stderr
  assert _bash(stop, tmp_path).returncode == 0
  _wait_for(run / "exit_code")
  assert (run / "exit_code").read_text().strip() == "143"  # SIGTERM
  assert tpu_vm.job_state(0, _bash(status, tmp_path).stdout) == "failed"


# --- validation and the CLI -------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(zone=""), "--zone is required"),
    (dict(project=""), "--project is required"),
    (dict(accelerator=""), "--accelerator is required"),
    (dict(accelerator="v5e-8"), "use v5litepod-8"),
    (dict(name="Bad_Name"), "--name='Bad_Name'"),
    (dict(spot=True, preemptible=True), "exclude each other"),
    (dict(queued=True, preemptible=True), "use --spot"),
    (dict(config=""), "--config is required"),
    (dict(workdir="/tmp/local"), "gs:// workdir"),
])
def test_validation(change, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    tpu_vm.validate(opts(**change), "babysit")


def test_accelerator_is_not_needed_to_copy_or_run():
  tpu_vm.validate(opts(accelerator=""), "copy")
  tpu_vm.validate(opts(accelerator="", workdir="/tmp/w"), "run")


@pytest.mark.parametrize("flag, message", [
    ("--zone=", "error: --zone is required"),
    ("--project=", "error: --project is required"),
    ("--accelerator=", "error: --accelerator is required"),
    ("--accelerator=v5p-63", "error: accelerator 'v5p-63'"),
])
def test_cli_errors_are_one_line_exit_2(flag, message):
  args = ["--name=lm125m", "--zone=us-central2-b", "--project=proj", "--accelerator=v5p-64",
          "--config=configs/lm.py:125m", "--workdir=gs://b/w", "--dry-run"]
  args = [a for a in args if a.split("=")[0] != flag.split("=")[0]] + [flag]
  proc = testlib.run_cli("launch.tpu_vm", "create", *args, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith(message), proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert proc.stdout == ""


def test_cli_dry_run_up_prints_every_step_and_runs_nothing():
  name = f"dryrun{os.getpid()}"
  proc = testlib.run_cli(
      "launch.tpu_vm", "up", f"--name={name}", "--zone=europe-west4-b", "--project=proj",
      "--accelerator=v5p-64", "--queued", "--spot", "--gcloud=/nonexistent/gcloud",
      "--config=configs/lm.py:125m", "--workdir=gs://b/w", "--dry-run", "--",
      "--config.num_steps=10", timeout=120)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout.splitlines()
  commands = [line for line in out if not line.startswith("#")]
  where = "--zone=europe-west4-b --project=proj"
  assert (f"/nonexistent/gcloud compute tpus queued-resources create {name} --node-id={name} "
          "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 "
          f"{where} --spot") in commands
  assert any(c.startswith(f"/nonexistent/gcloud compute tpus tpu-vm scp "
                          f"/tmp/batchscale-{name}.tar.gz {name}:batchscale.tar.gz "
                          "--worker=all") for c in commands)
  assert any("requirements-tpu.txt" in c and "--worker=all" in c for c in commands)
  assert any("nohup" in c and "--config.num_steps=10" in c and "--worker=all" in c
             for c in commands)
  assert not os.path.exists(f"/tmp/batchscale-{name}.tar.gz")  # the tar never ran


def test_cli_dry_run_babysit_prints_the_loop():
  proc = testlib.run_cli(
      "launch.tpu_vm", "babysit", "--name=lm", "--zone=z", "--project=p", "--accelerator=v4-8",
      "--spot", "--config=c.py", "--workdir=gs://b/w", "--poll_s=30", "--max_restarts=3",
      "--dry-run", timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "# every 30 s:" in proc.stdout
  assert "gcloud compute tpus tpu-vm delete lm --quiet --zone=z --project=p" in proc.stdout
  assert "after 3 restarts" in proc.stdout


# --- babysitting ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, state", [
    ((0, "READY\n", ""), "READY"), ((0, "PREEMPTED\n", ""), "PREEMPTED"),
    ((1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found"),
     "MISSING"),
    ((1, "", "ERROR: network unreachable"), "UNKNOWN"), ((0, "\n", ""), "UNKNOWN")])
def test_vm_state(raw, state):
  assert tpu_vm.vm_state(*raw) == state


@pytest.mark.parametrize("raw, state", [
    ((0, "running\n"), "running"), ((0, "exit:0\n"), "done"), ((0, "exit:137\n"), "failed"),
    ((0, "none\n"), "none"), ((255, ""), "unknown"), ((0, "Warning: x\nrunning\n"), "running")])
def test_job_state(raw, state):
  assert tpu_vm.job_state(*raw) == state


A = Action
PREEMPTION_STORY = [
    ("MISSING", "-"), ("CREATING", "-"), ("READY", "none"), ("READY", "running"),
    ("PREEMPTED", "-"), ("CREATING", "-"), ("READY", "none"), ("READY", "running"),
    ("READY", "done"), ("READY", "done")]


def test_plan_recreates_after_preemption_and_stops_when_done():
  assert tpu_vm.plan(PREEMPTION_STORY, max_restarts=5) == [
      A.CREATE, A.WAIT, A.START, A.WAIT, A.RECREATE, A.WAIT, A.START, A.WAIT, A.WAIT, A.DONE]


def test_plan_bounded_retries():
  failing = [("READY", "none"), ("READY", "failed"), ("READY", "failed"), ("READY", "failed")]
  assert tpu_vm.plan(failing, max_restarts=1) == [A.START, A.RESTART, A.GIVE_UP]
  preempted = [("READY", "none"), ("TERMINATED", "-")]
  assert tpu_vm.plan(preempted, max_restarts=0) == [A.START, A.GIVE_UP]
  gone = [("READY", "none"), ("MISSING", "-"), ("READY", "none"), ("MISSING", "-")]
  assert tpu_vm.plan(gone, max_restarts=1) == [A.START, A.CREATE, A.START, A.GIVE_UP]


def test_plan_exit_0_then_preempted_is_not_done():
  story = [("READY", "none"), ("READY", "done"), ("PREEMPTED", "-"), ("READY", "none")]
  assert tpu_vm.plan(story, max_restarts=2) == [A.START, A.WAIT, A.RECREATE, A.START]


def test_plan_queued_resource_states_and_failed_queries():
  story = [("ACCEPTED", "-"), ("WAITING_FOR_RESOURCES", "-"), ("PROVISIONING", "-"),
           ("ACTIVE", "none"), ("ACTIVE", "unknown"), ("UNKNOWN", "-"), ("SUSPENDED", "-"),
           ("FAILED", "-")]
  assert tpu_vm.plan(story, max_restarts=3) == [
      A.WAIT, A.WAIT, A.WAIT, A.START, A.WAIT, A.WAIT, A.RECREATE, A.RECREATE]


class RecordingRunner(common.Runner):
  def __init__(self, fail_on=None):
    super().__init__(dry_run=False, out=open(os.devnull, "w"))
    self.commands, self.fail_on = [], fail_on

  def run(self, commands):
    for command in commands:
      self.commands.append(common.format_command(command))
      if self.fail_on and self.fail_on in self.commands[-1]:
        self.fail_on = None
        raise common.CommandFailed(command, 255)


def _verbs(commands):
  """'tpu-vm create', 'ssh:install', ... for reading a command log."""
  out = []
  for c in commands:
    if c.startswith("bash -c"):
      out.append("pack")
    elif " ssh " in c:
      out.append("ssh:" + ("install" if "pip install" in c else "start" if "nohup" in c
                           else "unpack"))
    else:
      out.append(" ".join(c.split()[3:5]))
  return out


def test_babysit_loop_runs_the_recovery_commands():
  runner, sleeps, observations = RecordingRunner(), [], iter(PREEMPTION_STORY)
  code = tpu_vm.babysit(opts(spot=True, poll_s=7), runner, observe_fn=lambda: next(observations),
                        sleep=sleeps.append, log=lambda _: None)
  assert code == 0
  start = ["pack", "tpu-vm scp", "ssh:unpack", "ssh:install", "ssh:start"]
  assert _verbs(runner.commands) == (["tpu-vm create"] + start + ["tpu-vm delete", "tpu-vm create"]
                                     + start)
  assert sleeps == [7] * (len(PREEMPTION_STORY) - 1)


def test_babysit_survives_a_failed_command_and_gives_up_when_spent():
  runner = RecordingRunner(fail_on="pip install")
  story = iter([("READY", "none"), ("READY", "none"), ("READY", "failed"), ("READY", "failed")])
  logs = []
  code = tpu_vm.babysit(opts(max_restarts=2), runner, observe_fn=lambda: next(story),
                        sleep=lambda _: None, log=logs.append)
  assert code == 1
  assert _verbs(runner.commands).count("ssh:start") == 2  # the failed install skipped one start
  assert any("giving up" in line for line in logs)


def test_up_returns_once_started():
  runner = RecordingRunner()
  story = iter([("MISSING", "-"), ("READY", "none"), ("READY", "running")])
  assert tpu_vm.babysit(opts(), runner, observe_fn=lambda: next(story), sleep=lambda _: None,
                        log=lambda _: None, until_started=True) == 0
  assert _verbs(runner.commands)[-1] == "ssh:start"
  assert next(story) == ("READY", "running")  # it did not poll again
