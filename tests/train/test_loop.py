"""train/loop.py: what a trial may differ in from its program, stopping at a target loss, and
results that carry their eval curve forward through a resume."""
import jax
import pytest

from sharding import mesh as mesh_lib
from tests import testlib
from train import loop
from train import trainer


@pytest.fixture(scope="module")
def program():
  config = testlib.tiny_config(num_steps=8, schedule=dict(warmup_steps=2), eval_every=4,
                               log_every=1, checkpoint_every=4, device_peak_flops=1e12)
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  return trainer.setup(config, mesh=mesh)


def _config(program, **fields):
  c = program.config.copy_and_resolve_references()
  c.update(fields)
  return c


def test_trial_differing_in_a_compiled_field_is_refused(program, tmp_path):
  c = _config(program)
  c.model.d_model = 2 * c.model.d_model
  with pytest.raises(ValueError, match=r"config\.model\.d_model.*host-side fields"):
    loop.run(program, [loop.Trial(c, str(tmp_path))])


def test_trials_of_one_program_may_differ_in_host_side_fields(program, tmp_path):
  trials = [loop.Trial(_config(program, lr_scale=0.5, seed=1, log_every=2), str(tmp_path / "a")),
            loop.Trial(_config(program, lr_scale=2.0, seed=1, log_every=2), str(tmp_path / "b"))]
  outs = loop.run(program, trials)
  assert [o["status"] for o in outs] == ["done", "done"]
  assert outs[0]["eval_loss"] != outs[1]["eval_loss"]
  with pytest.raises(ValueError, match="must share config.seed"):
    loop.run(program, [loop.Trial(_config(program, seed=s), str(tmp_path / f"s{s}"))
                       for s in (0, 1)])


def test_stop_at_loss_ends_the_run_with_a_checkpoint(program, tmp_path):
  out = loop.train(_config(program, stop_at_loss=100.0), str(tmp_path), setup_=program)
  assert (out["status"], out["step"]) == ("stopped", 1)
  assert (tmp_path / "checkpoints" / "1").exists()


def test_resumed_run_returns_the_whole_eval_curve(program, tmp_path):
  first = loop.run(program, [loop.Trial(_config(program), str(tmp_path))],
                   hooks=[lambda step, row: step >= 5])[0]
  assert (first["status"], first["step"], first["curve"]["steps"]) == ("stopped", 5, [4])
  out = loop.train(_config(program), str(tmp_path), setup_=program)
  assert out["status"] == "done" and out["curve"]["steps"] == [4, 8]
  assert out["curve"]["losses"][0] == pytest.approx(first["curve"]["losses"][0])
  assert out["curve"]["losses"][1] == pytest.approx(out["eval_loss"])
  # Resumed once finished (a sweep worker killed before it stored the result): the same result.
  again = loop.train(_config(program), str(tmp_path), setup_=program)
  assert again["eval_loss"] == out["eval_loss"] and again["curve"] == out["curve"]
  assert again["loss"] == out["loss"] and again["step"] == 8
