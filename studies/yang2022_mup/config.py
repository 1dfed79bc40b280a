r"""μP checks (Yang et al. 2022, Tensor Programs V): coordinate check and lr transfer across width.

  nice -n 10 python -m sweep \
      --config=studies/yang2022_mup/config.py:transfer --workdir=/tmp/mup_transfer
  nice -n 10 python -m studies.yang2022_mup.study \
      --config=studies/yang2022_mup/config.py:coord --workdir=/tmp/mup_coord

The transfer variants are sweep configs (configs/sweep.py's runtime fields, `base` = the
trainer config, `study` = studies.yang2022_mup.study): one point per (parametrization, width,
lr), each width's lrs trained vectorised; the report goes to <workdir>/report/.

Variants:
  transfer  the lr sweep: AdamW lrs 0.00125..0.08 (×2 grid), widths 32, 64, 128, 256 (μP
            base 32), 2-layer GELU decoder, python_source bytes, batch 8 × 32 tokens, 150 steps
            (cosine, 15 warmup), final eval loss on 8×32 validation sequences; standard vs μP.
  coord     the coordinate check: widths 64..1024 (base 64), 2 layers, 5 AdamW steps, lr 1e-2.
  tiny      a smoke test of both (2 widths, 3 lrs, 20 steps; coord: 2 widths, 2 steps).
Any field: `config.py:transfer,transfer.widths=(32,64)` or `--config.base.num_steps=300`
(set `base.schedule.warmup_steps` with it).

Measured on a 2-core CPU shared with other jobs (load 8-16; transfer: load ~5):
  transfer  253 s through the sweep driver (2026-12-04; 560 s before, at load 8-16, the same
            losses to 3 decimals). Best lr per width 32/64/128/256: standard 0.02, 0.01, 0.005, 0.0025 (moves
            3 grid steps, loss 2.786 -> 2.527); μP 0.02, 0.01, 0.02, 0.01 (at most 1 step, loss
            2.805 -> 2.640). μP loses to tuned standard at d=256 here; its 1/d attention with
            constant 1 is part of it (sqrt(base d_head)/d_head gave 2.585 at lr 0.02).
  coord     307 s. After 5 steps every μP layer stays within 1.39× from width 64 to 1024;
            standard hidden outputs grow up to 1878× and logits 3.0×.
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import lm
from configs import sweep as sweep_configs

STUDY = "studies.yang2022_mup.study"


def _coord(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      enabled=True, widths=(64, 128, 256, 512, 1024), steps=5, lr=1e-2, optimizer="adamw",
      base_d_model=64, num_layers=2, batch_size=4, seq_len=32))
  c.update(overrides)
  return c


def _transfer(**overrides) -> ml_collections.ConfigDict:
  """The sweep's axes: parametrizations × widths × lrs (lr_center * 2^k, k = lr_low..lr_high)."""
  c = ml_collections.ConfigDict(dict(
      enabled=True, parametrizations=("standard", "mup"), widths=(32, 64, 128, 256),
      mlp_ratio=4, lr_center=1e-2, lr_low=-3, lr_high=3))
  c.update(overrides)
  return c


def _base(num_steps: int) -> ml_collections.ConfigDict:
  """The trainer config every point starts from (its cell sets the width)."""
  base = lm.get_config("tiny")  # schedule.total_steps follows num_steps (a reference)
  base.model.update(dict(num_layers=2, num_heads=4, mlp_activation="gelu", max_seq_len=32,
                         base_d_model=32))
  # μP readout init: False = the base width's std (TP5 Table 8). The decoder's default,
  # zero (mup's readout_zero_init), trained far worse here: best eval loss 2.85-2.91 at
  # every width 32..256 (no gain from width) against 2.81 -> 2.64 with the Table 8 init.
  base.model.readout_zero_init = False
  base.seq_len = 32
  base.global_batch_size = 8
  base.num_steps = num_steps
  base.schedule.name = "cosine"
  base.schedule.peak_lr = 1.0  # a point's lr enters as the trainer's runtime lr_scale
  base.schedule.warmup_steps = max(1, num_steps // 10)
  base.eval_every = base.checkpoint_every = num_steps  # one eval, at the end
  base.keep_checkpoints = 1
  base.eval_batches = 8
  base.eval_batch_size = 32
  return base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "transfer")
  if variant not in ("transfer", "coord", "tiny"):
    raise ValueError(f"unknown mup config variant {variant!r}; valid: ['coord', 'tiny', "
                     "'transfer'].")
  c = ml_collections.ConfigDict()
  c.variant = variant
  if variant == "tiny":
    c.coord = _coord(widths=(64, 256), steps=2)
    c.transfer = _transfer(widths=(32, 64), lr_low=-1, lr_high=1)
    c.base = _base(20)
  else:
    c.coord = _coord(enabled=variant == "coord")
    c.transfer = _transfer(enabled=variant == "transfer")
    c.base = _base(150)
  sweep_configs.add_runtime_fields(c, STUDY)
  c.lock()
  common.apply_overrides(c, overrides)
  return c
