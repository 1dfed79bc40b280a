r"""Hoffer et al. 2017 ("Train longer, generalize better", docs/papers.md §6) as a sweep.

  python -m sweep --config=studies/hoffer2017_train_longer/config.py \
      --workdir=/tmp/hoffer

`base` is the small-batch run: a ResNet-8 (width 8) on digits with SGD momentum 0.9, weight
decay 5e-4, cosine lr from 0.05 without warmup, evaluated once at the end on all 360 test
images. The study's points (study.py) override it per run:
  hoffer_small   batch B0 = `small_batch` for `epochs` epochs (16 x 1437 / 16 = 1437 steps).
  hoffer_large   batch `large_batch` for the same epochs (16x fewer steps: 89), same lr,
                 plain BN.
  hoffer_recipe  batch `large_batch` with the recipe: sqrt lr scaling (lr x sqrt(B/B0) = 0.2,
                 the reference code's `--lr_bb_fix`), ghost BN with g = `ghost_batch_size`,
                 regime adaptation (as many steps as the small batch) and the reference
                 code's gradient clipping at `grad_clip_norm` (`main_gbn.py`).

Variants:
  digits  THE MAIN JOB: the three runs above. Measured 2026-12-04 (2 shared CPU cores, 1 min
          48 s wall): test accuracy 0.989 / 0.486 / 0.994, test loss 0.039 / 1.787 / 0.024;
          the configs are field-for-field those of the former configs/resnet.py hoffer_*
          variants (hoffer_small checked bit for bit against their loop.train run).
  tiny    the tests' study: 0.1 epochs at batch 16 vs 64 (8 / 2 / 8 steps), seconds a run.
Any field: `config.py:digits,epochs=8` or `--config.base.optimizer.weight_decay=1e-3` (every
run), `--config.ghost_batch_size=32` (the recipe's ghost batch).
"""
from __future__ import annotations

import ml_collections

from configs import common
from configs import resnet as resnet_config
from configs import sweep as sweep_config
from data.images import default_image_data_config
from optimizers.factory import default_optimizer_config, default_schedule_config

DIGITS_TRAIN = 1437  # images in digits' train split (data/digits.py)
RUNS = ("hoffer_small", "hoffer_large", "hoffer_recipe")

_VARIANTS = {
    "digits": dict(small_batch=16, large_batch=256, epochs=16),
    "tiny": dict(small_batch=16, large_batch=64, epochs=0.1),
}


def num_steps(epochs: float, batch_size: int) -> int:
  """Steps of `epochs` passes over digits' train split at this batch size (at least 1)."""
  return max(1, int(epochs * DIGITS_TRAIN) // batch_size)


def base_config(small_batch: int, epochs: float, lr: float = 0.05) -> ml_collections.ConfigDict:
  """The small-batch run's trainer config (what configs/resnet.py built as hoffer_small)."""
  c = resnet_config.get_config("tiny")
  c.variant = "hoffer_small"
  c.model = resnet_config.model_config(depth=8, width=8, ghost_batch_size=0)
  c.data = default_image_data_config("digits")
  c.optimizer = default_optimizer_config()
  c.optimizer.update(dict(name="sgd", momentum=0.9, weight_decay=5e-4, grad_clip_norm=None))
  c.schedule = default_schedule_config()
  c.schedule.update(dict(name="cosine", peak_lr=lr, warmup_steps=0, batch_size_rule="none",
                         base_batch_size=small_batch))
  c.global_batch_size = small_batch
  c.eval_batches, c.eval_batch_size = 3, 120
  c.num_steps = c.eval_every = c.checkpoint_every = num_steps(epochs, small_batch)
  c.log_every = max(1, c.num_steps // 10)
  c.schedule.total_steps = c.get_ref("num_steps")
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant, overrides = common.parse_arg(arg, "digits")
  v = common.pick_variant(variant, _VARIANTS, "hoffer2017")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.base = base_config(v["small_batch"], v["epochs"])
  c.runs = RUNS  # which of the three to train
  c.small_batch = v["small_batch"]  # B0: the baseline's batch and the lr rule's base
  c.large_batch = v["large_batch"]
  c.epochs = v["epochs"]  # every run's budget; the recipe takes the small batch's steps
  c.batch_size_rule = "sqrt"  # the recipe's lr x (B/B0)^p: Hoffer et al. §4, p = 1/2
  c.ghost_batch_size = v["small_batch"]  # the recipe's ghost BN batch (Hoffer et al. §4.2)
  c.grad_clip_norm = 5.0  # the recipe's clipping (reference code)
  sweep_config.add_runtime_fields(c, study="studies.hoffer2017_train_longer.study")
  c.layout = "sequential"  # one trial per cell: each run is its own program
  c.lock()
  common.apply_overrides(c, overrides)
  return c
