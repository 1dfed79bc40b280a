r"""Runs one command as N JAX processes on this machine: a multi-host run without the hosts.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      python -m train --config=configs/lm.py:tiny --workdir=/tmp/mh

Each process gets the environment `sharding.mesh.initialize_distributed` reads before the
mesh is built, as a pod worker would:
  JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
plus `XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>`,
`JAX_PLATFORMS=cpu` and gloo CPU collectives (`jax_cpu_collectives_implementation`), so the
processes form one mesh of N x devices_per_process devices. The trainer then runs as on a pod
(`jax.process_count() == N`, each process loading only its rows of the batch, checkpoints
written by all, preemption agreed between processes); gloo over TCP stands in for the
interconnect.

Process 0's output streams to this terminal; process i > 0 writes to `<log_dir>/process_i.log`
(its tail is printed if it fails). If any process fails, the others are killed (a peer stuck in
a collective with a dead process would wait forever) and the launcher exits with the worst
exit code among the processes that exited on their own. SIGTERM or Ctrl-C to the launcher
sends SIGTERM to every process (the trainer checkpoints and exits); a second one, or
_KILL_GRACE_S without an exit, kills them. `--dry-run` prints the exact commands, one per
process, and starts nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_KILL_GRACE_S = 60.0  # after a forwarded SIGTERM, how long processes get to checkpoint


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int,
                coordinator: str, base_env: dict | None = None) -> dict:
  """The environment of process `process_id` (only the variables this launcher sets)."""
  base_env = os.environ if base_env is None else base_env
  xla_flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S+", "", base_env.get("XLA_FLAGS", "")).split()
  return {
      "JAX_COORDINATOR_ADDRESS": coordinator,
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "XLA_FLAGS": " ".join(xla_flags + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"]),
  }


def commands(command: list[str], num_processes: int, devices_per_process: int,
             port: int | None = None, host: str = "127.0.0.1") -> list[tuple[dict, list[str]]]:
  """[(env additions, argv)] per process: what `launch` runs, and `--dry-run` prints."""
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}: must be at least 1.")
  if devices_per_process < 1:
    raise ValueError(f"--devices_per_process={devices_per_process}: must be at least 1.")
  if not command:
    raise ValueError("no command to run: put it after `--`, e.g. "
                     "`-- python -m train --config=... --workdir=...`.")
  coordinator = f"{host}:{port or free_port(host)}"
  return [(process_env(i, num_processes, devices_per_process, coordinator), list(command))
          for i in range(num_processes)]


def format_command(env: dict, argv: list[str]) -> str:
  """A shell line that runs `argv` with `env` added: what a user could paste."""
  return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(argv)])


def _die_with_parent() -> None:
  """In the child: SIGKILL it if the launcher dies (Linux), so no process is orphaned."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _exit_code(returncode: int) -> int:
  """Popen's -N (killed by signal N) as a shell would report it: 128 + N."""
  return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


def _tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def launch(command: list[str], num_processes: int, devices_per_process: int, *,
           port: int | None = None, log_dir: str | None = None, cwd: str | None = None,
           poll_s: float = 0.1) -> int:
  """Starts the processes, waits for all of them, returns the worst exit code (0 = success).

  Processes this launcher killed because a peer failed do not count (their SIGKILL would hide
  the real error); ones killed after a SIGTERM or Ctrl-C to the launcher do.
  """
  plan = commands(command, num_processes, devices_per_process, port)
  log_dir = log_dir or tempfile.mkdtemp(prefix="launch_local_")
  os.makedirs(log_dir, exist_ok=True)
  procs, logs = [], []
  for i, (env, argv) in enumerate(plan):
    if i == 0:
      out = None  # inherit: process 0 streams to this terminal
    else:
      out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
      logs.append(out)
    # A session of their own: a terminal's Ctrl-C reaches only the launcher, which turns it
    # into one SIGTERM per process.
    procs.append(subprocess.Popen(argv, env={**os.environ, **env}, cwd=cwd, stdout=out,
                                  stderr=subprocess.STDOUT if out else None,
                                  start_new_session=True, preexec_fn=_die_with_parent))
    print(f"launch.local: process {i}/{num_processes} pid {procs[-1].pid}"
          + (f", log {out.name}" if out else ""), file=sys.stderr, flush=True)

  stop = {"asked_at": None, "kill": False}  # SIGTERM sent to the processes at; kill them now

  def forward(signum, frame):
    del signum, frame
    if stop["asked_at"] is not None:
      stop["kill"] = True
      return
    stop["asked_at"] = time.monotonic()
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  after_failure = set()  # killed because a peer failed: not a failure of their own
  try:
    while True:
      codes = [p.poll() for p in procs]
      if None not in codes:
        break
      failed = any(c not in (None, 0) for c in codes)
      late = stop["kill"] or (stop["asked_at"] is not None and
                              time.monotonic() - stop["asked_at"] > _KILL_GRACE_S)
      if failed or late:
        if late:
          print("launch.local: killing the processes still running "
                f"({'asked twice' if stop['kill'] else f'{_KILL_GRACE_S:g} s after SIGTERM'})",
                file=sys.stderr)
        for i, p in enumerate(procs):
          if p.poll() is None:
            p.kill()
            if failed:
              after_failure.add(i)
        for p in procs:
          p.wait()
        break
      time.sleep(poll_s)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for f in logs:
      f.close()

  worst = 0
  for i, p in enumerate(procs):
    if i in after_failure:
      print(f"launch.local: process {i} killed after a peer failed", file=sys.stderr)
      continue
    if p.returncode != 0:
      print(f"launch.local: process {i} {_describe(p.returncode)}", file=sys.stderr)
      if i > 0:
        tail = _tail(os.path.join(log_dir, f"process_{i}.log"))
        print(f"--- last lines of process {i} ---\n{tail}---", file=sys.stderr)
    worst = max(worst, _exit_code(p.returncode))
  return worst


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m launch.local", description=__doc__.split("\n\n")[0],
      usage="python -m launch.local [options] -- COMMAND [ARGS...]")
  parser.add_argument("--num_processes", "--num-processes", type=int, default=2)
  parser.add_argument("--devices_per_process", "--devices-per-process", type=int, default=4,
                      help="virtual CPU devices per process (XLA_FLAGS)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  parser.add_argument("--log_dir", "--log-dir", default=None,
                      help="where processes 1..N-1 write their output (default: a temp dir)")
  parser.add_argument("--dry_run", "--dry-run", action="store_true",
                      help="print the command of every process and start nothing")
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
  else:
    own, command = argv, []
  args = parser.parse_args(own)
  args.command = command
  return args


def main(argv: list[str]) -> int:
  args = _parse(argv)
  try:
    if args.dry_run:
      for env, cmd in commands(args.command, args.num_processes, args.devices_per_process,
                               args.port):
        print(format_command(env, cmd))
      return 0
    return launch(args.command, args.num_processes, args.devices_per_process,
                  port=args.port or None, log_dir=args.log_dir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
