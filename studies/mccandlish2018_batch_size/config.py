r"""Batch-size study sweep: fixed batches and adaptive batch-size control to one target loss.

  python -m sweep --config=studies/mccandlish2018_batch_size/config.py:tiny --workdir=/tmp/bs_study

McCandlish et al. 2018 (steps versus examples to a target loss, docs/papers.md §9.8) with the
noise-scale controller and AdAdaGrad's norm test (Lau et al. 2024, §3): one trial per fixed batch
size in `fixed`, one noise_scale run (from 2 x micro) and one norm_test run (from micro); each
stops when the EMA (decay base.stop_loss_ema) of its training loss reaches `target`
(studies/mccandlish2018_batch_size/study.py writes the table and plot to <workdir>/report/).

Variants:
  tiny   lm.py `tiny` (python_source bytes, sequence 64), fixed 8 / 16 / 32 / 64 / 128, micro 8,
         adaptive runs up to 128, target 2.6 nats, 1.5e6 tokens per run at most, base lr 2e-3.
  small  lm.py `small` (8.45M matmul params, sequence 128), fixed 8 / 16 / 32 / 64, micro 8,
         adaptive runs up to 64, target 2.6, 8e5 tokens at most, base lr 1.5e-3: the README's
         table (19 min 22 s on the idle 2-core CPU with the former study script).
  test   a 1-layer width-32 LM at sequence 32, fixed 8 / 16, adaptive up to 16, target 4.0:
         the smoke test (seconds a trial).
Any field: `config.py:tiny,target=2.5,max_tokens=1e6`, or `--config.fixed='(8, 16)'`.

Fields:
  base            the trainer config of every run (lm.py variant; points set the rest).
  target          target loss (nats): the EMA of the training loss every run is judged by.
  fixed           fixed batch sizes (sequences), one run each.
  micro           micro-batch of every run, and the norm test's first batch.
  max_batch       largest batch the adaptive runs may reach (min_batch = 2 x micro).
  max_tokens      token budget per run (num_steps = max_tokens / (seq_len x first batch)).
  base_lr         peak lr at batch 8; the sqrt rule scales it with the batch (Hoffer et al.
                  2017; Granziol et al. 2022 for Adam).
  eta             the norm test's η.
  stop_at_target  end each run at the target (base.stop_at_loss); False trains to max_tokens,
                  and the table then has no steps to target.
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import lm as lm_config
from configs import sweep as sweep_config

STUDY = "studies.mccandlish2018_batch_size.study"

_VARIANTS = {
    "tiny": dict(lm="tiny", fixed=(8, 16, 32, 64, 128), micro=8, max_batch=128, target=2.6,
                 max_tokens=1.5e6, base_lr=2e-3),
    "small": dict(lm="small", fixed=(8, 16, 32, 64), micro=8, max_batch=64, target=2.6,
                  max_tokens=8e5, base_lr=1.5e-3),
    "test": dict(lm="tiny", model=dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                                       max_seq_len=32),
                 seq_len=32, fixed=(8, 16), micro=8, max_batch=16, target=4.0,
                 max_tokens=8 * 32 * 150, base_lr=3e-3),
}


def _base(v: dict) -> ml_collections.ConfigDict:
  """The lm.py trainer config with what every run shares: constant lr after 20 warmup steps,
  no evals, one kept checkpoint, an only-growing noise scale (points set the rest)."""
  c = lm_config.get_config(v["lm"])
  c.model.update(v.get("model", {}))
  c.seq_len = v.get("seq_len", c.seq_len)
  c.schedule.name, c.schedule.warmup_steps = "constant", 20
  c.eval_every, c.keep_checkpoints = 0, 1
  c.batch_size.noise_scale.only_grow = True
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "tiny")
  v = common.pick_variant(variant, _VARIANTS, "batch-size study")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.base = _base(v)
  c.target = float(v["target"])
  c.fixed = tuple(v["fixed"])
  c.micro = v["micro"]
  c.max_batch = v["max_batch"]
  c.max_tokens = float(v["max_tokens"])
  c.base_lr = float(v["base_lr"])
  c.eta = 0.3
  c.stop_at_target = True
  c.n_boot = 200  # bootstrap refits of the fixed-batch S(B) fit
  sweep_config.add_runtime_fields(c, study=STUDY)
  c.layout = "sequential"  # adaptive controllers change B: one trial per program
  c.store.max_retries = 2
  c.lock()
  common.apply_overrides(c, overrides)
  return c
