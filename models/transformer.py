"""Decoder-only Transformer LM in Flax NNX with logical axis names.

Pre-norm (RMSNorm), rotary position embeddings, SwiGLU or GELU MLP, optional tied embeddings,
optional remat and scan over layers, float32 or bfloat16 compute. Parameters carry logical
names through `sharding_names`; activations are constrained with `sharding.rules.constrain`,
so the same model runs data-, FSDP-, tensor- and sequence-parallel by config alone.

`parametrization='mup'` applies the μP initialisation, attention and output scalings of
Yang et al. 2022 (Tensor Programs V) in the formulation of its Table 8 (the readout carries the
forward multiplier 1/width_mult); the per-layer learning-rate multipliers are built by
`models.mup` and applied by the optimizer (`train.trainer.setup` passes them on).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

# The blocks live in models.layers (shared with the BERT encoder); re-exported here.
from models.layers import Attention, Block, Mlp, RMSNorm, apply_blocks, dense, make_blocks, rope
from models.layers import fan_in_normal as _fan_in_normal
from models.layers import param as _param
from sharding.rules import constrain

nnx.use_eager_sharding(False)  # shardings are applied at init by the trainer, from config


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int | None = None  # default d_model // num_heads
  mlp_dim: int = 1024
  mlp_activation: str = "swiglu"  # swiglu | gelu
  max_seq_len: int = 1024
  tie_embeddings: bool = False
  remat: bool = False
  scan_layers: bool = False
  dtype: str = "float32"  # compute dtype; params stay float32
  attention: str = "dense"  # dense | ring
  rope_base: float = 10000.0
  parametrization: str = "standard"  # standard | mup
  base_d_model: int = 256  # μP base width
  readout_zero_init: bool = True  # μP readout: zero, or the base width's std (LARS needs it)
  init_std: float = 0.02  # embedding init; hidden kernels use 1/sqrt(fan_in)

  @property
  def d_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def width_mult(self) -> float:
    return self.d_model / self.base_d_model if self.parametrization == "mup" else 1.0

  @classmethod
  def from_config(cls, model_config, vocab_size: int) -> "TransformerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in model_config.items() if k in fields}
    multiple = model_config.get("vocab_multiple", 128)
    # Pad the vocabulary so it divides any tensor axis (extra rows are never targets).
    kwargs["vocab_size"] = -(-vocab_size // multiple) * multiple
    return cls(**kwargs)


class Transformer(nnx.Module):
  """Decoder LM: tokens [B, T] -> logits [B, T, V] (float32)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    validate(cfg)
    self.cfg = cfg
    self.embed = _param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                        ("vocab", "embed"))
    self.blocks = make_blocks(cfg, rngs=rngs)
    self.final_norm = RMSNorm(cfg.d_model, rngs=rngs)
    if not cfg.tie_embeddings:
      # μP: a width-independent readout init (Yang et al. 2022, Table 8), zero by default
      # (mup's readout_zero_init); LARS cannot grow a zero readout (see models/mup.py).
      if cfg.parametrization != "mup":
        init = _fan_in_normal(cfg.d_model)
      elif cfg.readout_zero_init:
        init = nnx.initializers.zeros
      else:
        init = _fan_in_normal(cfg.base_d_model)
      self.unembed = _param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def __call__(self, tokens_BxT):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    positions_T = jnp.arange(tokens_BxT.shape[1])
    x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
    x_BxTxD = constrain(x_BxTxD, ("batch", "length", "embed"))
    x_BxTxD = apply_blocks(cfg, self.blocks, x_BxTxD, positions_T)
    x_BxTxD = self.final_norm(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = dense(x_BxTxD, self.embed[...].astype(dt).T)
    else:
      logits_BxTxV = dense(x_BxTxD, self.unembed[...].astype(dt))
    logits_BxTxV = logits_BxTxV.astype(jnp.float32) / cfg.width_mult  # μP output multiplier
    return constrain(logits_BxTxV, ("batch", "length", "vocab"))


def validate(cfg: TransformerConfig) -> None:
  """One-line errors naming the config field, before anything compiles."""
  checks = [
      (cfg.mlp_activation in ("swiglu", "gelu"), "config.model.mlp_activation",
       cfg.mlp_activation, "'swiglu' or 'gelu'"),
      (cfg.dtype in ("float32", "bfloat16"), "config.model.dtype", cfg.dtype,
       "'float32' or 'bfloat16'"),
      (cfg.parametrization in ("standard", "mup"), "config.model.parametrization",
       cfg.parametrization, "'standard' or 'mup'"),
      (cfg.attention in ("dense", "ring"), "config.model.attention", cfg.attention,
       "'dense' or 'ring'"),
  ]
  for name in ("d_model", "num_layers", "num_heads", "mlp_dim", "max_seq_len", "vocab_size"):
    value = getattr(cfg, name)
    checks.append((isinstance(value, int) and value > 0, f"config.model.{name}", value,
                   "a positive integer"))
  for ok, field, value, valid in checks:
    if not ok:
      raise ValueError(f"{field}={value!r} is invalid; valid: {valid}.")
  if cfg.head_dim is None and cfg.d_model % cfg.num_heads:
    raise ValueError(f"config.model.num_heads={cfg.num_heads} must divide "
                     f"config.model.d_model={cfg.d_model} (or set config.model.head_dim).")
  if cfg.d_head % 2:
    raise ValueError(f"config.model head_dim={cfg.d_head} must be even for rotary embeddings.")
