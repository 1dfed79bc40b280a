"""train/loop.py with train/vectorized.py's steps: K learning rates in one vmapped program
train exactly like the same K trials run one by one through the same loop (same losses,
rtol 1e-4, same checkpoints), also with the trial axis sharded over devices, diverge one by
one, and resume from their checkpoints."""
import dataclasses

import jax
import numpy as np
import pytest

from sweep import grid
from sweep import runner
from sweep import store as store_lib
from sweep import trials as trials_lib
from train import checkpoint as ckpt_lib
from train import loop
from train import metrics as metrics_lib
from train import trainer
from train import vectorized
from configs import sweep as sweep_configs
from sharding import mesh as mesh_lib

LRS = (3e-3, 1e-2, 3e-2, 1e-1)


def _sweep_config():
  c = sweep_configs.get_config("test")
  c.num_evals = 3
  return c


POINT = grid.Point(d_model=16, num_layers=1, tokens=4096, batch_size=8, lr=1.0)


def _configs(config, lrs, point=POINT):
  out = []
  for lr in lrs:
    c = grid.trial_config(config, dataclasses.replace(point, lr=lr), device_peak_flops=1e9)
    c.log_every = 1
    out.append(c)
  return out


def _setup(config, mesh, point=POINT):
  return trainer.setup(grid.trial_config(config, point), mesh=mesh)


def _trials(configs, dirs):
  return [loop.Trial(c, d) for c, d in zip(configs, dirs)]


def _final_params(workdir, s):
  c = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", async_save=False)
  steps = c.all_steps()
  _, state, meta = c.restore(s.abstract_state, None)
  c.close()
  return steps, jax.device_get(state["params"]), meta


def _losses(workdir):
  rows = metrics_lib.read_rows(workdir)
  return (np.array([rows[s]["loss"] for s in sorted(rows)]),
          {s: rows[s]["eval_loss"] for s in sorted(rows) if "eval_loss" in rows[s]})


@pytest.fixture(scope="module")
def setup1():
  """One Program on one device, shared by the tests so each program compiles once."""
  config = _sweep_config()
  return _setup(config, mesh_lib.make_mesh(config.base.mesh, devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def sequential(setup1, tmp_path_factory):
  """The reference: each learning rate as its own run (K = 1) of the same loop."""
  out = []
  for c in _configs(_sweep_config(), LRS):
    d = str(tmp_path_factory.mktemp("seq"))
    result = loop.train(c, d, setup_=setup1)
    out.append(_losses(d) + (d, result))
  return out


def _check_same(outs, dirs, sequential, lrs=LRS):
  for out, d, (seq_loss, seq_eval, _, seq_out), lr in zip(outs, dirs, sequential, lrs):
    assert out["status"] == "done", (lr, out)
    loss, evals = _losses(d)
    assert len(loss) == len(seq_loss) == 16
    np.testing.assert_allclose(loss, seq_loss, rtol=1e-4, err_msg=f"lr={lr}")
    assert len(seq_eval) >= 3 and set(seq_eval) <= set(evals)  # (+ the end of a first half)
    np.testing.assert_allclose([evals[k] for k in seq_eval], list(seq_eval.values()), rtol=1e-4)
    assert out["eval_loss"] == pytest.approx(seq_eval[16], rel=1e-4)
    # The result carries its eval curve forward (no metrics.jsonl re-read).
    assert out["curve"]["steps"] == seq_out["curve"]["steps"] == list(seq_eval)
    np.testing.assert_allclose(out["curve"]["losses"], list(seq_eval.values()), rtol=1e-4)


def test_three_vectorized_trials_match_three_sequential(setup1, sequential, tmp_path):
  """K = 3 through the loop's vmapped step against the same 3 trials run one by one through
  the same loop: losses and evals (rtol 1e-4, 16 steps), checkpoints, and a resume."""
  dirs = [str(tmp_path / str(i)) for i in range(3)]
  outs = loop.run(setup1, _trials(_configs(_sweep_config(), LRS[:3]), dirs))
  _check_same(outs, dirs, sequential[:3], LRS[:3])
  assert len({round(o["eval_loss"], 6) for o in outs}) == 3  # the lrs do differ
  for d, (_, _, seq_dir, _) in zip(dirs, sequential):
    steps, params, meta = _final_params(d, setup1)
    seq_steps, seq_params, seq_meta = _final_params(seq_dir, setup1)
    assert steps == seq_steps and meta["tokens"] == seq_meta["tokens"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, seq_params)
  # Each trial's workdir is a plain run's workdir: the K = 1 loop resumes it, finished.
  c = _configs(_sweep_config(), LRS)[0]
  again = loop.train(c, dirs[0], setup_=setup1)
  assert again["step"] == 16 and again["curve"] == outs[0]["curve"]


def test_four_vectorized_trials_match_sequential(setup1, sequential, tmp_path):
  dirs = [str(tmp_path / str(i)) for i in range(len(LRS))]
  outs = loop.run(setup1, _trials(_configs(_sweep_config(), LRS), dirs))
  _check_same(outs, dirs, sequential)


def test_trial_axis_sharded_over_devices(sequential, tmp_path):
  """4 trials over 4 groups of 2 devices (data parallel inside each): the same losses; 3
  trials are padded to the 4 shards."""
  config = _sweep_config()
  assert jax.device_count() == 8
  mesh = vectorized.trial_mesh(config.base.mesh, trial_shards=4)
  assert dict(mesh.shape) == {"trials": 4, "data": 2, "fsdp": 1, "tensor": 1, "sequence": 1}
  s = _setup(config, mesh)
  assert vectorized.num_trial_shards(s) == 4
  dirs = [str(tmp_path / str(i)) for i in range(3)]
  outs = loop.run(s, _trials(_configs(config, LRS[:3]), dirs))
  assert len(outs) == 3
  _check_same(outs, dirs, sequential[:3], LRS[:3])


def test_diverged_trial_stops_alone(setup1, sequential, tmp_path):
  lrs = (LRS[0], 1e6, LRS[1], LRS[2])
  dirs = [str(tmp_path / str(i)) for i in range(4)]
  outs = loop.run(setup1, _trials(_configs(_sweep_config(), lrs), dirs))
  assert [o["status"] for o in outs] == ["done", "diverged", "done", "done"]
  assert outs[1]["step"] < 16 and "at step" in outs[1]["error"]
  assert np.isfinite(outs[1]["loss"])  # the last finite loss
  keep = [0, 2, 3]
  _check_same([outs[i] for i in keep], [dirs[i] for i in keep], sequential[:3], LRS[:3])


def test_resume_from_checkpoints(setup1, sequential, tmp_path):
  """Stopped at step 8 (as if killed after the checkpoint), then resumed: the same losses,
  and the eval curve of the whole run comes back from the checkpoints."""
  config = _sweep_config()
  dirs = [str(tmp_path / str(i)) for i in range(4)]
  trials = _trials(_configs(config, LRS), dirs)
  outs = loop.run(setup1, trials, hooks=[lambda step, row: step >= 8])
  assert [(o["status"], o["step"]) for o in outs] == [("stopped", 8)] * 4
  outs = loop.run(setup1, trials)
  _check_same(outs, dirs, sequential)


def test_layout_choice():
  # The default never depends on a timing: the same command always trains the same way.
  assert trials_lib.choose_layout("auto", "cpu") == "vectorized"
  assert trials_lib.choose_layout("auto", "tpu") == "vectorized"
  assert trials_lib.choose_layout("auto", "gpu") == "vectorized"
  assert trials_lib.choose_layout("sequential", "tpu") == "sequential"
  with pytest.raises(ValueError, match="trial_shards"):
    vectorized.trial_mesh(_sweep_config().base.mesh, trial_shards=3)


def test_sweep_driver_measures_the_layout(sequential, tmp_path):
  """run_sweep with layout='measure' claims a cell's learning rates as one group, times both
  layouts on it, keeps the faster in the store for every later worker, and trains (on all 8
  devices, data parallel) to the same losses as the one-trial runs."""
  config = _sweep_config()
  config.grid.models = ((16, 1),)
  config.grid.tokens = (4096,)
  config.grid.learning_rates = LRS + (1e6,)
  out = runner.run_sweep(config, str(tmp_path), layout="measure", fit=False)
  assert out["progress"] == {"points": 5, "done": 5, "failed": 0, "pending": 0, "running": 0}
  store = store_lib.open_store(config, str(tmp_path))
  chosen = store.study.user_attrs["layout"]
  assert chosen in ("sequential", "vectorized")
  assert trials_lib.Runner(config, str(tmp_path), "measure", store).layout == chosen
  starts = [t.datetime_start for t in store.trials()]
  assert len(starts) == 5
  if chosen == "vectorized":
    assert (max(starts) - min(starts)).total_seconds() < 2  # one claim, one program
  rows = {r["lr"]: r for r in store.rows()}
  assert rows[1e6]["status"] == "diverged"
  for lr, (seq_loss, seq_eval, _, _) in zip(LRS, sequential):
    row = rows[lr]
    assert row["status"] == "ok" and row["loss"] == pytest.approx(seq_eval[16], rel=1e-4)
    assert row["curve"]["steps"] == list(seq_eval)
    metrics = metrics_lib.read_rows(str(tmp_path / "trials" / str(row["trial"])))
    for step, m in metrics.items():
      assert m["loss"] == pytest.approx(seq_loss[step - 1], rel=1e-4), (lr, step)
