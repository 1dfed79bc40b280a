r"""Cloud TPU VMs: create, copy the code, install, run on every worker, babysit preemptions.

  python -m launch.tpu_vm up --name=lm125m --zone=us-central2-b --project=PROJECT \
      --accelerator=v4-32 --spot --config=configs/lm.py:125m \
      --workdir=gs://BUCKET/lm125m -- --config.data.spm_model=gs://BUCKET/c4_32k.model

Subcommands: create, delete, copy, install, run, stop, status, logs, up (create, wait until
ready, copy, install, run) and babysit (up, then keep it alive). Arguments after `--` go to
`train` (or `sweep` with --job=sweep). `--dry-run` prints the exact
commands and runs nothing. Missing or bad --zone/--project/--accelerator exit 2 in one line.

On the workers: the code lives in ~/batchscale, a Python 3.11 venv in ~/batchscale-venv (made with
uv: the Ubuntu 22.04 TPU VM images have Python 3.10, and jax 0.10 needs 3.11), and the job runs under
nohup with its log, pid and exit code in ~/batchscale-run. `sharding.mesh.initialize_distributed`
calls `jax.distributed.initialize()` only when TPU_WORKER_HOSTNAMES lists several hosts, so the
run command exports TPU_WORKER_ID and TPU_WORKER_HOSTNAMES from the VM's metadata server (the
same values JAX's own TPU cluster detection reads); a single-host slice gets one host and no
distributed start.

babysit polls the VM (or queued resource) every --poll_s, recreates it when it is preempted,
terminated or gone, copies, installs and restarts the same command with the same workdir, so
training resumes from its last checkpoint (use a gs:// workdir: a recreated VM has a new disk).
It stops when the job exits 0, or after --max_restarts restarts.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import shlex
import sys
import time
from typing import Callable, Sequence

from launch import common

SUBCOMMANDS = ("create", "delete", "copy", "install", "run", "stop", "status", "logs", "up",
               "babysit")
JOBS = {"train": "train", "sweep": "sweep"}
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"


@dataclasses.dataclass(frozen=True)
class Options:
  """Where the TPU is and what runs on it (the flags, as data)."""
  name: str
  zone: str = ""
  project: str = ""
  accelerator: str = ""  # gcloud accelerator type: v4-8, v5litepod-16, v5p-64, v6e-8
  runtime_version: str = ""  # '' = the generation's usual TPU VM image
  spot: bool = False
  preemptible: bool = False
  queued: bool = False  # a queued resource (waits for capacity) instead of a plain TPU VM
  git_url: str = ""  # '' = copy this checkout as a tarball
  git_ref: str = ""
  job: str = "train"
  config: str = ""
  workdir: str = ""
  args: tuple = ()  # passed on to train / sweep
  jax_version: str = ""  # '' = the jax pin in requirements.txt
  python_version: str = "3.11"
  code_dir: str = "$HOME/batchscale"
  venv_dir: str = "$HOME/batchscale-venv"
  run_dir: str = "$HOME/batchscale-run"
  gcloud: str = "gcloud"
  metadata_url: str = _METADATA  # the workers' GCE metadata (tests point it at files)
  max_restarts: int = 10
  poll_s: float = 60.0

  @property
  def log_file(self) -> str:
    return f"{self.run_dir}/{self.job}.log"


def validate(opts: Options, subcommand: str) -> None:
  """Raises ValueError with one line naming the flag when the options can't work."""
  if subcommand not in SUBCOMMANDS:
    raise ValueError(f"unknown subcommand {subcommand!r}; valid: {', '.join(SUBCOMMANDS)}.")
  if not opts.name:
    raise ValueError("--name is required (the TPU VM's name, e.g. --name=lm125m).")
  if not _NAME.fullmatch(opts.name):
    raise ValueError(f"--name={opts.name!r}: use lowercase letters, digits and hyphens, "
                     "starting with a letter (at most 63).")
  if not opts.zone:
    raise ValueError("--zone is required (a zone with TPU capacity, e.g. --zone=us-central2-b).")
  if not opts.project:
    raise ValueError("--project is required (the Google Cloud project id).")
  if subcommand in ("create", "up", "babysit"):
    if not opts.accelerator:
      raise ValueError(f"--accelerator is required for {subcommand} (e.g. {common.EXAMPLES}).")
    common.parse_accelerator_type(opts.accelerator)
    if opts.spot and opts.preemptible:
      raise ValueError("--spot and --preemptible exclude each other; pick one (spot is newer).")
    if opts.queued and opts.preemptible:
      raise ValueError("--preemptible is not available for queued resources; use --spot.")
  if subcommand in ("run", "up", "babysit"):
    if opts.job not in JOBS:
      raise ValueError(f"--job={opts.job!r}: valid are {', '.join(JOBS)}.")
    if not opts.config:
      raise ValueError("--config is required (e.g. --config=configs/lm.py:125m).")
    if not opts.workdir:
      raise ValueError("--workdir is required (a gs:// path every worker can reach).")
  if subcommand == "babysit" and not opts.workdir.startswith("gs://"):
    raise ValueError(f"--workdir={opts.workdir}: babysit recreates the VM, whose disk is lost "
                     "with it; resuming needs a gs:// workdir.")
  if opts.args and subcommand not in ("run", "up", "babysit"):
    raise ValueError(f"{subcommand} takes no arguments after '--' (got {list(opts.args)}).")
  if opts.max_restarts < 0 or opts.poll_s < 0:
    raise ValueError("--max_restarts and --poll_s must be >= 0.")


# ----------------------------------------------------------------------------------------------
# Commands: each function returns argv lists and runs nothing.


def _where(opts: Options) -> list[str]:
  return [f"--zone={opts.zone}", f"--project={opts.project}"]


def _tpu_vm(opts: Options, verb: str, *args: str) -> list[str]:
  return [opts.gcloud, "compute", "tpus", "tpu-vm", verb, *args, *_where(opts)]


def _queued(opts: Options, verb: str, *args: str) -> list[str]:
  return [opts.gcloud, "compute", "tpus", "queued-resources", verb, *args, *_where(opts)]


def ssh(opts: Options, script: str, worker: str = "all") -> list[str]:
  return _tpu_vm(opts, "ssh", opts.name, f"--worker={worker}", f"--command={script}")


def runtime_version(opts: Options) -> str:
  if opts.runtime_version:
    return opts.runtime_version
  return common.parse_accelerator_type(opts.accelerator).gen.runtime_version


def create_commands(opts: Options) -> list[list[str]]:
  accel = f"--accelerator-type={opts.accelerator}"
  if opts.queued:
    cmd = _queued(opts, "create", opts.name, f"--node-id={opts.name}", accel,
                  f"--runtime-version={runtime_version(opts)}")
  else:
    cmd = _tpu_vm(opts, "create", opts.name, accel, f"--version={runtime_version(opts)}")
  if opts.spot:
    cmd.append("--spot")
  if opts.preemptible:
    cmd.append("--preemptible")
  return [cmd]


def delete_commands(opts: Options) -> list[list[str]]:
  if opts.queued:  # --force deletes the TPU VM the queued resource holds, too
    return [_queued(opts, "delete", opts.name, "--force", "--quiet")]
  return [_tpu_vm(opts, "delete", opts.name, "--quiet")]


def describe_command(opts: Options) -> list[str]:
  if opts.queued:
    return _queued(opts, "describe", opts.name, "--format=value(state.state)")
  return _tpu_vm(opts, "describe", opts.name, "--format=value(state)")


def tarball_path(opts: Options) -> str:
  return f"/tmp/batchscale-{opts.name}.tar.gz"


def copy_commands(opts: Options, root: str = common.ROOT) -> list[list[str]]:
  """The code onto every worker: a tarball of this checkout (tracked and untracked files that
  git does not ignore), or a clone of --git_url."""
  if opts.git_url:
    script = (f"rm -rf {opts.code_dir} && git clone --quiet {shlex.quote(opts.git_url)} "
              f"{opts.code_dir}")
    if opts.git_ref:
      script += f" && git -C {opts.code_dir} checkout --quiet {shlex.quote(opts.git_ref)}"
    return [ssh(opts, script)]
  tarball = tarball_path(opts)
  pack = (f"cd {shlex.quote(root)} && git ls-files -z --cached --others --exclude-standard | "
          f"tar --null --ignore-failed-read -czf {tarball} -T -")
  unpack = (f"rm -rf {opts.code_dir} && mkdir -p {opts.code_dir} && "
            f"tar -xzf $HOME/batchscale.tar.gz -C {opts.code_dir}")
  return [["bash", "-c", pack],
          _tpu_vm(opts, "scp", tarball, f"{opts.name}:batchscale.tar.gz", "--worker=all"),
          ssh(opts, unpack)]


def install_commands(opts: Options) -> list[list[str]]:
  """Python 3.11 venv (uv fetches the interpreter), then the pinned requirements + TPU JAX."""
  jax_version = opts.jax_version or common.pinned_version("jax")
  venv_python = f"{opts.venv_dir}/bin/python"
  script = (
      "set -e; python3 -m pip install --user --quiet uv; "
      f"[ -x {venv_python} ] || $HOME/.local/bin/uv venv --seed --python {opts.python_version} "
      f"{opts.venv_dir}; cd {opts.code_dir}; "
      f"{venv_python} -m pip install --quiet -r requirements.txt -r requirements-tpu.txt "
      f'"jax[tpu]=={jax_version}"')
  return [ssh(opts, script)]


def job_command(opts: Options) -> str:
  """The training (or sweep) command line every worker runs, from the code directory."""
  argv = [f"{opts.venv_dir}/bin/python", "-m", JOBS[opts.job], f"--config={opts.config}",
          f"--workdir={opts.workdir}", *opts.args]
  return " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]])


def start_commands(opts: Options) -> list[list[str]]:
  """Starts the job on every worker at once, detached (nohup), logging to run_dir."""
  run = opts.run_dir
  # The python process's pid (for status and stop) and its exit code (for babysit).
  inner = f"{job_command(opts)} & echo $! > {run}/pid; wait $!; echo $? > {run}/exit_code"
  script = (
      f"mkdir -p {run}; "
      f'if [ -f {run}/pid ] && kill -0 "$(cat {run}/pid)" 2>/dev/null; then '
      f'echo "batchscale: already running as pid $(cat {run}/pid) on $(hostname)" >&2; exit 3; fi; '
      f"rm -f {run}/pid {run}/exit_code; cd {opts.code_dir}; "
      f"W=$(curl -sf -H Metadata-Flavor:Google {opts.metadata_url}/agent-worker-number) && "
      "export TPU_WORKER_ID=$W; "
      f"H=$(curl -sf -H Metadata-Flavor:Google {opts.metadata_url}/worker-network-endpoints | "
      'tr , "\\n" | awk -F: "{print \\$NF}" | paste -sd, -) && [ -n "$H" ] && '
      "export TPU_WORKER_HOSTNAMES=$H; "
      f"nohup bash -c {shlex.quote(inner)} > {opts.log_file} 2>&1 < /dev/null &")
  return [ssh(opts, script)]


def status_command(opts: Options) -> list[str]:
  """Prints running | exit:N | none for the job on worker 0."""
  run = opts.run_dir
  script = (f"if [ -f {run}/exit_code ]; then echo exit:$(cat {run}/exit_code); "
            f'elif [ -f {run}/pid ] && kill -0 "$(cat {run}/pid)" 2>/dev/null; then echo running; '
            "else echo none; fi")
  return ssh(opts, script, worker="0")


def stop_commands(opts: Options) -> list[list[str]]:
  """SIGTERM on every worker: the trainer writes a checkpoint and exits."""
  run = opts.run_dir
  return [ssh(opts, f'[ -f {run}/pid ] && kill -TERM "$(cat {run}/pid)" 2>/dev/null; true')]


def logs_command(opts: Options, worker: str = "0", lines: int = 100) -> list[str]:
  return ssh(opts, f"tail -n {lines} {opts.log_file}", worker=worker)


# ----------------------------------------------------------------------------------------------
# Babysitting: a pure decision from what was observed, and a loop around it.

READY = frozenset({"READY", "ACTIVE"})  # TPU VM / queued resource
DEAD = frozenset({"PREEMPTED", "TERMINATED", "STOPPED", "FAILED", "SUSPENDED"})
MISSING = "MISSING"
UNKNOWN = "UNKNOWN"


class Action(enum.Enum):
  WAIT = "wait"  # changing state, job running, or a query failed: poll again
  CREATE = "create"  # no VM: create it
  RECREATE = "recreate"  # preempted / terminated / failed: delete, create
  START = "start"  # ready and the job never ran on this VM: copy, install, start
  RESTART = "restart"  # the job exited non-zero: start it again (resumes)
  DONE = "done"  # the job exited 0
  GIVE_UP = "give_up"  # --max_restarts spent


@dataclasses.dataclass(frozen=True)
class Memory:
  """What the decisions carry from one poll to the next."""
  starts: int = 0  # times the job was started: the first start and every restart
  done_seen: int = 0  # consecutive polls that saw the job exit 0


def vm_state(returncode: int, stdout: str, stderr: str) -> str:
  """describe's output -> READY, PREEMPTED, ..., MISSING (not found) or UNKNOWN."""
  if returncode == 0:
    return stdout.strip().upper() or UNKNOWN
  if "NOT_FOUND" in stderr or "not found" in stderr.lower():
    return MISSING
  return UNKNOWN


def job_state(returncode: int, stdout: str) -> str:
  """The status command's output -> running | done | failed | none | unknown."""
  lines = stdout.strip().splitlines()
  word = lines[-1].strip() if returncode == 0 and lines else ""
  if word in ("running", "none"):
    return word
  if word.startswith("exit:"):
    return "done" if word == "exit:0" else "failed"
  return "unknown"


def decide(vm: str, job: str, memory: Memory, max_restarts: int) -> tuple[Action, Memory]:
  """The next action from the VM state and the job state (only read when the VM is ready).

  A job that exited 0 counts as done only when two polls in a row say so: a preempted
  trainer checkpoints and exits cleanly on SIGTERM before the VM shows PREEMPTED.
  """
  may_start = memory.starts <= max_restarts
  fresh = dataclasses.replace(memory, done_seen=0)
  if vm in DEAD:
    return (Action.RECREATE if may_start else Action.GIVE_UP), fresh
  if vm == MISSING:
    return (Action.CREATE if may_start else Action.GIVE_UP), fresh
  if vm not in READY:
    return Action.WAIT, fresh
  if job == "done":
    if memory.done_seen >= 1:
      return Action.DONE, memory
    return Action.WAIT, dataclasses.replace(memory, done_seen=memory.done_seen + 1)
  if job in ("none", "failed"):
    if not may_start:
      return Action.GIVE_UP, fresh
    action = Action.START if job == "none" else Action.RESTART
    return action, Memory(starts=memory.starts + 1)
  return Action.WAIT, fresh


def plan(observations: Sequence[tuple[str, str]], max_restarts: int) -> list[Action]:
  """decide() folded over (vm_state, job_state) pairs, up to DONE or GIVE_UP."""
  memory, actions = Memory(), []
  for vm, job in observations:
    action, memory = decide(vm, job, memory, max_restarts)
    actions.append(action)
    if action in (Action.DONE, Action.GIVE_UP):
      break
  return actions


def action_commands(action: Action, opts: Options) -> list[list[str]]:
  if action is Action.CREATE:
    return create_commands(opts)
  if action is Action.RECREATE:
    return delete_commands(opts) + create_commands(opts)
  if action is Action.START:
    return copy_commands(opts) + install_commands(opts) + start_commands(opts)
  if action is Action.RESTART:
    return start_commands(opts)
  return []


def observe(opts: Options, runner: common.Runner) -> tuple[str, str]:
  """(vm_state, job_state); the job is asked about only when the VM is ready."""
  vm = vm_state(*runner.capture(describe_command(opts)))
  if vm not in READY:
    return vm, "-"
  returncode, stdout, _ = runner.capture(status_command(opts))
  return vm, job_state(returncode, stdout)


def babysit(opts: Options, runner: common.Runner,
            observe_fn: Callable[[], tuple[str, str]] | None = None,
            sleep: Callable[[float], None] = time.sleep,
            log: Callable[[str], None] | None = None,
            until_started: bool = False) -> int:
  """Polls and acts until the job is done (0) or the restarts are spent (1).

  until_started: return once the job is started, or found running or finished (`up`).
  """
  observe_fn = observe_fn or (lambda: observe(opts, runner))
  log = log or (lambda text: print(text, file=sys.stderr, flush=True))
  memory = Memory()
  while True:
    vm, job = observe_fn()
    action, memory = decide(vm, job, memory, opts.max_restarts)
    log(f"{time.strftime('%H:%M:%S')} {opts.name}: vm={vm} job={job} -> {action.value} "
        f"(starts {memory.starts}, at most {opts.max_restarts + 1})")
    if action is Action.DONE:
      return 0
    if action is Action.GIVE_UP:
      log(f"{opts.name}: giving up after {opts.max_restarts} restarts (--max_restarts)")
      return 1
    if until_started and job in ("running", "done"):
      log(f"{opts.name}: the job is {'running' if job == 'running' else 'finished'}")
      return 0
    try:
      runner.run(action_commands(action, opts))
    except common.CommandFailed as e:
      log(f"{opts.name}: {e}; trying again after the next poll")
    else:
      if until_started and action in (Action.START, Action.RESTART):
        return 0
    sleep(opts.poll_s)


def print_babysit_plan(opts: Options, runner: common.Runner, until_started: bool) -> None:
  """What the loop would run, for --dry-run."""
  runner.note(f"every {opts.poll_s:g} s: the {'queued resource' if opts.queued else 'TPU VM'}"
              "'s state")
  runner.run([describe_command(opts)])
  runner.note(f"when {'/'.join(sorted(READY))}: the job's state on worker 0")
  runner.run([status_command(opts)])
  runner.note("when it does not exist: create it")
  runner.run(action_commands(Action.CREATE, opts))
  runner.note(f"when {'/'.join(sorted(DEAD))}: delete it and create it again")
  runner.run(action_commands(Action.RECREATE, opts))
  runner.note("when ready and the job never ran there: copy the code, install, start the job")
  runner.run(action_commands(Action.START, opts))
  if until_started:
    runner.note("then stop: the job runs on (watch it with `status` and `logs`)")
    return
  runner.note("when the job exited non-zero: start it again (it resumes from --workdir)")
  runner.run(action_commands(Action.RESTART, opts))
  runner.note(f"stop when the job has exited 0 on two polls in a row, or after "
              f"{opts.max_restarts} restarts (--max_restarts)")


def execute(subcommand: str, opts: Options, runner: common.Runner, worker: str = "0") -> int:
  """Runs one subcommand; returns the exit status."""
  validate(opts, subcommand)
  if subcommand in ("up", "babysit"):
    until_started = subcommand == "up"
    if runner.dry_run:
      print_babysit_plan(opts, runner, until_started)
      return 0
    return babysit(opts, runner, until_started=until_started)
  if subcommand == "status":
    if runner.dry_run:
      runner.run([describe_command(opts), status_command(opts)])
      return 0
    vm, job = observe(opts, runner)
    print(f"{opts.name}: vm={vm} job={job}")
    return 0
  commands = {
      "create": lambda: create_commands(opts),
      "delete": lambda: delete_commands(opts),
      "copy": lambda: copy_commands(opts),
      "install": lambda: install_commands(opts),
      "run": lambda: start_commands(opts),
      "stop": lambda: stop_commands(opts),
      "logs": lambda: [logs_command(opts, worker=worker)],
  }[subcommand]()
  runner.run(commands)
  return 0


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("name", None, "TPU VM (and queued resource) name.")
  flags.DEFINE_string("zone", None, "Zone, e.g. us-central2-b.")
  flags.DEFINE_string("project", None, "Google Cloud project id.")
  flags.DEFINE_string("accelerator", None, f"Accelerator type: {common.EXAMPLES}.")
  flags.DEFINE_string("runtime_version", "", "TPU VM image; '' = the generation's usual one.")
  flags.DEFINE_bool("spot", False, "Spot VM (preemptible, cheaper).")
  flags.DEFINE_bool("preemptible", False, "Legacy preemptible VM.")
  flags.DEFINE_bool("queued", False, "Ask through a queued resource (waits for capacity).")
  flags.DEFINE_string("git_url", "", "Clone this on the workers instead of copying the checkout.")
  flags.DEFINE_string("git_ref", "", "Branch, tag or commit to check out after cloning.")
  flags.DEFINE_enum("job", "train", list(JOBS), "train or sweep.")
  flags.DEFINE_string("config", "", "--config for the job, e.g. configs/lm.py:125m.")
  flags.DEFINE_string("workdir", "", "--workdir for the job (gs:// so every worker sees it).")
  flags.DEFINE_string("jax_version", "", "jax[tpu] version; '' = the pin in requirements.txt.")
  flags.DEFINE_string("python_version", "3.11", "Python of the venv on the workers.")
  flags.DEFINE_string("gcloud", "gcloud", "The gcloud executable.")
  flags.DEFINE_integer("max_restarts", 10, "babysit: restarts before giving up.")
  flags.DEFINE_float("poll_s", 60.0, "babysit/up: seconds between polls.")
  flags.DEFINE_string("worker", "0", "logs: which worker's log.")
  flags.DEFINE_bool("dry_run", False, "Print the commands; run nothing.")
  flags.DEFINE_alias("dry-run", "dry_run")
  flags.DEFINE_bool("traceback", False, "Print the full traceback for input errors.")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) < 2:
    raise ValueError(f"name a subcommand: {', '.join(SUBCOMMANDS)}.")
  opts = Options(
      name=f.name or "", zone=f.zone or "", project=f.project or "",
      accelerator=f.accelerator or "", runtime_version=f.runtime_version, spot=f.spot,
      preemptible=f.preemptible, queued=f.queued, git_url=f.git_url, git_ref=f.git_ref,
      job=f.job, config=f.config, workdir=f.workdir, args=tuple(argv[2:]),
      jax_version=f.jax_version, python_version=f.python_version, gcloud=f.gcloud,
      max_restarts=f.max_restarts, poll_s=f.poll_s)
  try:
    return execute(argv[1], opts, common.Runner(f.dry_run), worker=f.worker)
  except common.CommandFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  from train import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  sys.exit(cli.run(main))
