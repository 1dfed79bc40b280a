"""Training core: mesh invariance, shardings from rules, bad input."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from train import trainer
from tests import testlib

STEPS = 10


@pytest.fixture(scope="module")
def reference():
  config = testlib.tiny_config(mesh={"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1})
  losses, s, _ = testlib.run_steps(config, num_devices=1, steps=STEPS)
  init_params = trainer.init_state(s, config.seed)["params"]
  return losses, jax.device_get(init_params)


@pytest.fixture(scope="module")
def reference_losses(reference):
  return reference[0]


@pytest.mark.parametrize("mesh", [
    dict(data=8, fsdp=1, tensor=1, sequence=1),
    dict(data=1, fsdp=8, tensor=1, sequence=1),
    dict(data=2, fsdp=2, tensor=2, sequence=1),
])
def test_mesh_invariance(reference_losses, mesh):
  config = testlib.tiny_config(mesh=mesh)
  losses, _, _ = testlib.run_steps(config, steps=STEPS)
  assert losses[-1] < losses[0] - 0.5, losses  # it trains
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)


def test_micro_batches_equal_one_big_batch(reference_losses):
  config = testlib.tiny_config(mesh=dict(data=1, fsdp=1, tensor=1, sequence=1),
                               micro_batch_size=4)
  losses, s, _ = testlib.run_steps(config, num_devices=1, steps=STEPS)
  assert s.num_microbatches == 4
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)


def test_scan_layers_matches_unrolled(reference):
  reference_losses, unrolled = reference
  config = testlib.tiny_config(mesh=dict(data=1, fsdp=1, tensor=1, sequence=1))
  config.model.scan_layers = True
  config.model.remat = True
  blocks = [unrolled["blocks"][i] for i in range(config.model.num_layers)]
  stacked = dict(unrolled, blocks=jax.tree.map(lambda *xs: np.stack(xs), *blocks))
  losses, s, state = testlib.run_steps(config, num_devices=1, steps=STEPS, params=stacked)
  assert state["params"]["blocks"]["attn"]["q"].shape[0] == config.model.num_layers
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)


def test_param_and_optimizer_shardings_follow_rules():
  config = testlib.tiny_config(mesh=dict(data=2, fsdp=2, tensor=2, sequence=1))
  s = trainer.setup(config)
  state = trainer.init_state(s, 0)
  params, mu = state["params"], state["opt_state"].inner_state[0].mu
  expected = {
      ("embed",): P("tensor", "fsdp"),  # [vocab, embed]
      ("unembed",): P("fsdp", "tensor"),  # [embed, vocab]
      ("blocks", 0, "attn", "q"): P("fsdp", "tensor", None),  # [embed, heads, kv]
      ("blocks", 0, "attn", "o"): P("tensor", None, "fsdp"),  # [heads, kv, embed]
      ("blocks", 0, "mlp", "wi"): P("fsdp", "tensor"),  # [embed, mlp]
      ("blocks", 1, "mlp", "wo"): P("tensor", "fsdp"),  # [mlp, embed]
      ("final_norm", "scale"): P("fsdp"),  # [embed]
  }
  for path, spec in expected.items():
    leaf_p, leaf_m = params, mu
    for key in path:
      leaf_p, leaf_m = leaf_p[key], leaf_m[key]
    assert leaf_p.sharding.spec == spec, (path, leaf_p.sharding.spec)
    assert leaf_m.sharding.spec == spec, (path, "adam mu", leaf_m.sharding.spec)
    # Each device holds only its shard: never the full parameter on one device.
    shard_elems = leaf_p.addressable_shards[0].data.size
    assert shard_elems == leaf_p.size // np.prod([2 for a in spec if a is not None])


@pytest.mark.parametrize("overrides, message", [
    (dict(mesh=dict(data=3, fsdp=1, tensor=1, sequence=1)), "config.mesh"),
    (dict(global_batch_size=12, mesh=dict(data=8, fsdp=1, tensor=1, sequence=1)),
     "not divisible by the data-parallel size 8"),
    (dict(seq_len=512), "config.model.max_seq_len=128"),
    (dict(micro_batch_size=5), "config.micro_batch_size=5"),
])
def test_bad_config_errors(overrides, message):
  config = testlib.tiny_config(**overrides)
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
    trainer.setup(config)


def test_unknown_config_key_is_one_line_exit_2(tmp_path):
  proc = testlib.run_cli("train", "--config=configs/lm.py:tiny",
                         "--config.no_such_field=1", f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  err_lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(err_lines) == 1 and "no_such_field" in err_lines[0], proc.stderr
