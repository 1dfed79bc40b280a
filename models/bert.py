"""BERT-style bidirectional encoder with a masked-LM head (Devlin et al. 2019), Flax NNX.

The blocks are the decoder's (`models.layers`) with `causal=False`, so every position
attends to the whole sequence. The MLM head is Devlin et al.'s: dense + GELU + norm, then the
tied input embedding and an output bias (Google BERT's `get_masked_lm_output`).

Deliberate differences from Devlin et al. 2019, all shared with the decoder here:
pre-norm RMSNorm blocks (Xiong et al. 2020: stable without the long warmup post-LN needs)
and rotary positions (Su et al. 2021) instead of learned absolute ones. Rotary positions
have no parameters, so the LAMB recipe's two phases (short then long sequences, You et al.
2020 §4.1) share one parameter tree and the optimizer state carries over unchanged. No
segment embeddings and no next-sentence head (Liu et al. 2019 find NSP unneeded).

Shapes: tokens [B, T] (with [MASK] ids) -> logits [B, T, V] float32, V padded to a multiple
of `vocab_multiple` (padding ids are never targets). Uses `TransformerConfig`; `causal` is
the only switch. Real sizes (`configs/bert.py`): base d=768, 12 layers, 12 heads,
MLP 3072 (GELU), ~110M params with a 30k vocabulary; large d=1024, 24 layers, 16 heads, MLP
4096, ~340M.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers
from models import transformer
from sharding.rules import constrain

TransformerConfig = transformer.TransformerConfig


class MlmHead(nnx.Module):
  """h -> norm(gelu(h W)) E^T + b: Devlin et al. 2019 (Google BERT `get_masked_lm_output`)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    d = cfg.d_model
    self.dense = layers.param(rngs, layers.fan_in_normal(d), (d, d), ("embed", "mlp"))
    self.norm = layers.RMSNorm(d, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32), sharding_names=("vocab",))

  def __call__(self, x_BxTxD, embed_VxD, dtype):
    h_BxTxD = jax.nn.gelu(x_BxTxD @ self.dense[...].astype(dtype))
    h_BxTxD = self.norm(constrain(h_BxTxD, ("batch", "length", "embed")))
    logits_BxTxV = jnp.einsum("btd,vd->btv", h_BxTxD, embed_VxD.astype(dtype))
    return logits_BxTxV.astype(jnp.float32) + self.bias[...]


class Bert(nnx.Module):
  """Masked-LM encoder: tokens [B, T] -> logits [B, T, V] (float32)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    validate(cfg)
    self.cfg = cfg
    self.embed = layers.param(rngs, nnx.initializers.normal(cfg.init_std),
                              (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.blocks = layers.make_blocks(cfg, causal=False, rngs=rngs)
    self.final_norm = layers.RMSNorm(cfg.d_model, rngs=rngs)
    self.head = MlmHead(cfg, rngs=rngs)

  def __call__(self, tokens_BxT):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    positions_T = jnp.arange(tokens_BxT.shape[1])
    x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"))
    x_BxTxD = layers.apply_blocks(cfg, self.blocks, x_BxTxD, positions_T)
    logits_BxTxV = self.head(self.final_norm(x_BxTxD), self.embed[...], dt)
    return constrain(logits_BxTxV, ("batch", "length", "vocab"))


def validate(cfg: TransformerConfig) -> None:
  """The decoder's checks, plus what the encoder does not support."""
  transformer.validate(cfg)
  if cfg.parametrization != "standard":
    raise ValueError(f"config.model.parametrization={cfg.parametrization!r} is invalid for "
                     "BERT; valid: 'standard'.")
