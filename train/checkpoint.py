"""Orbax checkpoints of the train state, the grain iterator and host-side metadata.

One step directory holds `state` (params, optimizer state, step, controller state: sharded
arrays, written cooperatively by every process), `data` (each process's grain iterator
state) and `meta` (JSON: tokens seen, batch-size history, config hash). Orbax writes to a
temporary directory and renames it on commit, so a process killed mid-save leaves the
previous checkpoints intact. A latest checkpoint that fails to restore (truncated or garbled
files) is skipped with a warning in favour of the newest one that restores.

Orbax stores arrays without checksums, so a flipped bit in the array data restores silently;
`meta` therefore also holds a fingerprint of the state (two uint32 sums per leaf) and a digest
of each process's data-iterator state, both checked on restore. A save that fails (disk full,
quota, permissions) raises CheckpointWriteError naming the step, the directory and the OS
reason; the earlier checkpoints stay intact and the run stops there (see `save`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging


class _OrbaxErrorsInOneLine(logging.logging.Filter):
  """Orbax logs one failed background write four times, each with a traceback; keep its
  lines and drop the tracebacks: CheckpointWriteError carries the cause (--traceback)."""

  def filter(self, record):
    if "/orbax/" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


logging.get_absl_logger().addFilter(_OrbaxErrorsInOneLine())


class NoCheckpointError(ValueError):
  """No checkpoint (or none readable) where one was required."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the earlier ones are intact."""


def _words(x):
  """x's bits as uint32 (a trailing axis of 2 for 64-bit dtypes), same leading shape."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(tree):
  """Per leaf [sum w_i, sum (2i+1) w_i] mod 2^32 over its uint32 words w (i: flat index).

  Integer sums are exact in any order, so the value does not depend on the sharding; the
  odd weights make any change of one word, and any swap of two, change it.
  """
  def leaf(x):
    w = _words(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
      index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride)
      stride = stride * w.shape[axis] % 2**32
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                      jnp.sum(w * (2 * index + 1), dtype=jnp.uint32)])
  return jax.tree.map(leaf, tree)


def fingerprint(tree) -> dict[str, list[int]]:
  """{leaf path: [two uint32 checksums]} of a pytree of (sharded) arrays."""
  sums = jax.device_get(_fingerprint(tree))
  return {jax.tree_util.keystr(path): [int(v) for v in value]
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _data_digest(data_iterator) -> int:
  state = data_iterator.get_state()
  if isinstance(state, bytes):
    state = json.loads(state)
  text = json.dumps(state, sort_keys=True, default=str)
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _all_processes(value: int) -> list[int]:
  if jax.process_count() == 1:
    return [value]
  return [int(v) for v in multihost_utils.process_allgather(np.uint32(value))]


def _os_reason(e: BaseException) -> str:
  """'No space left on device [errno 28]' from an OSError or a TensorStore error text."""
  code = getattr(e, "errno", None)
  found = re.search(r"os_error_code='?(\d+)", str(e))
  if found:
    code = int(found.group(1))
  if code:
    return f"{os.strerror(code)} [errno {code}]"
  lines = str(e).strip().splitlines()
  return (lines[0][:300] if lines else type(e).__name__)


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    # Orbax removes an interrupted save's temporary directory in a background thread; finish
    # that here, or a run that stops at once leaves the thread failing at interpreter exit.
    getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self._in_flight = None  # the step of an asynchronous save not yet known to be written

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    """Saves (asynchronously if so configured); raises CheckpointWriteError on failure.

    A failed write stops the run instead of training on and retrying at the next interval: a
    full disk does not empty itself, every step after it would be unprotected, and the
    callers that can retry (the sweep's trial retries, launch/'s babysitter) re-run the job,
    which resumes from the last good checkpoint once the disk has room.
    """
    meta = dict(meta, fingerprint=fingerprint(state))
    if data_iterator is not None:
      meta["data_digest"] = _all_processes(_data_digest(data_iterator))
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.wait()  # the previous save's failure is reported with its own step
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # noqa: BLE001 - any write failure
      raise self._write_error(step, e) from e
    self._in_flight = step
    return saved

  def restore(self, abstract_state, data_iterator, step: int | None = None):
    """Restores the newest readable checkpoint (or `step`): (step, state, meta)."""
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise NoCheckpointError(f"no checkpoint in {self.directory}")
    errors = []
    for s in steps:
      args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
      if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(**args))
        meta = _verify(restored["state"], dict(restored["meta"]), data_iterator)
        error = None
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        error = f"step {s}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
      if not all(_all_processes(error is None)):  # every process falls back together
        error = error or f"step {s}: unreadable on another process"
      if error:
        errors.append(error)
        logging.warning("checkpoint at step %d in %s is unreadable (%s); trying an older one",
                        s, self.directory, error)
        continue
      if errors:
        self._quarantine([t for t in steps if t > s])
        logging.warning("resumed from step %d after skipping %d unreadable checkpoint(s)", s,
                        len(errors))
      return s, restored["state"], meta
    raise NoCheckpointError(
        f"no readable checkpoint in {self.directory}; tried: " + "; ".join(errors))

  def _quarantine(self, steps) -> None:
    """Moves unreadable step directories aside (kept for inspection, never reused)."""
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
          os.rename(path, f"{path}.unreadable-{int(time.time())}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint_quarantine")
    self._manager.reload()

  def wait(self) -> None:
    """Waits for an asynchronous save; raises CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(self._in_flight, e) from e
    self._in_flight = None

  def close(self) -> None:
    self.wait()
    self._manager.close()

  def _write_error(self, step, e: BaseException) -> CheckpointWriteError:
    try:  # what is left on disk: step directories are renamed into place only once complete
      good = sorted(int(p.name) for p in epath.Path(self.directory).iterdir()
                    if p.name.isdigit() and int(p.name) != step)
    except OSError:
      good = []
    try:
      self._manager.close()  # stops its threads, which would otherwise fail at exit
    except Exception:  # noqa: BLE001 - the first error is the one to report
      pass
    kept = f"step {good[-1]}" if good else "none"
    error = CheckpointWriteError(
        f"checkpoint at step {step} could not be written to {self.directory}: "
        f"{_os_reason(e)}; the last good checkpoint ({kept}) is kept. Free space there (or use "
        "another --workdir) and re-run to resume.")
    error.errno = getattr(e, "errno", None)
    return error


def _verify(state, meta: dict, data_iterator) -> dict:
  """Checks the restored state and data-iterator state against the fingerprints saved with
  them (checkpoints without them pass); returns meta without them."""
  expected = meta.pop("fingerprint", None)
  digests = meta.pop("data_digest", None)
  if expected is not None:
    for path, value in fingerprint(state).items():
      if path in expected and expected[path] != value:
        raise ValueError(f"array data of state{path} does not match its fingerprint (corrupt)")
  if digests is not None and data_iterator is not None:
    if digests[jax.process_index()] != _data_digest(data_iterator):
      raise ValueError("the data iterator state does not match its digest (corrupt)")
  return meta


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) to restore a tree into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
