"""Files that readers may open while they are written: write aside, fsync, rename.

A reader (another worker, `laws.predict`, a person) sees either the previous complete
file or the new complete one, never a partial one, even if the writer is killed mid-write.
"""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w"):
  """open(path, mode) for writing, committed by rename only when the block ends cleanly."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write(path: str, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def _fsync_dir(path: str) -> None:
  """The rename itself survives a crash only once its directory is synced."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
