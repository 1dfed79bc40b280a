"""Transformer building blocks shared by the decoder LM and the BERT-style encoder.

Pre-norm blocks (Xiong et al. 2020): RMSNorm, multi-head attention with rotary positions
(Su et al. 2021), SwiGLU or GELU MLP. `causal` is the only difference between the decoder
(`models.transformer`) and the encoder (`models.bert`). Every parameter names its logical
axes; activations are constrained by logical names (`sharding.rules.constrain`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention as attention_lib
from sharding.rules import constrain, is_split

nnx.use_eager_sharding(False)  # shardings are applied at init by the trainer, from config


def param(rngs, init, shape, names):
  return nnx.Param(init(rngs.params(), shape, jnp.float32), sharding_names=names)


def fan_in_normal(fan_in: int, scale: float = 1.0):
  return nnx.initializers.normal(scale / math.sqrt(fan_in))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), sharding_names=("embed",))

  def __call__(self, x_BxTxD):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return (x * self.scale[...]).astype(x_BxTxD.dtype)


def dense(x, w, contract: int = 1):
  """x's last `contract` axes times w's first ones, as one 2-D matmul on flattened axes.

  Same result as the einsum, but XLA:CPU runs a 3-D einsum's backward with transposed
  elementwise fusions: for the reference shape (benchmarks/train_step.py) the GELU MLP's
  fwd+bwd took 0.27 s as `btd,df->btf` and 0.14 s flattened. Merging [batch, length] is a
  free reshape, except when the sequence axis splits `length` (the partitioner would gather
  it): then it stays an einsum.
  """
  if is_split("length"):
    letters = "abcdefgh"[:x.ndim + w.ndim - 2 * contract]
    lead, out = letters[:x.ndim - contract], letters[x.ndim - contract:]
    inner = "wxyz"[:contract]
    return jnp.einsum(f"{lead}{inner},{inner}{out}->{lead}{out}", x, w)
  lead, inner = x.shape[:x.ndim - contract], w.shape[:contract]
  out = x.reshape(-1, math.prod(inner)) @ w.reshape(math.prod(inner), -1)
  return out.reshape(*lead, *w.shape[contract:])


def rope(x_BxTxHxD, positions_T, base: float):
  """Rotary embedding (Su et al. 2021) with global positions."""
  d = x_BxTxHxD.shape[-1]
  freqs_F = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles_TxF = positions_T[:, None].astype(jnp.float32) * freqs_F[None, :]
  sin, cos = jnp.sin(angles_TxF)[None, :, None, :], jnp.cos(angles_TxF)[None, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


class Attention(nnx.Module):
  """Multi-head attention; `causal=False` lets every position see the whole sequence."""

  def __init__(self, cfg, *, causal: bool = True, rngs: nnx.Rngs):
    self.cfg = cfg
    self.causal = causal
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_head
    init = fan_in_normal(d)
    self.q = param(rngs, init, (d, h, k), ("embed", "heads", "kv"))
    self.k = param(rngs, init, (d, h, k), ("embed", "heads", "kv"))
    self.v = param(rngs, init, (d, h, k), ("embed", "heads", "kv"))
    self.o = param(rngs, fan_in_normal(h * k), (h, k, d), ("heads", "kv", "embed"))

  def __call__(self, x_BxTxD, positions_T):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    qkv = [dense(x_BxTxD, w[...].astype(dt)) for w in (self.q, self.k, self.v)]
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = [constrain(t, ("batch", "length", "heads", "kv")) for t in qkv]
    q_BxTxHxK = rope(q_BxTxHxK, positions_T, cfg.rope_base)
    k_BxTxHxK = rope(k_BxTxHxK, positions_T, cfg.rope_base)
    # μP: 1/d attention logits (Yang et al. 2022, Sec. 4); standard: 1/sqrt(d).
    scale = (1.0 / cfg.d_head if cfg.parametrization == "mup" else 1.0 / math.sqrt(cfg.d_head))
    out_BxTxHxK = attention_lib.attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, causal=self.causal,
                                          impl=cfg.attention, scale=scale)
    out_BxTxHxK = constrain(out_BxTxHxK.astype(dt), ("batch", "length", "heads", "kv"))
    with jax.named_scope("attn_out"):  # named for profiles and the tensor-parallel test
      return dense(out_BxTxHxK, self.o[...].astype(dt), contract=2)


class Mlp(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.mlp_dim
    self.wi = param(rngs, fan_in_normal(d), (d, f), ("embed", "mlp"))
    if cfg.mlp_activation == "swiglu":
      self.wg = param(rngs, fan_in_normal(d), (d, f), ("embed", "mlp"))
    self.wo = param(rngs, fan_in_normal(f), (f, d), ("mlp", "embed"))

  def __call__(self, x_BxTxD):
    dt = jnp.dtype(self.cfg.dtype)
    h_BxTxF = dense(x_BxTxD, self.wi[...].astype(dt))
    if self.cfg.mlp_activation == "swiglu":
      h_BxTxF = jax.nn.silu(dense(x_BxTxD, self.wg[...].astype(dt))) * h_BxTxF
    else:
      h_BxTxF = jax.nn.gelu(h_BxTxF)
    h_BxTxF = constrain(h_BxTxF, ("batch", "length", "mlp"))
    with jax.named_scope("mlp_out"):
      return dense(h_BxTxF, self.wo[...].astype(dt))


class Block(nnx.Module):

  def __init__(self, cfg, *, causal: bool = True, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.attn = Attention(cfg, causal=causal, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, positions_T):
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_T)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"))
    x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
    return constrain(x_BxTxD, ("batch", "length", "embed"))


def make_blocks(cfg, *, causal: bool = True, rngs: nnx.Rngs):
  """cfg.num_layers blocks: an nnx.List, or one Block whose params stack a `layers` axis."""
  if not cfg.scan_layers:
    return nnx.List([Block(cfg, causal=causal, rngs=rngs) for _ in range(cfg.num_layers)])

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def stacked(rngs):
    return Block(cfg, causal=causal, rngs=rngs)
  return stacked(rngs)


def apply_blocks(cfg, blocks, x_BxTxD, positions_T):
  """Runs the blocks of `make_blocks` in order (scanned and/or rematerialised per cfg)."""
  def apply_block(block, x):
    return block(x, positions_T)
  if cfg.remat:
    apply_block = nnx.remat(apply_block, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, x):
      return apply_block(block, x)
    return run(blocks, x_BxTxD)
  for block in blocks:
    x_BxTxD = apply_block(block, x_BxTxD)
  return x_BxTxD
