"""The sweep's trial-store URL: passwords are masked in logs and kept out of
sweep_config.json, $BATCHSCALE_STORAGE supplies the URL, and a corrupt sweep.db is one
line and exit 2 from the CLIs, not a traceback."""
import json
import os

import pytest

from sweep import runner
from sweep import store as store_lib
from configs import sweep as sweep_configs
from tests import testlib

SECRET_URL = "postgresql://user:s3cret@host/db"


def test_masked_url():
  assert store_lib.masked_url(SECRET_URL) == "postgresql://user:***@host/db"
  assert store_lib.masked_url("postgresql://user@host/db") == "postgresql://user@host/db"
  assert store_lib.masked_url("sqlite:////tmp/w/sweep.db") == "sqlite:////tmp/w/sweep.db"
  assert "s3cret" not in store_lib.masked_url("postgresql://user:s3cret@[bad")


def test_save_config_writes_no_password(tmp_path):
  config = sweep_configs.get_config("test")
  config.store.storage = SECRET_URL
  runner.save_config(config, str(tmp_path))
  text = (tmp_path / runner.CONFIG_FILE).read_text()
  assert "s3cret" not in text
  loaded = runner.load_config(str(tmp_path))
  assert loaded.store.storage == "postgresql://user@host/db"  # libpq: ~/.pgpass, PGPASSWORD
  assert loaded.grid.to_dict() == json.loads(config.grid.to_json_best_effort())


def test_sweep_log_line_masks_password():
  line = runner.sweep_line(SECRET_URL, {"points": 4, "done": 1, "failed": 0}, 3)
  assert "s3cret" not in line and "postgresql://user:***@host/db" in line
  assert line.endswith("4 points (3 new), 1 done, 0 failed")


def test_storage_url_from_env(tmp_path, monkeypatch):
  config = sweep_configs.get_config("test")
  monkeypatch.delenv(store_lib.STORAGE_ENV, raising=False)
  assert store_lib.storage_url(config, str(tmp_path)).endswith("sweep.db")
  monkeypatch.setenv(store_lib.STORAGE_ENV, SECRET_URL)
  assert store_lib.storage_url(config, str(tmp_path)) == SECRET_URL
  # The saved (password-less) URL takes its password from the variable naming the same DB.
  config.store.storage = "postgresql://user@host/db"
  assert store_lib.storage_url(config, str(tmp_path)) == SECRET_URL
  config.store.storage = "postgresql://other@host/db2"
  assert store_lib.storage_url(config, str(tmp_path)) == "postgresql://other@host/db2"


# ----------------------------------------------------------------------------------------
# A corrupt sweep.db: one line naming it and the way out, exit 2, no traceback.


def _corrupt_workdir(tmp_path, how):
  workdir = tmp_path / how
  workdir.mkdir()
  config = sweep_configs.get_config("test")
  if how == "garbage":
    (workdir / "sweep.db").write_bytes(b"not a database at all\n" * 200)
  else:  # a real store, truncated mid-file
    store = store_lib.open_store(config, str(workdir))
    runner.enqueue(config, store)
    store.storage.remove_session()
    del store
    data = (workdir / "sweep.db").read_bytes()
    (workdir / "sweep.db").write_bytes(data[:len(data) // 3])
  runner.save_config(config, str(workdir))
  return str(workdir)


def test_open_store_corrupt_is_one_line(tmp_path):
  workdir = _corrupt_workdir(tmp_path, "truncated")
  with pytest.raises(store_lib.StoreError, match=r"sweep.db is not a readable SQLite"):
    store_lib.open_store(sweep_configs.get_config("test"), workdir)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_cli_corrupt_store_exits_2(tmp_path, how):
  workdir = _corrupt_workdir(tmp_path, how)
  for args in (("sweep", "--config=configs/sweep.py:test",
                f"--workdir={workdir}", "--layout=sequential"),
               ("laws.fit", f"--workdir={workdir}")):
    proc = testlib.run_cli(*args, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (2, 3), (args, proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and len(lines) == 1, (args, proc.stderr[-2000:])
    assert "sweep.db" in lines[0] and "metrics.jsonl" in lines[0], lines
  assert not os.path.exists(os.path.join(workdir, "trials"))
