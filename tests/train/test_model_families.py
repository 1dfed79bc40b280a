"""BERT (masked LM) and ResNet (images) through the trainer: mesh invariance, FLOPs, shardings.

For the same seed and global batch the loss trajectory must not depend on the mesh: the
DESIGN.md invariant, here for a bidirectional encoder and for BatchNorm (whose statistics
are global-batch statistics under jit, i.e. cross-replica).
"""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from train import tasks
from configs import bert as bert_config
from configs import resnet as resnet_config
from models import flops
from tests import testlib

STEPS = 10
MESHES = [dict(data=8, fsdp=1, tensor=1, sequence=1),
          dict(data=1, fsdp=8, tensor=1, sequence=1),
          dict(data=2, fsdp=2, tensor=2, sequence=1)]


def _bert(mesh):
  c = bert_config.get_config("tiny,global_batch_size=16,seq_len=32,model.num_layers=1")
  c.mesh.update(mesh)
  return c


def _resnet(mesh):
  c = resnet_config.get_config("tiny,global_batch_size=16")
  c.mesh.update(mesh)
  return c


FAMILIES = {"bert": _bert, "resnet": _resnet}
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1, sequence=1)


@pytest.fixture(scope="module")
def reference_losses():
  return {name: testlib.run_steps(make(ONE_DEVICE), num_devices=1, steps=STEPS)[0]
          for name, make in FAMILIES.items()}


@pytest.fixture(scope="module")
def final_states():
  return {}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mesh", MESHES, ids=["data8", "fsdp8", "d2f2t2"])
def test_mesh_invariance(reference_losses, final_states, family, mesh):
  losses, _, state = testlib.run_steps(FAMILIES[family](mesh), steps=STEPS)
  final_states[family, tuple(mesh.values())] = state
  reference = reference_losses[family]
  assert losses[-1] < losses[0], losses  # it trains
  np.testing.assert_allclose(losses, reference, rtol=1e-4)


def test_resnet_shardings_follow_rules(final_states):
  key = ("resnet", tuple(MESHES[2].values()))
  if key not in final_states:
    pytest.skip("needs the d2f2t2 ResNet run of test_mesh_invariance")
  state = final_states[key]
  params, rest = state["params"], state["rest"]
  expected = {
      ("stem", "kernel"): P(None, None, None, "tensor"),  # [h, w, in 1 (whole), mlp]
      ("blocks", 0, "convs", 0, "kernel"): P(None, None, "fsdp", "tensor"),  # [h, w, embed, mlp]
      ("blocks", 0, "norms", 1, "scale"): P("fsdp"),  # [embed]
      ("head", "kernel"): P("fsdp", None),  # [embed, classes]
  }
  for path, spec in expected.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
  # BatchNorm running statistics live in `rest`, sharded like the channels they describe,
  # and training moved them (they are threaded through the step).
  mean = rest["blocks"][0]["norms"][1]["mean"]
  assert mean.sharding.spec == P("fsdp")  # [embed]
  assert float(abs(jax.device_get(mean)).max()) > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flops_per_example_feed_mfu(family):
  config = FAMILIES[family](ONE_DEVICE)
  task = tasks.make_task(config)
  assert task.flops_per_example > 0
  if family == "bert":
    cfg = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0))).cfg
    assert task.flops_per_example == config.seq_len * flops.encoder_train_flops_per_token(
        cfg, config.seq_len)
    assert cfg.vocab_size == 384  # 256 bytes + end-of-document + [MASK], padded to 128
