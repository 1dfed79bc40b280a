"""sweep/point.py and grid.points: the grid as sweep points trains the same trials, and a
store written in the grid's own point format reads back the same rows."""
import pytest

from sweep import grid
from sweep import point as point_lib
from sweep import runner
from sweep import store as store_lib
from configs import sweep as sweep_configs

RESULT = {"status": "ok", "loss": 2.0, "curve": {"steps": [1], "losses": [2.0]}, "steps": 1}


def test_grid_points_are_the_grid_as_overrides():
  config = sweep_configs.get_config("test")
  coords = grid.grid_points(config)
  points = grid.points(config)
  assert [p.key for p in points] == [c.key for c in coords]
  assert [p.group for p in points] == [c.group for c in coords]
  assert point_lib.group_size(points) == len(grid.learning_rates(config.grid))
  for c, p in zip(coords, points):
    want = grid.trial_config(config, c, device_peak_flops=3.0).to_dict()
    assert point_lib.trial_config(config, p, device_peak_flops=3.0).to_dict() == want
    legacy = dict(c.to_dict(), N=p.row["N"], seq_len=config.base.seq_len)
    assert store_lib.read_point(legacy, config) == p


def test_runtime_fields_are_not_overrides():
  with pytest.raises(ValueError, match="lr_scale"):
    point_lib.Point("k", {"lr_scale": 2.0})
  a, b = point_lib.Point("a", {"x": 1}, lr_scale=0.5), point_lib.Point("b", {"x": 1}, seed=1)
  assert a.cell == b.cell and a.group != b.group


def test_legacy_store_reads_back_the_same_rows(tmp_path):
  config = sweep_configs.get_config("test")
  for name in ("new", "old"):
    (tmp_path / name).mkdir()
  stores = [store_lib.open_store(config, str(tmp_path / name)) for name in ("new", "old")]
  runner.enqueue(config, stores[0])
  points = grid.points(config)
  stores[1].enqueue(grid.grid_points(config),
                    {p.key: {"N": p.row["N"], "seq_len": config.base.seq_len} for p in points})
  for store in stores:
    while claimed := store.claim(group=8):
      for t in claimed:
        store.finish(t, RESULT)
  assert stores[0].rows() == stores[1].rows()
  assert len(stores[0].rows()) == len(points)
