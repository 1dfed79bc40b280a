r"""Steps and tokens to a target loss: fixed batch sizes against adaptive batch-size control.

  python -m studies.mccandlish2018_batch_size.study --model=tiny --workdir=/tmp/bs_study
  python -m studies.mccandlish2018_batch_size.study --model=small --workdir=/tmp/bs_small \
      --fixed=8,16,32,64 --micro=8 --max_batch=64 --target=2.6 --max_tokens=8e5 --base_lr=1.5e-3
      (the README's table: 19 min on 2 idle CPU cores)

Trains the LM with several fixed batch sizes (the steps-versus-examples trade-off of
McCandlish et al. 2018, Fig. 3: S = S_min(1 + B_crit/B), E = E_min(1 + B/B_crit)), with the
noise-scale controller (batch ∝ B_simple) and with AdAdaGrad's norm test (Lau et al. 2024),
all to the same target loss. Writes `batch_size_study.md` (table) and `.png` (plot) to the
workdir. The learning rate follows the batch through the square-root rule (Hoffer et al.
2017; Granziol et al. 2022 for Adam) from base_batch_size.
"""
from __future__ import annotations

import json
import os

from absl import flags
from absl import logging
import numpy as np

from train import cli
from laws import critical_batch
from train import loop
from configs import lm as lm_config

def define_flags() -> None:
  """The CLI's flags (defined when run as a script, so tests can import the module)."""
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.DEFINE_enum("model", "tiny", ["tiny", "small"], "lm.py variant to train.")
  flags.DEFINE_float("target", 2.6, "Target loss (EMA of the training loss, nats).")
  flags.DEFINE_list("fixed", ["8", "16", "32", "64", "128"], "Fixed batch sizes.")
  flags.DEFINE_integer("micro", 8, "Micro-batch (and initial batch) of adaptive runs.")
  flags.DEFINE_integer("max_batch", 128, "Largest batch adaptive runs may reach.")
  flags.DEFINE_float("max_tokens", 1.5e6, "Token budget per run.")
  flags.DEFINE_float("base_lr", 2e-3, "Peak lr at the base batch size (8).")
  flags.DEFINE_float("eta", 0.3, "Norm-test parameter η.")
  flags.DEFINE_bool("stop_at_target", True, "End each run when it reaches the target "
                    "(otherwise it trains to max_tokens).")


EMA = 0.9


def run_config(model: str, *, batch: int, micro: int, controller: str, max_batch: int,
               max_tokens: float, base_lr: float, eta: float):
  c = lm_config.get_config(model)
  steps = int(max_tokens // (c.seq_len * batch))
  # Micro-batches everywhere: the fixed runs log B_simple too (it needs k >= 2).
  c.global_batch_size, c.micro_batch_size = batch, min(micro, batch)
  c.num_steps, c.max_tokens, c.log_every, c.eval_every = steps, int(max_tokens), 1, 0
  c.checkpoint_every = steps
  c.schedule.name, c.schedule.peak_lr, c.schedule.warmup_steps = "constant", base_lr, 20
  c.schedule.batch_size_rule, c.schedule.base_batch_size = "sqrt", 8
  c.batch_size.controller = controller
  c.batch_size.max_batch_size = max_batch
  c.batch_size.min_batch_size = 2 * micro
  c.batch_size.adaptive.eta = eta
  c.batch_size.noise_scale.only_grow = True
  return c


def _ema(previous, loss):
  """The loss EMA every run is judged by (the first value starts it)."""
  return loss if previous is None else EMA * previous + (1 - EMA) * loss


def steps_and_tokens_to_target(rows, target):
  """First step at which the EMA of the training loss reaches target, and tokens by then."""
  ema = None
  for row in rows:
    ema = _ema(ema, row["loss"])
    if ema <= target:
      return row["step"], row["tokens"], row["batch_size"]
  return None, None, rows[-1]["batch_size"]


def stop_at(target):
  """A trainer hook that ends the run once the loss EMA of steps_and_tokens_to_target
  reaches target (a resumed run restarts the EMA, so it may stop a few steps later)."""
  ema = None

  def hook(step, metrics):
    nonlocal ema
    del step
    ema = _ema(ema, metrics["loss"])
    return ema <= target
  return hook


def run(name, config, workdir, target=None):
  path = os.path.join(workdir, name)
  result = loop.train(config, path, hooks=[stop_at(target)] if target else ())
  rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
  rows = [r for r in rows if "loss" in r]
  return result, rows


def main(argv):
  del argv
  f = flags.FLAGS
  workdir = f.workdir
  common = dict(micro=f.micro, max_batch=f.max_batch, max_tokens=f.max_tokens,
                base_lr=f.base_lr, eta=f.eta)
  runs = [(f"fixed_{b}", run_config(f.model, batch=int(b), controller="fixed", **common))
          for b in f.fixed]
  # The noise scale needs two micro-batches to measure; the norm test starts at one.
  runs += [("noise_scale", run_config(f.model, batch=2 * f.micro, controller="noise_scale",
                                      **common)),
           ("norm_test", run_config(f.model, batch=f.micro, controller="norm_test", **common))]
  table = []
  for name, config in runs:
    logging.info("=== %s", name)
    result, rows = run(name, config, workdir, f.target if f.stop_at_target else None)
    steps, tokens, final_batch = steps_and_tokens_to_target(rows, f.target)
    noise = [r["noise_scale"] for r in rows if "noise_scale" in r]
    table.append(dict(run=name, steps=steps, tokens=tokens, final_batch=final_batch,
                      final_loss=result["loss"], noise_scale=noise[-1] if noise else None))
  write_outputs(table, workdir, f.target, runs[0][1].seq_len)


def write_outputs(table, workdir, target, seq_len):
  fixed = [r for r in table if r["run"].startswith("fixed") and r["steps"]]
  fit = None
  if len(fixed) >= 3:
    batches = np.array([int(r["run"].split("_")[1]) for r in fixed], float)
    fit = critical_batch.fit_critical_batch(batches, np.array([r["steps"] for r in fixed], float),
                                            target=target, n_boot=200)
  lines = [f"Target: EMA({EMA}) of the training loss ≤ {target} nats/token.\n",
           "| run | steps to target | tokens to target | batch at target | final loss | "
           "B_simple (last) |", "|---|---|---|---|---|---|"]
  for r in table:
    fmt = lambda v, f="{:,}", none="not reached": none if v is None else f.format(v)
    lines.append(f"| {r['run']} | {fmt(r['steps'])} | {fmt(r['tokens'])} | {r['final_batch']} "
                 f"| {r['final_loss']:.3f} | {fmt(r['noise_scale'], '{:.1f}', '—')} |")
  if fit is not None:
    p = fit.params
    lines.append(f"\nFixed-batch fit of S = S_min(1 + B_crit/B) (McCandlish et al. 2018): "
                 f"S_min = {p['S_min']:.0f} steps, B_crit = {p['B_crit']:.1f} sequences "
                 f"(95% interval {fit.intervals['B_crit'][0]:.1f}–{fit.intervals['B_crit'][1]:.1f}).")
  with open(os.path.join(workdir, "batch_size_study.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "batch_size_study.json"), "w") as f:
    json.dump(table, f, indent=1)
  _plot(table, fit, seq_len, os.path.join(workdir, "batch_size_study.png"))
  print("\n".join(lines))


def _plot(table, fit, seq_len, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for r in table:
    if r["steps"] is None:
      continue
    fixed = r["run"].startswith("fixed")
    ax.scatter(r["tokens"], r["steps"], marker="o" if fixed else "*", s=40 if fixed else 160,
               label=r["run"], zorder=3)
  if fit is not None:
    b = np.geomspace(1, 4096, 200)
    steps = fit.params["S_min"] * (1 + fit.params["B_crit"] / b)
    ax.plot(steps * b * seq_len, steps, "k--", lw=1, label="fit: (S/S_min−1)(E/E_min−1)=1")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("tokens to target (E)")
  ax.set_ylabel("steps to target (S)")
  ax.set_title("Steps vs. examples to the same loss")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  cli.define_distributed_flags()
  raise SystemExit(cli.run(main))
