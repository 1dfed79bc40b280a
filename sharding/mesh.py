"""Device mesh from config and multi-host start.

The mesh has the four axes of DESIGN.md: `data`, `fsdp`, `tensor`, `sequence`. Sizes come
from `config.mesh`; one size may be -1, meaning "every device left".
"""
from __future__ import annotations

import glob
import math
import os
import socket
import sys
import threading
import time

import jax
import numpy as np
from absl import logging

from sharding import rules as rules_lib

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
TRIALS = "trials"  # the leading axis of vectorised sweep trials (train/vectorized.py)


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Returns {axis: size} with -1 resolved; raises ValueError on a bad mesh."""
  sizes = {}
  for axis in MESH_AXES:
    size = int(mesh_config.get(axis, 1))
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: must be a positive size or -1 (the rest).")
    sizes[axis] = size
  unknown = set(mesh_config.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; valid: {list(MESH_AXES)}.")
  auto = [a for a, s in sizes.items() if s == -1]
  if len(auto) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {auto}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if auto:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh={dict(sizes)}: the fixed axes ({fixed} devices) do not divide the "
          f"{num_devices} devices.")
    sizes[auto[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh={dict(sizes)} uses {fixed} devices but {num_devices} are available; "
        "the product of the axis sizes must equal the device count (or set one axis to -1).")
  return sizes


def make_mesh(mesh_config, devices=None, *, trial_shards: int = 0) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor, sequence) mesh over `devices` (default: all), ICI-aware.

  Every mesh of the project comes from here: the trainer's, the TPU preflight's (a slice's
  devices) and vectorised sweeps' (trial_shards > 0: a leading `trials` axis of that many
  device groups, each laid out by mesh_config). jax.make_mesh places the axes on the
  physical topology; device sets it cannot lay out are reshaped in order.
  """
  devices = list(jax.devices() if devices is None else devices)
  if trial_shards < 0 or len(devices) % max(trial_shards, 1):
    raise ValueError(f"config.vectorized.trial_shards={trial_shards}: must divide the "
                     f"{len(devices)} devices.")
  sizes = resolve_mesh_shape(mesh_config, len(devices) // max(trial_shards, 1))
  shape, names = tuple(sizes[a] for a in MESH_AXES), MESH_AXES
  if trial_shards:
    shape, names = (trial_shards,) + shape, (TRIALS,) + names
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  try:
    return jax.make_mesh(shape, names, devices=devices, axis_types=auto)
  except (AssertionError, NotImplementedError, ValueError):
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), names, axis_types=auto)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Number of ways the batch is split (the `data` and `fsdp` axes)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


# ------------------------------------------------------------------ checks before compiling

# The config field that sets the size of a parameter dimension, by logical axis name.
_SIZE_FIELDS = {
    "heads": "config.model.num_heads",
    "mlp": "config.model.mlp_dim",
    "embed": "config.model.d_model",
    "kv": "config.model.head_dim",
    "layers": "config.model.num_layers",
    "vocab": "the vocabulary (padded to config.model.vocab_multiple)",
}


def check_divisible(shapes, logical, mesh: jax.sharding.Mesh, rules) -> None:
  """Raises a one-line ValueError if a parameter dimension does not divide its mesh axes.

  shapes: pytree of arrays / ShapeDtypeStructs; logical: the same pytree of logical-name
  tuples. Without this, a bad pairing (4 heads on tensor=8) surfaces as an IndivisibleError
  from deep inside jit.
  """
  def check(path, shape, names):
    if names is None:
      return
    spec = rules_lib.logical_to_spec(names, rules)
    for size, name, axes in zip(shape.shape, names, spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        field = _SIZE_FIELDS.get(name, f"the {name!r} dimension")
        split = " x ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(
            f"{field}={size} is not divisible by {split}: the {name!r} axis of "
            f"{jax.tree_util.keystr(path, simple=True, separator='.')} is split over "
            f"{'it' if len(axes) == 1 else 'them'} (config.logical_axis_rules); pick sizes "
            "that divide.")

  jax.tree_util.tree_map_with_path(
      check, shapes, logical,
      is_leaf=lambda x: x is None or hasattr(x, "shape"))


def process_batch_shard(batch_sharding, batch_size: int) -> tuple[int, int]:
  """(index, count): this process loads rows [index*b, (index+1)*b) of each global batch,
  b = batch_size // count, for a batch laid out by `batch_sharding` (batch = dim 0).

  Usually (process_index, process_count). When the batch is split fewer ways than there are
  processes (tensor or sequence parallelism across hosts), processes that hold the same rows
  load the same rows, and `count` is the number of distinct row blocks.
  """
  shape = (batch_size,) + (1,) * (len(batch_sharding.spec) - 1)
  rows = {idx[0].indices(batch_size)[:2]
          for idx in batch_sharding.addressable_devices_indices_map(shape).values()}
  start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
  covered = sorted(rows)
  contiguous = all(a[1] >= b[0] for a, b in zip(covered, covered[1:]))
  block = stop - start
  if not contiguous or batch_size % block or start % block:
    raise ValueError(
        f"process {jax.process_index()} holds batch rows {covered} of {batch_size}: not one "
        "aligned block, so it cannot load its share alone; order the mesh so each process's "
        "devices are contiguous along the batch axes.")
  return start // block, batch_size // block


# ------------------------------------------------------------------ multi-host start


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError:
      if time.monotonic() > deadline:
        raise TimeoutError(
            f"could not reach the coordinator at {address} within {timeout_s:g} s "
            "(--coordinator_address / JAX_COORDINATOR_ADDRESS); is process 0 running and the "
            "port open?") from None
      time.sleep(0.5)


def _exit_if_not_joined(timeout_s: float, message: str) -> threading.Timer:
  """Watchdog for `jax.distributed.initialize`: its own timeout aborts the process from C++
  with a stack trace (or, with no peers at all, may wait much longer); this prints one line
  and exits with status 2 first."""
  def fire():
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access  (the main thread is stuck in C++)
  timer = threading.Timer(timeout_s, fire)
  timer.daemon = True
  timer.start()
  return timer


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           timeout_s: float = 120.0,
                           cpu_collectives: str = "gloo") -> None:
  """Starts multi-host JAX (`jax.distributed.initialize`); call it before anything touches
  devices.

  Arguments fall back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (what
  `launch.local` sets). With none of them, Cloud TPU VMs (GCE metadata or GKE environment)
  and SLURM jobs are detected by `jax.distributed.initialize()` itself; anything else is a
  single-process run and is left alone. A coordinator that cannot be reached, or processes
  that do not all join, end the process after `timeout_s` with one line naming the address.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator_address is None and not (_on_tpu_vm() or _in_slurm_job()):
    return  # one process
  if num_processes == 1:
    return
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) "
                     f"(--num_processes={num_processes}).")
  platforms = str(jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "")
  if not platforms or "cpu" in platforms:
    # CPU devices of different processes talk through gloo (launch.local runs).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if coordinator_address and process_id not in (None, 0):
    _wait_for_coordinator(coordinator_address, timeout_s)
  where = (f"the coordinator at {coordinator_address}" if coordinator_address
           else "the auto-detected coordinator")
  watchdog = _exit_if_not_joined(
      timeout_s, f"not all {num_processes or 'the'} processes joined {where} within "
      f"{timeout_s:g} s (this is process {process_id}); start every process with the same "
      "--coordinator_address and --num_processes, or raise --coordinator_timeout_s.")
  try:
    # JAX's own deadline is set later than the watchdog so the one-line error wins.
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=int(timeout_s) + 60)
  finally:
    watchdog.cancel()
  logging.info("process %d of %d joined %s", jax.process_index(), jax.process_count(), where)


# PCI device ids of TPU chips (vendor 0x1ae0, Google), v3 to TPU7x, as in jax's hardware_utils.
_TPU_PCI_IDS = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def _on_tpu_vm() -> bool:
  """A multi-host Cloud TPU VM slice, for `jax.distributed.initialize()` to detect.

  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES (GKE; exported by launch/tpu_vm.py) decide
  when set: several hosts. Otherwise TPU chips on PCI mean a GCE TPU VM, whose metadata JAX
  reads (a single-host slice then starts as one process).
  """
  hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  if hosts is not None:
    return "," in hosts
  for device in glob.glob("/sys/bus/pci/devices/*"):
    try:
      with open(os.path.join(device, "vendor")) as v, open(os.path.join(device, "device")) as d:
        if v.read().strip() == "0x1ae0" and d.read().strip() in _TPU_PCI_IDS:
          return True
    except OSError:
      continue
  return False


def _in_slurm_job() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
