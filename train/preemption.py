"""SIGTERM handling for the training loop, on one process or several."""
from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Preemption:
  """SIGTERM (TPU VM preemption, `kill`) asks the loop to checkpoint and exit cleanly.

  With several processes all must stop after the same step (one that stops alone leaves the
  others waiting in a collective): JAX's preemption sync manager, started by
  `jax.distributed.initialize`, catches SIGTERM and agrees on that step (`check`).
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multihost = jax.process_count() > 1

  def check(self, step: int) -> None:
    """Call once per step, with the same step on every process."""
    if self._multihost and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)

  def __enter__(self):
    if self._multihost:
      return self  # JAX's notifier owns SIGTERM
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
