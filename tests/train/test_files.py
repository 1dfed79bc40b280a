"""train/files.py: a file a reader may open is never seen half-written."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from train import files

_WRITER = r"""
import json, sys
from train import files
path, i = sys.argv[1], 0
print("ready", flush=True)
while True:  # ever-new complete versions, large enough that a write takes a while
  i += 1
  files.atomic_write(path, json.dumps({"version": i, "pad": "x" * 4_000_000}))
"""


def test_a_failed_write_keeps_the_previous_file(tmp_path):
  path = str(tmp_path / "laws.json")
  files.atomic_write(path, '{"version": 1}')
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write('{"version": 2, "cut')
      raise RuntimeError("killed mid-write")
  assert json.load(open(path)) == {"version": 1}
  assert os.listdir(tmp_path) == ["laws.json"]  # no temporary file left behind


def test_sigkill_mid_write_leaves_a_complete_file(tmp_path):
  """SIGKILL of a writer at 5 points: the file on disk is always one complete version."""
  path = str(tmp_path / "laws.json")
  files.atomic_write(path, json.dumps({"version": 0}))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  for delay in (0.05, 0.11, 0.23, 0.37, 0.51):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE,
                            env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(path) as f:
      assert isinstance(json.load(f)["version"], int)
