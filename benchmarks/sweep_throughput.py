r"""Sweep throughput: K trials vectorised in one program against the same K run one by one.

  python -m benchmarks.sweep_throughput                 # K = 8, a tiny-sweep cell, CPU
  python -m benchmarks.sweep_throughput --variant=small --d_model=128 --num_layers=3

Both layouts train the same K learning rates of one sweep cell to the end through the one
loop (train/loop.py: K runs of one trial against one run of K vectorised trials), with
checkpoints, evals and metrics.jsonl as in a sweep; each layout first runs once untimed so
compiles are excluded.
Also prints the bare step: K jitted steps against one vmapped step. Measured 2026-12-04 on
the 2-core CPU VM (load average about 2), K = 8 on the tiny-sweep cell: vectorised 1.33x for
whole trials (7.04 s against 9.39 s), 1.30x for the bare step; earlier, for the lm.py shapes,
sequential won (0.64-0.92x). No GPU was lent to measure the accelerator side. The sweep's
layout='auto' is vectorised on every backend regardless (a timing must not pick it:
sweep/trials.py, choose_layout); 'measure' times both as an opt-in.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags

from sweep import grid
from train import loop
from train import trainer
from train import vectorized
from configs import sweep as sweep_configs

_VARIANT = flags.DEFINE_string("variant", "tiny", "configs/sweep.py variant of the cell.")
_K = flags.DEFINE_integer("k", 8, "Trials (learning rates) per cell.")
_D_MODEL = flags.DEFINE_integer("d_model", 32, "Model width of the cell.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Model depth of the cell.")
_TOKENS = flags.DEFINE_integer("tokens", 2**16, "D of the cell.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "B of the cell (sequences).")


def _run_sequential(s, configs, root):
  for i, c in enumerate(configs):
    loop.run(s, [loop.Trial(c, f"{root}/{i}")])


def _run_vectorized(s, configs, root):
  loop.run(s, [loop.Trial(c, f"{root}/{i}") for i, c in enumerate(configs)])


def main(argv):
  del argv
  config = sweep_configs.get_config(_VARIANT.value)
  point = grid.Point(_D_MODEL.value, _LAYERS.value, _TOKENS.value, _BATCH.value, 1.0)
  lrs = np.geomspace(1e-3, 1e-1, _K.value)
  s = trainer.setup(grid.trial_config(config, point))
  configs = [grid.trial_config(config, dataclasses.replace(point, lr=float(lr)),
                                    device_peak_flops=1e9) for lr in lrs]
  for c in configs:
    c.log_every = c.num_steps  # as few host round trips as a sweep makes
  n = grid.num_params(config, point)
  steps = configs[0].num_steps
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
        f"; cell N={n:,} D={point.tokens:,} B={point.batch_size} ({steps} steps), "
        f"K={_K.value}\n")
  print("| layout | trials | wall (s) | trials/s | vs sequential |")
  print("|---|---|---|---|---|")
  walls = {}
  for name, fn in (("sequential", _run_sequential), ("vectorized", _run_vectorized)):
    for timed in (False, True):
      root = tempfile.mkdtemp(prefix=f"sweep_throughput_{name}_")
      start = time.perf_counter()
      fn(s, configs, root)
      wall = time.perf_counter() - start
      shutil.rmtree(root, ignore_errors=True)
    walls[name] = wall
    print(f"| {name} (whole trials) | {_K.value} | {wall:.2f} | {_K.value / wall:.3f} | "
          f"{walls['sequential'] / wall:.2f}x |", flush=True)
  times = vectorized.step_times(s, _K.value, steps=20)
  for name in ("sequential", "vectorized"):
    print(f"| {name} (bare step x{_K.value}) | {_K.value} | {times[name]:.4f} per step | "
          f"{_K.value / times[name] / steps:.3f} | "
          f"{times['sequential'] / times[name]:.2f}x |")


if __name__ == "__main__":
  app.run(main)
