"""FLOP counts per trained token (or image) and device peaks, for MFU.

Counts follow Chowdhery et al. 2022 (PaLM, App. B): training costs 6 FLOPs per matmul
parameter per token (forward 2, backward 4) plus 12·L·H·Dh·T for attention scores and
values (the full T×T block is computed; remat recompute is not counted, as MFU excludes it).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from models import resnet


def decoder_matmul_params(cfg) -> int:
  """Parameters that enter a matmul per token (embedding lookup excluded, readout included)."""
  attn = 4 * cfg.d_model * cfg.num_heads * cfg.d_head
  mlp = (3 if cfg.mlp_activation == "swiglu" else 2) * cfg.d_model * cfg.mlp_dim
  return cfg.num_layers * (attn + mlp) + cfg.d_model * cfg.vocab_size


def decoder_train_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token of the decoder LM (PaLM App. B)."""
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.d_head * seq_len
  return 6.0 * decoder_matmul_params(cfg) + attention


def encoder_train_flops_per_token(cfg, seq_len: int) -> float:
  """Training FLOPs per token of the BERT encoder (models.bert) with its MLM head.

  The decoder's count (the tied readout is a d x V matmul all the same; bidirectional
  attention computes the same full T x T block) plus the head's d x d dense layer. The head
  runs on every position, not only the masked ones, so this is what the step computes.
  """
  return decoder_train_flops_per_token(cfg, seq_len) + 6.0 * cfg.d_model**2


def resnet_train_flops_per_example(cfg, height: int, width: int) -> float:
  """Training FLOPs per image of models.resnet: 6 per multiply-add of every convolution
  (forward 2, backward 4, as above) and of the classifier. BatchNorm, ReLU and pooling are
  not counted (matmul-like work only, as in PaLM App. B); ResNet-50 at 224 x 224 gives
  6 x 4.09e9 (He et al. 2016 Table 1 quotes 3.8e9 "FLOPs", i.e. multiply-adds, without the
projection shortcuts).
  """
  macs = sum(h * w * k * k * cin * cout
             for h, w, k, cin, cout in resnet.conv_layers(cfg, height, width))
  channels = resnet.block_specs(cfg)[-1][1]
  return 6.0 * (macs + channels * cfg.num_classes)


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak_flops(device=None) -> float | None:
  """Peak FLOP/s of one device if known (None on CPU: measure it with `measure_matmul_peak`)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in _PEAKS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def peak_flops(override: float = 0.0) -> float | None:
  """FLOP/s per device for MFU, the one source every caller uses: `override`
  (config.device_peak_flops) when > 0, else the device's datasheet peak, else on CPU a
  measured matmul peak shared by the local devices; None when none is known."""
  if override:
    return override
  peak = device_peak_flops()
  if peak is None and jax.default_backend() == "cpu":
    peak = measure_matmul_peak(seconds=0.5) / len(jax.local_devices())
  return peak


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, seconds: float = 1.0) -> float:
  """Measured FLOP/s of a square jitted matmul on the default device (the CPU's 'peak')."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  runs, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    matmul(a, b).block_until_ready()
    runs += 1
  return 2.0 * n**3 * runs / (time.perf_counter() - start)
