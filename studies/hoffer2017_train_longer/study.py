r"""Hoffer et al. 2017 ("Train longer, generalize better") on digits: does the recipe close the
large-batch generalisation gap?

  python -m studies.hoffer2017_train_longer.study --workdir=/tmp/hoffer

Three runs of `configs/resnet.py` (ResNet-8, width 8, SGD momentum 0.9):
  hoffer_small   batch B0 = 16 for 16 epochs (1437 steps), lr 0.05;
  hoffer_large   batch 256 for the same 16 epochs (89 steps), same lr, plain BN;
  hoffer_recipe  batch 256 with sqrt LR scaling (lr 0.05 x sqrt(256/16) = 0.2), ghost BN
                 (g = 16), regime adaptation (1437 steps, as many as the small batch) and
                 gradient clipping at norm 5 (docs/papers.md §6).
It prints a markdown table of the final test accuracy (all 360 test images) and steps.
Re-running with the same workdir reuses finished runs (each resumes from its checkpoint).
Any run's field: `--override=hoffer_recipe:model.ghost_batch_size=32` (repeatable).
"""
from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from train import cli
from train import loop
from configs import resnet as resnet_config
from optimizers import schedules

VARIANTS = ("hoffer_small", "hoffer_large", "hoffer_recipe")

_WORKDIR = flags.DEFINE_string("workdir", None, "Each run goes to WORKDIR/<variant>.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "VARIANT:key=value, e.g. hoffer_recipe:model.ghost_batch_size=32.")


def configs(overrides: list[str] = ()) -> dict:
  """{variant: config} with `VARIANT:key=value` overrides applied."""
  extra = {v: [] for v in VARIANTS}
  for item in overrides:
    variant, _, setting = item.partition(":")
    if variant not in extra or "=" not in setting:
      raise ValueError(f"--override={item!r}: expected VARIANT:key=value with VARIANT in "
                       f"{list(VARIANTS)}")
    extra[variant].append(setting)
  return {v: resnet_config.get_config(",".join([v, *extra[v]])) for v in VARIANTS}


def effective_lr(config) -> float:
  """Peak lr after the batch-size rule: peak x (B / B0)^p (Hoffer et al. §4: p = 1/2)."""
  s = config.schedule
  p = schedules.batch_size_exponent(s.batch_size_rule)
  return s.peak_lr * (config.global_batch_size / s.base_batch_size) ** p if p else s.peak_lr


def run(workdir: str, overrides: list[str] = ()) -> list[dict]:
  """Trains (or resumes) the three runs; returns one row per run."""
  rows = []
  for variant, config in configs(overrides).items():
    start = time.time()
    result = loop.train(config, os.path.join(workdir, variant))
    rows.append(dict(
        run=variant, batch=config.global_batch_size, steps=result["step"],
        epochs=result["examples"] / resnet_config.DIGITS_TRAIN, lr=effective_lr(config),
        ghost=config.model.ghost_batch_size or config.global_batch_size,
        accuracy=result["eval_accuracy"], loss=result["eval_loss"],
        seconds=time.time() - start))
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| run | batch | steps | epochs | peak lr | BN batch | test accuracy | test loss "
           "| time |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['batch']} | {r['steps']} | {r['epochs']:.1f} | "
                 f"{r['lr']:.3g} | {r['ghost']} | {r['accuracy']:.3f} | {r['loss']:.3f} | "
                 f"{r['seconds']:.0f} s |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_workdir(_WORKDIR.value)
  rows = run(_WORKDIR.value, _OVERRIDES.value)
  logging.info("done")
  print(markdown(rows), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  sys.exit(cli.run(main))
