"""Megatron-style tensor parallelism from the logical rules alone (Shoeybi et al. 2019).

`heads` and `mlp` map to the `tensor` mesh axis: Q/K/V and the MLP's first matmul are split by
output columns, the attention output projection and the MLP's second matmul by input rows, so
each block needs one all-reduce of its [B, T, D] output in the forward pass and nothing else.
"""
import re

import jax
import numpy as np
import pytest
from flax import nnx

from train import trainer
from sharding import rules as rules_lib
from tests import testlib

STEPS = 10
TP = dict(data=1, fsdp=1, tensor=8, sequence=1)


def _config(mesh, num_layers=2):
  # 8 heads of 8 dims so the heads split over tensor=8; mlp 256 and vocab 384 divide too.
  config = testlib.tiny_config(mesh=mesh)
  config.model.num_heads = 8
  config.model.num_layers = num_layers
  return config


@pytest.fixture(scope="module")
def reference_losses():
  losses, _, _ = testlib.run_steps(_config(dict(data=1, fsdp=1, tensor=1, sequence=1)),
                                   num_devices=1, steps=STEPS)
  return losses


def test_tensor_parallel_matches_one_device(reference_losses):
  losses, s, state = testlib.run_steps(_config(TP), steps=STEPS)
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
  # Each device holds 1/8 of every Megatron-split weight: column split for q and wi,
  # row split for o and wo.
  block = state["params"]["blocks"][0]
  local = lambda x: x.addressable_shards[0].data.shape
  assert local(block["attn"]["q"]) == (64, 1, 8)  # [embed, heads/8, kv]
  assert local(block["attn"]["o"]) == (1, 8, 64)  # [heads/8, kv, embed]
  assert local(block["mlp"]["wi"]) == (64, 32)  # [embed, mlp/8]
  assert local(block["mlp"]["wo"]) == (32, 64)  # [mlp/8, embed]


def _forward_all_reduces(num_layers):
  """(result shape, op_name) of each all-reduce in the compiled forward loss, in order."""
  s = trainer.setup(_config(TP, num_layers))

  def loss(params, rest, tokens_BxT):
    model = nnx.merge(s.graphdef, params, rest)
    return s.task.loss_fn(model, {"tokens": tokens_BxT})[0]

  tokens = jax.ShapeDtypeStruct((16, 65), np.int32,
                                sharding=trainer.batch_shardings(s)["tokens"])
  with jax.set_mesh(s.mesh), rules_lib.axis_rules(s.rules):
    hlo = jax.jit(loss).lower(s.abstract_state["params"], s.abstract_state["rest"],
                              tokens).compile().as_text()
  out = []
  for line in hlo.splitlines():
    m = re.search(r"= (.*?) all-reduce(?:-start)?\(", line)
    if m:
      name = re.search(r'op_name="([^"]*)"', line)
      out.append((m.group(1).split("{")[0], name.group(1) if name else ""))
  return out


@pytest.mark.parametrize("num_layers", [2, 4])
def test_one_all_reduce_per_attention_and_per_mlp(num_layers):
  """Forward all-reduces of an N-layer model on tensor=8 are exactly 2N + 3:

  - 1 for the embedding lookup: the [vocab, embed] table is split over tensor by vocab rows,
    each device gathers the tokens it owns (zeros elsewhere) and the sum completes it;
  - per block, 1 after the attention output projection (row-parallel over heads) and 1 after
    the MLP's second matmul (row-parallel over mlp): 2N, all of shape [B, T, D];
  - 2 in the loss: the logits stay split over vocab, so log-softmax all-reduces the row max,
    then the sum of exp together with the target's logit (XLA combines those two into one
    all-reduce of a tuple).
  Q/K/V, attention itself and the MLP's first matmul are local (column parallel).
  """
  ops = _forward_all_reduces(num_layers)
  bxtxd = ("f32[16,64,64]", "f32[1024,64]")  # [B, T, D], or flattened by models.layers.dense
  activations = [name for shape, name in ops if shape in bxtxd]
  assert len(activations) == 2 * num_layers + 1, ops
  assert "gather" in activations[0], ops  # the embedding lookup
  attention, mlp = activations[1::2], activations[2::2]
  assert all("attn_out" in name for name in attention), ops  # output projection
  assert all("mlp_out" in name for name in mlp), ops
  loss = [shape for shape, _ in ops if shape not in bxtxd]
  assert len(loss) == 2, ops
  assert len(ops) == 2 * num_layers + 3
