"""Large-batch study: AdamW, LAMB and LARS across batch sizes at a fixed token budget.

  nice -n 5 python -m sweep \
      --config=studies/you2020_large_batch/config.py:cpu --workdir=/tmp/large_batch

A sweep config (configs/sweep.py's runtime fields: layout, vectorized, store, ...) whose
`study` is `studies.you2020_large_batch.study`; `base` is the lm.py config every run starts
from.

The batch-scaling experiment of You et al. 2020 (LAMB, §4; docs/papers.md §1.4) on a decoder LM:
every batch size sees the same number of tokens, so a batch 4x larger takes 4x fewer steps;
the peak lr follows the square-root rule lr(B) = lr(B0)·sqrt(B/B0) from the base batch B0, with
linear warmup then linear (power 1) decay to 0 (schedule 'warmup_poly'). Before the batch
sweep, each optimizer's base lr is checked at B0 on the grid base_lr x `lr_check_factors`,
and the best factor is used at every batch size (every factor runs at every batch size, in
one vectorised program per optimizer and batch size). The sweep writes `large_batch.md`
(tables), `large_batch.png` (final eval loss against batch size) and `results.json` to
<workdir>/report/; a re-run trains only the runs its trial store lacks.

Variants:
  cpu    lm.py's `tiny` shape (d_model 64, 2 layers, 2 heads, SwiGLU 256, sequence 64, bytes
         of python_source), batch 16 / 64 / 256 sequences (B0 = 64; micro-batches of 16, so
         every batch size runs at about the same tokens/s), 2^19 tokens per run (512 / 128 /
         32 steps), 10% warmup, eval on 16 x 32 held-out sequences, lr check x0.5 / 1 / 2.
         Not `small`: that one trains at ~200 tokens/s on this shared 2-core CPU
         (benchmarks/train_step.py), about 45 min per run of this budget.
  small_cpu  lm.py `small` (8.45M matmul params: d_model 256, 8 layers, SwiGLU 1024) at
         sequence 64, batch 8 / 32 / 128 (B0 = 32, micro-batches of 8), 98,304 tokens per
         run (192 / 48 / 12 steps), no lr check (base lrs below). Measured on the idle 2-core
         CPU: 787 s for the 9 runs (13 min 14 s wall with start-up); copied to
         docs/large_batch_small.{md,png}:
  final eval loss (nats/byte)   AdamW            LAMB             LARS
  B=8    (192 steps)            2.199 (lr 0.001) 2.298 (lr 0.007) 2.252 (lr 1.05)
  B=32   (48 steps)             2.865 (lr 0.002) 2.727 (lr 0.014) 2.589 (lr 2.1)
  B=128  (12 steps)             3.125 (lr 0.004) 3.077 (lr 0.028) 3.094 (lr 4.2)
         AdamW is best at the smallest batch; past it the layer-wise optimizers lose less
         (LARS 0.28 and LAMB 0.14 below AdamW at B=32, LAMB 0.05 at B=128).
  test   2 batch sizes of a 1-layer width-32 model, LAMB only, a few steps (the smoke test).
  small  lm.py `small` (d_model 256, 8 layers, sequence 128) at batch 32..1024, 2^24 tokens:
         an accelerator-sized version of the same study. Not run; its base lrs are guesses.
Any field: `config.py:cpu,tokens_per_run=262144,batch_sizes=(16, 64)`, or as a flag,
`--config.batch_sizes='(16, 64)'` (a comma inside brackets belongs to the value).

Measured (`cpu`, as the former staged loop: 2 shared CPU cores, load average 9-14 from other
jobs, 929 s wall for its 15 runs; as a sweep on 2026-12-04: 27 points in 3 min 4 s on the
idle machine, the same table but LARS at B=256, 3.181; seed 0, one seed only):
the base lrs came from a x3-spaced check at B0 (AdamW 6e-4..6e-2, LAMB 2e-3..0.2, LARS
0.3..30; parabola vertices 0.014 / 0.020 / 3.3; LAMB 0.2 and LARS 30 diverged); this config's
x0.5 / 1 / 2 check at B0 then gave eval loss AdamW 2.334 / 2.233 / 2.338, LAMB 2.378 / 2.254 /
2.340, LARS 2.510 / 2.364 / 2.345, so base lrs 0.012, 0.02 and 6 (LARS at the top of its grid;
lr 9 gave 2.493 in the x3 check).
  final eval loss (nats/byte)   AdamW            LAMB             LARS
  B=16   (512 steps)            1.841 (lr 0.006)  1.912 (lr 0.01)  1.935 (lr 3)
  B=64   (128 steps)            2.233 (lr 0.012)  2.254 (lr 0.02)  2.345 (lr 6)
  B=256  (32 steps)             2.908 (lr 0.024)  2.755 (lr 0.04)  3.139 (lr 12)
Loss rises with batch size for every optimizer: the trainer's noise scale B_simple is 4-11
sequences here, so every batch in the grid is past the critical batch and the fixed budget
favours more steps. LAMB loses least at B=256 (0.15 below AdamW); AdamW is best at B <= 64;
LARS (trust coefficient 0.001) is last everywhere.
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import lm as lm_config
from configs import sweep as sweep_config
from optimizers.factory import default_optimizer_config

# Peak learning rates at the base batch size B0, from the lr checks in the docstring.
_CPU_BASE_LR = dict(adamw=1.2e-2, lamb=2e-2, lars=3.0)
# small_cpu (B0 = 32, not tuned on `small`: no time for a check in 15 min): LAMB and LARS
# from the tiny check above (their layer-wise trust ratios make the lr width-independent),
# sqrt-scaled from B0 = 64 to 32; AdamW from lm.py `small` (2e-3 at batch 16 x 128 tokens).
_SMALL_CPU_BASE_LR = dict(adamw=2e-3, lamb=1.4e-2, lars=2.1)

_VARIANTS = {
    "cpu": dict(
        lm_variant="tiny", model=dict(), seq_len=64, batch_sizes=(16, 64, 256),
        base_batch_size=64, micro_batch_size=16, tokens_per_run=2**19,
        base_lr=_CPU_BASE_LR, lr_check_factors=(0.5, 1.0, 2.0),
        eval_batches=16, eval_batch_size=32),
    "small_cpu": dict(
        lm_variant="small", model=dict(), seq_len=64, batch_sizes=(8, 32, 128),
        base_batch_size=32, micro_batch_size=8, tokens_per_run=3 * 2**15,
        base_lr=_SMALL_CPU_BASE_LR, lr_check_factors=(), eval_batches=16, eval_batch_size=32),
    "test": dict(
        lm_variant="tiny", model=dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                                      max_seq_len=32),
        seq_len=32, batch_sizes=(8, 16), base_batch_size=8, micro_batch_size=8,
        tokens_per_run=16 * 32 * 3, optimizers=("lamb",), base_lr=_CPU_BASE_LR,
        lr_check_factors=(0.5, 1.0), eval_batches=2, eval_batch_size=16),
    "small": dict(
        lm_variant="small", model=dict(), seq_len=128, batch_sizes=(32, 128, 512, 1024),
        base_batch_size=128, micro_batch_size=0, tokens_per_run=2**24,
        base_lr=dict(adamw=2e-3, lamb=1e-2, lars=2.0), lr_check_factors=(0.5, 1.0, 2.0),
        eval_batches=20, eval_batch_size=64),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "cpu")
  v = common.pick_variant(variant, _VARIANTS, "large_batch")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.lm_variant = v["lm_variant"]  # configs/lm.py variant every run starts from: `base`
  c.base = lm_config.get_config(v["lm_variant"])
  c.model = ml_collections.ConfigDict(v["model"])  # overrides of its model fields
  c.seq_len = v["seq_len"]
  c.optimizers = v.get("optimizers", ("adamw", "lamb", "lars"))
  c.batch_sizes = v["batch_sizes"]  # sequences per optimizer step
  c.base_batch_size = v["base_batch_size"]  # B0 of the lr rule and of the lr check
  c.micro_batch_size = v["micro_batch_size"]  # 0 = whole batch at once; else accumulate
  c.tokens_per_run = v["tokens_per_run"]  # the fixed budget: steps = tokens / (B * seq_len)
  c.batch_size_rule = "sqrt"  # lr(B) = lr(B0) * (B/B0)^p: none | sqrt | linear | a number
  c.warmup_fraction = 0.1  # of each run's steps (constant warmup tokens across B) ...
  c.warmup_batch_exponent = 0.0  # ... times (B/B0)^this: 1.0 = LEGW (You et al. 2020)
  c.poly_power = 1.0  # decay (1 - p)^power after warmup (LAMB/BERT: 1.0)
  c.final_lr = 0.0
  c.base_lr = ml_collections.ConfigDict(dict(v["base_lr"]))  # peak lr at B0, per optimizer
  c.lr_check_factors = v["lr_check_factors"]  # base_lr multipliers tried at B0; () = none
  # Each optimizer's trainer `config.optimizer` (None fields = that optimizer's paper default).
  c.optimizer = ml_collections.ConfigDict()
  for name in ("adamw", "lamb", "lars"):
    c.optimizer[name] = default_optimizer_config()
    c.optimizer[name].name = name
    c.optimizer[name].update(v.get("optimizer", {}).get(name, {}))
  c.eval_batches = v["eval_batches"]
  c.eval_batch_size = v["eval_batch_size"]
  c.seed = 0
  c.loss_bound = 10.0  # a train loss above this counts as diverged (ln 384 = 5.95 at init)
  sweep_config.add_runtime_fields(c, study="studies.you2020_large_batch.study")
  c.lock()
  common.apply_overrides(c, overrides)
  return c
